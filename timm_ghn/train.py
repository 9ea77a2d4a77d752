"""Training a GHN-2 on an image dataset over sampled timm architectures (``timm-ghn pretrain``).

Each step draws a batch of architectures from a seeded pool (:mod:`timm_ghn.architectures`) and
predicts all their parameters with the GHN (:func:`timm_ghn.predict.predict_tensors`). Every
network classifies its own batch of augmented images through ``torch.func.functional_call``, and
the mean cross-entropy over the networks updates the GHN. The networks' BatchNorm layers use batch
statistics, since the GHN predicts no running statistics.

Checkpoints are a GHN file in the project's safetensors format (loadable by ``timm-ghn predict
--ghn``) and a sidecar ``.state.pt`` with the optimizer state and step, read back with
``torch.load(weights_only=True)`` to resume. The architectures of a step and its images depend
only on the seed, the step and the rank, so a resumed run draws the same batches as an
uninterrupted one.

Data-parallel training runs under ``torchrun``: every process draws its own architectures and
images, and ``DistributedDataParallel`` averages the GHN's gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import timm_ghn
from timm_ghn.architectures import FAMILIES, ArchitectureSampler, ArchitectureSpec, held_out_specs
from timm_ghn.data import ImageDataset, augment_batch, load_image_folder, normalize_batch
from timm_ghn.errors import InvalidOptionError
from timm_ghn.graph import Graph, build_graph
from timm_ghn.hypernet import GHN2, GHNConfig, load_ghn, save_ghn
from timm_ghn.predict import predict_tensors

__all__ = ["TrainConfig", "ArchitecturePool", "GHNLoss", "train", "add_parser", "run"]

logger = logging.getLogger(__name__)

STATE_SUFFIX = ".state.pt"
METADATA_PREFIX = "timm_ghn.training."


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run (see ``timm-ghn pretrain --help`` for units)."""

    data: str
    output: str
    classes: list[str] | None = None
    steps: int = 1000
    arch_batch: int = 8
    image_batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    param_penalty: float = 0.0
    image_size: int = 32
    hid: int = 32
    max_shape: tuple[int, int, int, int] = (64, 64, 7, 7)
    num_architectures: int = 1000
    families: list[str] | None = None
    min_params: int = 50_000
    max_params: int = 1_000_000
    checkpoint_every: int = 100
    val_every: int = 0
    val_images: int = 500
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    resume: bool = True
    stop_after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["max_shape"] = list(self.max_shape)
        return values


class ArchitecturePool:
    """A fixed, seeded list of sampled architectures with their graphs built on first use.

    Building a graph takes about 0.03 to 0.1 s per network on a CPU, so graphs are cached. Models
    are rebuilt at every use, because a pool of thousands of models would not fit in memory.
    """

    def __init__(self, sampler: ArchitectureSampler, count: int, num_classes: int, image_size: int, ve_cutoff: int,
                 seed: int = 0) -> None:
        self.specs = sampler.sample_many(count)
        self.seed = seed
        self.num_classes = num_classes
        self.image_size = image_size
        self.ve_cutoff = ve_cutoff
        self._graphs: dict[int, Graph] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def get(self, index: int) -> tuple[nn.Module, Graph]:
        """Return a freshly built model (BatchNorm with batch statistics) and its cached graph."""
        spec = self.specs[index]
        # Parameters the graph does not place keep this init, so it is seeded by the pool index:
        # equal in every use and independent of the global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            model = spec.build(self.num_classes, self.image_size)
        model.train().requires_grad_(False)
        if index not in self._graphs:
            self._graphs[index] = build_graph(model, (3, self.image_size, self.image_size), ve_cutoff=self.ve_cutoff)
        return model, self._graphs[index]


