"""The fine-tuning study: tune every init on the validation set, then repeat the best settings
over seeds and report test accuracy.

For every architecture and init:

1. **Tuning.** Every combination of optimizer, learning rate and weight decay is trained once
   with the first seed on the labelled training images. GHN-orth also tunes β and the start
   layer L. Each tuning run is measured on the validation images after its last epoch and never
   receives the test images.
2. **Selection.** The combination with the highest validation accuracy wins (ties go to the
   earlier combination in grid order); see :func:`select_best`.
3. **Final runs.** The winner is trained once per seed. Each final run records training and
   validation accuracy per epoch and the test accuracy after the last epoch.

Every finished run is written to ``OUTPUT/runs/RUN_ID.json``. The run id is a hash of
everything that determines the run (architecture, init, settings, seed, phase, data split, GHN
file and pretrained file), so running the study again reuses finished runs and trains only the
missing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from timm_ghn.data import ImageDataset, load_image_folder
from timm_ghn.errors import InvalidOptionError
from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.study.inits import INITS, build_model
from timm_ghn.study.splits import StudySplits, load_splits, make_splits, save_splits
from timm_ghn.study.training import TrainSettings, evaluate_model, fine_tune

__all__ = ["StudyConfig", "StudyData", "StudyOutcome", "load_study_data", "run_study", "select_best", "train_run"]

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
SPLITS_FILE = "splits.json"


@dataclasses.dataclass
class StudyConfig:
    """Everything a study run needs (see ``timm-ghn study --help`` for the units).

    ``lrs`` and ``weight_decays`` map each optimizer to its grid of values, and ``batch_size``
    maps each architecture to its batch size. ``start_layers`` items are
    ``"default"``, an integer layer or a fraction of the depth
    (:func:`timm_ghn.study.inits.resolve_start_layer`).
    """

    data: str
    output: str
    models: list[str]
    inits: list[str]
    seeds: list[int]
    epochs: int
    optimizers: list[str]
    lrs: dict[str, list[float]]
    weight_decays: dict[str, list[float]]
    batch_size: dict[str, int]
    image_size: int = 32
    betas: list[float] = dataclasses.field(default_factory=lambda: [3e-5])
    start_layers: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    ghn: str | None = None
    pretrained: dict[str, str] = dataclasses.field(default_factory=dict)
    classes: list[str] | None = None
    train_per_class: int = 100
    val_size: int = 5000
    test_per_class: int | None = None
    split_seed: int = 0
    stored_size: int = 32
    val_every: int = 1
    eval_batch_size: int = 250
    threads: int | None = None
    device: str = "cpu"
    preset: str | None = None

    def check(self) -> None:
        """Raise :class:`InvalidOptionError` naming the first invalid value and its fix."""
        unknown = [init for init in self.inits if init not in INITS]
        if unknown or not self.inits:
            raise InvalidOptionError(f"invalid inits {unknown or self.inits}: expected a list of {', '.join(INITS)}")
        if not self.models:
            raise InvalidOptionError("no architectures given: pass --models with timm model names")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise InvalidOptionError(f"invalid seeds {self.seeds}: expected distinct integers >= 0")
        for name, values in (("optimizers", self.optimizers), ("betas", self.betas), ("start layers", self.start_layers)):
            if not values:
                raise InvalidOptionError(f"empty list of {name}: pass at least one value")
        for name, option, grid in (("learning rates", "--lr", self.lrs), ("weight decays", "--weight-decay", self.weight_decays)):
            for optimizer in self.optimizers:
                if not grid.get(optimizer):
                    raise InvalidOptionError(f"no {name} for optimizer {optimizer}: pass {option} {optimizer}=V1,V2 or {option} V1,V2")
        missing = [m for m in self.models if m not in self.batch_size]
        if missing:
            raise InvalidOptionError(f"no batch size for {', '.join(missing)}: pass --batch-size N or MODEL=N for each")
        if "oracle" in self.inits:
            without = [m for m in self.models if m not in self.pretrained]
            if without:
                raise InvalidOptionError(
                    f"the oracle init needs a pretrained checkpoint for {', '.join(without)}: pass --pretrained MODEL=FILE"
                )
        if self.val_every < 1:
            raise InvalidOptionError(f"invalid validation interval {self.val_every}: expected an integer >= 1")

    def grid(self, model: str, init: str) -> list[TrainSettings]:
        """Return the hyperparameter combinations tuned for ``init``, in grid order."""
        common = [(opt, lr, wd) for opt in self.optimizers for lr in self.lrs[opt] for wd in self.weight_decays[opt]]
        orth = list(itertools.product(self.betas, self.start_layers)) if init == "ghn_orth" else [(None, None)]
        return [
            TrainSettings(opt, float(lr), float(wd), self.epochs, self.batch_size[model], self.image_size,
                          None if beta is None else float(beta), None if layer is None else str(layer))
            for (opt, lr, wd), (beta, layer) in itertools.product(common, orth)
        ]


@dataclasses.dataclass
class StudyData:
    """Decoded images of the three splits and the split itself."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    splits: StudySplits