class GHNLoss(nn.Module):
    """The GHN with the training loss in ``forward``, so that ``DistributedDataParallel`` can wrap it.

    ``forward(models, graphs, images, labels)`` predicts the parameters of every model and runs
    ``images[i]`` through model ``i``. It returns the loss, the mean cross-entropy over the models
    and their mean top-1 accuracy (both detached). The loss is the mean cross-entropy plus
    ``param_penalty`` times the mean over models of the summed L2 norms of the predicted tensors.
    """

    def __init__(self, ghn: GHN2, label_smoothing: float = 0.1, param_penalty: float = 0.0) -> None:
        super().__init__()
        self.ghn = ghn
        self.label_smoothing = label_smoothing
        self.param_penalty = param_penalty

    def forward(
        self,
        models: Sequence[nn.Module],
        graphs: Sequence[Graph],
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = 0.0
        cross_entropy = torch.zeros(())
        correct = torch.zeros(())
        for model, graph, x, y in zip(models, graphs, images, labels):
            shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
            tensors = predict_tensors(self.ghn, graph, shapes, predict_classifier=True)
            logits = torch.func.functional_call(model, tensors, (x,), strict=False)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            cross_entropy = cross_entropy + loss.detach().cpu()
            correct = correct + (logits.argmax(1) == y).float().mean().detach().cpu()
            if self.param_penalty > 0:
                loss = loss + self.param_penalty * sum(t.norm() for t in tensors.values())
            total = total + loss
        count = len(models)
        return total / count, cross_entropy / count, correct / count


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Generator for one step's draws, a function of (seed, step, rank) only, so resuming repeats them."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def _check_config(config: TrainConfig) -> None:
    positive = {
        "steps": config.steps, "arch_batch": config.arch_batch, "image_batch": config.image_batch,
        "image_size": config.image_size, "num_architectures": config.num_architectures,
        "checkpoint_every": config.checkpoint_every,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidOptionError(f"invalid --{name.replace('_', '-')} {value!r}: expected an integer >= 1")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InvalidOptionError(f"invalid --lr {config.lr!r}: expected a finite number > 0")
    if not 0 <= config.label_smoothing < 1:
        raise InvalidOptionError(f"invalid --label-smoothing {config.label_smoothing!r}: expected a number in [0, 1)")
    if config.image_batch < 2:
        raise InvalidOptionError(f"invalid --image-batch {config.image_batch}: BatchNorm needs at least 2 images per batch")


def _distributed() -> tuple[int, int]:
    """Return (rank, world size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("TIMM_GHN_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def checkpoint_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """Return the GHN file and its training-state sidecar for an output path."""
    path = Path(output)
    return path, path.with_name(path.name + STATE_SUFFIX)


def _save_checkpoint(ghn: GHN2, optimizer: torch.optim.Optimizer, step: int, config: TrainConfig,
                     history: list[dict[str, float]], seconds: float, world: int) -> Path:
    ghn_path, state_path = checkpoint_paths(config.output)
    ghn_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        METADATA_PREFIX + "step": str(step),
        METADATA_PREFIX + "config": json.dumps(config.to_dict()),
        METADATA_PREFIX + "classes": json.dumps(config.classes or []),
        METADATA_PREFIX + "seconds": f"{seconds:.1f}",
        METADATA_PREFIX + "world_size": str(world),
        METADATA_PREFIX + "last_loss": f"{history[-1]['loss']:.4f}" if history else "",
        METADATA_PREFIX + "timm_version": __import__("timm").__version__,
        METADATA_PREFIX + "torch_version": torch.__version__,
        METADATA_PREFIX + "timm_ghn_version": timm_ghn.__version__,
    }
    save_ghn(ghn, ghn_path, metadata)
    state = {"step": step, "optimizer": optimizer.state_dict(), "seconds": seconds, "history": history,
             "config": json.dumps(config.to_dict())}
    temporary = state_path.with_name(f".{state_path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, state_path)
    logger.info("saved checkpoint at step %d to %s", step, ghn_path)
    return ghn_path


def _load_resume_state(ghn: GHN2, optimizer: torch.optim.Optimizer, config: TrainConfig) -> tuple[int, float, list]:
    """Load the GHN and optimizer of an earlier run into ``ghn`` and ``optimizer``; return (step, seconds, history)."""
    ghn_path, state_path = checkpoint_paths(config.output)
    if not (config.resume and ghn_path.is_file() and state_path.is_file()):
        return 0, 0.0, []
    loaded = load_ghn(ghn_path)
    if loaded.model.config != ghn.config:
        raise InvalidOptionError(
            f"cannot resume from {ghn_path}: its GHN config {loaded.model.config.to_dict()} differs from the "
            f"requested {ghn.config.to_dict()}; pass the same options or another --output"
        )
    ghn.load_state_dict(loaded.model.state_dict())
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming from %s at step %d", ghn_path, state["step"])
    return int(state["step"]), float(state["seconds"]), list(state["history"])


def _validation_score(ghn: GHN2, specs: Sequence[ArchitectureSpec], dataset: ImageDataset, config: TrainConfig,
                      num_classes: int) -> float:
    """Mean top-1 accuracy of the predicted parameters of ``specs`` on ``dataset`` (batch statistics)."""
    from timm_ghn.evaluate import predicted_accuracy

    was_training = ghn.training
    ghn.eval()
    scores = [predicted_accuracy(ghn, spec.build(num_classes, config.image_size), dataset,
                                 image_size=config.image_size, batch_size=config.image_batch)
              for spec in specs]
    ghn.train(was_training)
    return sum(scores) / len(scores)


def train(config: TrainConfig) -> GHN2:
    """Train a GHN-2 as configured, write checkpoints to ``config.output`` and return the GHN.

    With ``stop_after`` the run ends (with a checkpoint) after that many steps of this call, so a
    later call resumes it as if it had not stopped; the learning-rate schedule always spans
    ``steps``.

    Raises:
        DatasetError: the data path is missing, unreadable or contains no images.
        InvalidOptionError: an option is out of range, or a resumed run has another GHN config.
    """
    _check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world = _distributed()
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    dataset = load_image_folder(config.data, "train", config.classes, config.image_size)
    config.classes = list(dataset.classes)
    num_classes = len(dataset.classes)
    split = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
    val_count = min(config.val_images, len(dataset) // 10) if config.val_every else 0
    val_set = dataset.subset(split[:val_count]) if val_count else None
    train_set = dataset.subset(split[val_count:]) if val_count else dataset
    if len(train_set) < 2:
        raise InvalidOptionError(f"{config.data} has {len(train_set)} training images; at least 2 are needed")

    torch.manual_seed(config.seed)
    ghn_config = GHNConfig(max_shape=tuple(config.max_shape), num_classes=num_classes, hid=config.hid)
    ghn = GHN2(ghn_config).to(device).train()
    optimizer = torch.optim.AdamW(ghn.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, seconds, history = _load_resume_state(ghn, optimizer, config)

    sampler = ArchitectureSampler(config.families, config.min_params, config.max_params, num_classes,
                                  config.image_size, seed=config.seed)
    pool = ArchitecturePool(sampler, config.num_architectures, num_classes, config.image_size, ghn_config.ve_cutoff,
                            config.seed)
    val_specs = held_out_specs()
    logger.info("rank %d/%d: %d training images, %d classes, %d architectures, GHN of %d parameters",
                rank, world, len(train_set), num_classes, len(pool), sum(p.numel() for p in ghn.parameters()))

    module: nn.Module = GHNLoss(ghn, config.label_smoothing, config.param_penalty)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=config.steps, initial=start, desc="pretrain", unit="step", mininterval=10)
    end = config.steps if config.stop_after is None else min(config.steps, start + config.stop_after)
    for step in range(start, end):
        began = time.perf_counter()
        generator = _step_generator(config.seed, step, rank)
        indices = torch.randint(len(pool), (config.arch_batch,), generator=generator).tolist()
        models, graphs = zip(*(pool.get(i) for i in indices))
        images, labels = [], []
        for model in models:
            model.to(device)
            chosen = torch.randint(len(train_set), (config.image_batch,), generator=generator)
            images.append(normalize_batch(augment_batch(train_set.images[chosen], generator)).to(device))
            labels.append(train_set.labels[chosen].to(device))

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss, cross_entropy, accuracy = module(models, graphs, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ghn.parameters(), config.grad_clip)
        if torch.isfinite(norm):
            optimizer.step()
        else:
            logger.warning("step %d: non-finite gradient norm, update skipped (architectures %s)", step, indices)
        seconds += time.perf_counter() - began

        record = {"step": step + 1, "loss": float(cross_entropy), "accuracy": float(accuracy),
                  "seconds": time.perf_counter() - began}
        if val_set is not None and (step + 1) % config.val_every == 0 and rank == 0:
            record["val_accuracy"] = _validation_score(ghn, val_specs, val_set, config, num_classes)
            logger.info("step %d: validation top-1 %.2f%% over %d held-out architectures",
                        step + 1, 100 * record["val_accuracy"], len(val_specs))
        history.append(record)
        if progress is not None:
            step_seconds = record["seconds"]
            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                                 arch_s=f"{world * config.arch_batch / step_seconds:.2f}",
                                 img_s=f"{world * config.arch_batch * config.image_batch / step_seconds:.0f}")
            progress.update(1)
        if rank == 0 and ((step + 1) % config.checkpoint_every == 0 or step + 1 == end):
            recent = history[-config.checkpoint_every:]
            logger.info("step %d: loss %.4f, train top-1 %.3f, %.2f s/step", step + 1,
                        sum(r["loss"] for r in recent) / len(recent), sum(r["accuracy"] for r in recent) / len(recent),
                        sum(r["seconds"] for r in recent) / len(recent))
            _save_checkpoint(ghn, optimizer, step + 1, config, history, seconds, world)
    if progress is not None:
        progress.close()
    if world > 1:
        dist.barrier()
    if start >= config.steps and rank == 0:
        logger.info("%s is already at step %d of %d; nothing to do", config.output, start, config.steps)
    return ghn


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid integer list {text!r}: expected e.g. 64,64,7,7") from error


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``timm-ghn pretrain``."""
    defaults = TrainConfig(data="", output="")
    parser = subparsers.add_parser(
        "pretrain",
        help="train a GHN-2 on an ImageFolder dataset over sampled timm architectures",
        description="Train a GHN-2 on the train/ split of an ImageFolder directory or zip: every step samples "
        "architectures, predicts their parameters and updates the GHN by backpropagating the networks' "
        "classification loss. Resumes from OUTPUT and OUTPUT.state.pt when they exist. Launch with "
        "torchrun --nproc-per-node N for data-parallel training.",
    )
    parser.add_argument("data", metavar="DATA", help="ImageFolder directory or .zip with train/<class>/<image>")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="GHN checkpoint to write (.safetensors); its training state goes to FILE.state.pt")
    parser.add_argument("--classes", type=_name_list, default=None, metavar="A,B,...", help="classes to train on, in label order (default: all, sorted)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps in total (default: %(default)s)")
    parser.add_argument("--arch-batch", type=int, default=defaults.arch_batch, help="architectures per step and process (default: %(default)s)")
    parser.add_argument("--image-batch", type=int, default=defaults.image_batch, help="images per architecture (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (default: %(default)g)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)g)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps before the cosine decay (default: %(default)s)")
    parser.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio, help="final learning rate as a fraction of --lr (default: %(default)g)")
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="cross-entropy label smoothing (default: %(default)g)")
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="max L2 norm of the GHN's gradient (default: %(default)g)")
    parser.add_argument("--param-penalty", type=float, default=defaults.param_penalty, help="coefficient of the summed L2 norms of predicted tensors in the loss (default: %(default)g)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels; images are resized to it (default: %(default)s)")
    parser.add_argument("--hid", type=int, default=defaults.hid, help="GHN node embedding width (default: %(default)s)")
    parser.add_argument("--max-shape", type=_int_list, default=defaults.max_shape, metavar="K0,K1,S,S", help="largest block the GHN decodes (default: 64,64,7,7)")
    parser.add_argument("--num-architectures", type=int, default=defaults.num_architectures, help="size of the seeded pool of training architectures (default: %(default)s)")
    parser.add_argument("--families", type=_name_list, default=None, metavar="F,G,...", help=f"architecture families to sample (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--min-params", type=int, default=defaults.min_params, help="smallest sampled network, in parameters (default: %(default)s)")
    parser.add_argument("--max-params", type=int, default=defaults.max_params, help="largest sampled network, in parameters (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=defaults.val_every, help="steps between validations on held-out architectures; 0 disables (default: %(default)s)")
    parser.add_argument("--val-images", type=int, default=defaults.val_images, help="training images set aside for validation when --val-every > 0 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the architecture pool, the GHN init and the batches (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK (default: %(default)s)")
    parser.add_argument("--stop-after", type=int, default=None, help="end this run after N steps with a checkpoint, to resume later (default: run to --steps)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch even if OUTPUT exists (it is overwritten)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``timm-ghn pretrain`` from parsed arguments."""
    config = TrainConfig(
        data=args.data, output=args.output, classes=args.classes, steps=args.steps, arch_batch=args.arch_batch,
        image_batch=args.image_batch, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
        param_penalty=args.param_penalty, image_size=args.image_size, hid=args.hid,
        max_shape=tuple(args.max_shape), num_architectures=args.num_architectures, families=args.families,
        min_params=args.min_params, max_params=args.max_params, checkpoint_every=args.checkpoint_every,
        val_every=args.val_every, val_images=args.val_images, seed=args.seed, threads=args.threads,
        device=args.device, resume=args.resume, stop_after=args.stop_after,
    )
    if len(config.max_shape) != 4:
        raise InvalidOptionError(f"invalid --max-shape {args.max_shape}: expected four integers K0,K1,S,S")
    train(config)
    _, state_path = checkpoint_paths(config.output)
    step = torch.load(state_path, map_location="cpu", weights_only=True)["step"]
    print(f"{config.output}: GHN checkpoint at step {step} of {config.steps}")
    return 0