@dataclasses.dataclass
class StudyOutcome:
    """Outcome of :func:`run_study`: all run records, the counts of trained and reused runs, and the written files."""

    runs: list[dict[str, Any]]
    trained: int
    reused: int
    output: Path
    files: dict[str, Path]


def target_classes(data: str | os.PathLike, ghn: LoadedGHN | None) -> list[str]:
    """Return the dataset's classes that the GHN was not trained on (all of them when unknown).

    ``timm-ghn pretrain`` stores its training classes in the GHN file's header. A GHN without that
    record (a ppuda file, a GHN trained on ImageNet) gets every class of the dataset.
    """
    from timm_ghn.data import list_classes
    from timm_ghn.evaluate import _training_classes

    classes = list_classes(data, "train")
    seen = _training_classes(ghn.path) if ghn is not None else None
    if not seen:
        return classes
    unseen = [c for c in classes if c not in set(seen)]
    if not unseen:
        raise InvalidOptionError(
            f"the GHN was trained on every class of {data} ({', '.join(seen)}); pass --classes to choose target classes"
        )
    logger.info("target classes %s: the GHN was trained on %s", ", ".join(unseen), ", ".join(seen))
    return unseen


def load_study_data(config: StudyConfig, classes: Sequence[str], output: Path) -> StudyData:
    """Decode the train and test splits, and draw or reload the saved train/validation split.

    A ``splits.json`` already in ``output`` is reused when it was drawn with the same classes,
    seed and sizes. A different dataset path only gets a warning, so a moved dataset still resumes.

    Raises:
        InvalidOptionError: the saved split was drawn with other settings.
    """
    train_split = load_image_folder(config.data, "train", list(classes), config.stored_size)
    test = load_image_folder(config.data, "test", list(classes), config.stored_size)
    if config.test_per_class is not None:
        test = test.subset(torch.cat([
            torch.nonzero(test.labels == label).flatten()[:config.test_per_class] for label in range(len(classes))
        ]))

    path = output / SPLITS_FILE
    wanted = (tuple(classes), config.split_seed, config.train_per_class, config.val_size)
    if path.is_file():
        splits = load_splits(path)
        saved = (splits.classes, splits.seed, splits.train_per_class, splits.val_size)
        if saved != wanted:
            raise InvalidOptionError(
                f"{path} contains a split drawn with (classes, seed, training images per class, validation size) = "
                f"{saved}, not {wanted}; pass another --output directory or the original options"
            )
        if splits.source != train_split.source:
            logger.warning("%s was drawn from %s; reusing it for %s", path, splits.source, train_split.source)
    else:
        splits = make_splits(train_split.labels, classes, config.train_per_class, config.val_size,
                             config.split_seed, train_split.source)
        save_splits(splits, path)
    train = train_split.subset(torch.tensor(splits.train, dtype=torch.long))
    val = train_split.subset(torch.tensor(splits.val, dtype=torch.long))
    return StudyData(train, val, test, splits)


def _fingerprint(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def run_id(spec: dict[str, Any]) -> str:
    """Return the id of a run: the first 16 hex digits of the SHA-256 of its sorted JSON spec."""
    return _fingerprint(spec)[:16]


def select_best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the tuning record with the highest validation accuracy (the first one on ties).

    Only ``record["val_acc"]`` is read: training and test accuracy play no part in the choice.
    A run without a validation accuracy (stopped by a non-finite loss) counts as 0.
    """
    if not records:
        raise InvalidOptionError("no tuning runs to choose from")
    best = records[0]
    for record in records[1:]:
        if (record["val_acc"] or 0.0) > (best["val_acc"] or 0.0):
            best = record
    return best


def train_run(
    spec: dict[str, Any],
    train: ImageDataset,
    val: ImageDataset,
    test: ImageDataset | None,
    *,
    ghn: LoadedGHN | None,
    pretrained: str | None,
    eval_batch_size: int,
    device: str = "cpu",
    progress: tqdm | None = None,
) -> dict[str, Any]:
    """Build, fine-tune and measure one run; return its record.

    ``spec["val_every"]`` sets how often ``val`` is measured. ``test`` is measured once after
    training when given; tuning runs pass ``None``.
    """
    settings = TrainSettings(**spec["settings"])
    started = time.perf_counter()
    model, init_info = build_model(
        spec["model"], spec["init"], num_classes=len(train.classes), image_size=settings.image_size,
        seed=spec["seed"], ghn=ghn, beta=settings.beta if settings.beta is not None else 0.0,
        start_layer=settings.start_layer, pretrained=pretrained, device=device,
    )

    def show(metrics) -> None:
        if progress is not None:
            progress.set_postfix_str(f"{spec['model']} {spec['init']} seed {spec['seed']} epoch {metrics.epoch}/{settings.epochs}")

    history = fine_tune(model, train, settings, seed=spec["seed"], val=val, val_every=spec["val_every"],
                        eval_batch_size=eval_batch_size, on_epoch=show)
    finished = len(history) == settings.epochs
    record = {
        **spec,
        "init_info": init_info,
        "num_params": sum(p.numel() for p in model.parameters()),
        "epochs": [dataclasses.asdict(m) for m in history],
        "diverged": not finished,
        "val_acc": history[-1].val_acc if finished else None,
        "test_acc": evaluate_model(model, test, settings.image_size, eval_batch_size) if test is not None else None,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    return record


def _load_or_train(
    spec: dict[str, Any], runs_dir: Path, data: StudyData, phase_test: ImageDataset | None, counts: dict[str, int],
    progress: tqdm, **kwargs: Any,
) -> dict[str, Any]:
    path = runs_dir / f"{spec['id']}.json"
    if path.is_file():
        counts["reused"] += 1
        progress.update(1)
        return json.loads(path.read_text())
    record = train_run(spec, data.train, data.val, phase_test, progress=progress, **kwargs)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    temporary.replace(path)
    counts["trained"] += 1
    progress.update(1)
    logger.info("%s %s seed %d (%s): val %s, test %s, %.0f s", spec["model"], spec["init"], spec["seed"],
                spec["phase"], record["val_acc"], record["test_acc"], record["seconds"])
    return record


def run_study(config: StudyConfig, ghn: LoadedGHN | None = None, progress: bool = True) -> StudyOutcome:
    """Run (or resume) the whole study and write the results, table and plots to ``config.output``.

    Args:
        config: the study's settings; checked first.
        ghn: the loaded GHN, required when ``ghn`` or ``ghn_orth`` is among the inits.
        progress: show a progress bar over runs on a terminal.

    Returns:
        The records of all tuning and final runs, the counts of trained and reused runs, and the
        written files.
    """
    from timm_ghn.study import report

    config.check()
    if ghn is None and {"ghn", "ghn_orth"} & set(config.inits):
        raise InvalidOptionError("the ghn and ghn_orth inits need a GHN; pass --ghn CHECKPOINT")
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output).expanduser()
    runs_dir = output / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)

    classes = config.classes or target_classes(config.data, ghn)
    data = load_study_data(config, classes, output)
    split_hash = _fingerprint(data.splits.to_dict())[:16]
    shared = {
        "split": split_hash,
        "test_size": len(data.test),
    }
    kwargs = {"ghn": ghn, "eval_batch_size": config.eval_batch_size, "device": config.device}

    total = sum(len(config.grid(m, i)) + len(config.seeds) for m in config.models for i in config.inits)
    counts = {"trained": 0, "reused": 0}
    records: list[dict[str, Any]] = []
    with tqdm(total=total, desc="study runs", unit="run", disable=None if progress else True) as bar:
        for model, init in itertools.product(config.models, config.inits):
            pretrained = config.pretrained.get(model) if init == "oracle" else None
            common = {"model": model, "init": init, **shared, "stored_size": config.stored_size, "pretrained": pretrained,
                      "ghn_sha256": ghn.sha256 if ghn is not None and init in ("ghn", "ghn_orth") else None}
            tuning = []
            for settings in config.grid(model, init):
                # Tuning runs measure the validation set once, after the last epoch.
                spec = {**common, "phase": "tune", "seed": config.seeds[0], "settings": settings.to_dict(),
                        "val_every": config.epochs}
                spec["id"] = run_id(spec)
                tuning.append(_load_or_train(spec, runs_dir, data, None, counts, bar, pretrained=pretrained, **kwargs))
            best = select_best(tuning)
            for seed in config.seeds:
                spec = {**common, "phase": "final", "seed": seed, "settings": best["settings"],
                        "val_every": config.val_every, "tuned_by": best["id"]}
                spec["id"] = run_id(spec)
                records.append(_load_or_train(spec, runs_dir, data, data.test, counts, bar, pretrained=pretrained, **kwargs))
            records.extend(tuning)

    files = report.write_reports(output, config, data, records)
    logger.info("study: %d runs trained, %d reused; results in %s", counts["trained"], counts["reused"], output)
    return StudyOutcome(records, counts["trained"], counts["reused"], output, files)
