"""Reading and writing GHN checkpoints without unpickling arbitrary objects.

Two formats are read:

* ppuda's ``torch.save`` dict ``{'state_dict', 'config', 'epoch', 'optimzer'}`` (GHN-1, GHN-2 and
  the MLP baseline), loaded with ``torch.load(weights_only=True)``;
* the project's safetensors form: the same tensors, with the config as JSON under the header
  metadata key ``timm_ghn.config`` and ``timm_ghn.format = ghn2``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from timm_ghn.errors import CheckpointError
from timm_ghn.hypernet.config import GHN3Config, GHNConfig, infer_ghn3_config
from timm_ghn.hypernet.network import GHN2, GHN3
from timm_ghn.hypernet.safe_pickle import load_joblib_state_dict

__all__ = ["LoadedGHN", "build_network", "file_sha256", "load_ghn", "save_ghn"]

logger = logging.getLogger(__name__)

FORMAT_KEY = "timm_ghn.format"
CONFIG_KEY = "timm_ghn.config"


@dataclasses.dataclass
class LoadedGHN:
    """A GHN in eval mode with where it came from."""

    model: GHN2
    name: str
    sha256: str
    path: Path | None


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        CheckpointError: ``path`` is missing or not a regular file.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"GHN checkpoint not found or not a file: {path}; pass the path of an existing file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < os.path.getsize(path)


def _read_ppuda(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(
            f"{path} is not a GHN checkpoint: unrecognised file format (first bytes {head!r}); expected a "
            f"torch.save archive in ppuda's format or a timm_ghn safetensors file"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols other than 2 before it rejects or reads the file.
            # The error below reports the outcome, so the warning would only add a second stderr line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"the Python global {found.group(1)}" if found else "Python objects"
        raise CheckpointError(
            f"refusing to load {path}: it references {what}, and only tensors and plain containers "
            f"are loaded (a GHN checkpoint never needs more); use a ppuda-format or safetensors GHN checkpoint"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read GHN checkpoint {path}: the file is truncated or corrupt ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); download or convert it again"
        ) from error
    if not isinstance(content, Mapping) or "state_dict" not in content or "config" not in content:
        found = sorted(content)[:8] if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(
            f"{path} is not a GHN checkpoint: expected a dict with 'state_dict' and 'config' "
            f"(ppuda format), found {found}"
        )
    state_dict = content["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is not a GHN checkpoint: 'state_dict' is not a mapping of tensors")
    config = content["config"]
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path} is not a GHN checkpoint: 'config' is {type(config).__name__}, not a dict")
    return dict(state_dict), dict(config)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read GHN checkpoint {path}: corrupt safetensors file ({error})") from error
    if metadata.get(FORMAT_KEY) not in ("ghn2", "ghn3") or CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a timm_ghn GHN checkpoint: its header has no "
            f"'{FORMAT_KEY}: ghn2' and '{CONFIG_KEY}' metadata; convert the GHN with timm-ghn"
        )
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: header metadata '{CONFIG_KEY}' is not valid JSON ({error})") from error
    return state_dict, config


#: Byte alignment of every loaded GHN tensor (that of torch's CPU allocator).
ALIGNMENT = 64

_GHN3_TABLES = ("centrality_embed_in.weight", "centrality_embed_out.weight", "input_dist_embed.weight")
_GHN2_DECODER_CONVS = ("decoder.conv.0.weight", "decoder.conv.2.weight", "decoder.class_layer_predictor.1.weight")


def _is_legacy_torch_save(path: Path) -> bool:
    """Return whether ``path`` is a legacy (non-zip) ``torch.save`` file, which starts with the pickled
    magic number ``0x1950a86a20f9469cfc6c``."""
    with open(path, "rb") as handle:
        head = handle.read(3)
    return head[:1] == b"\x80" and head[2:3] == b"\x8a"


def _infer_ghn2_config(shapes: Mapping[str, tuple[int, ...]]) -> GHNConfig:
    """Config of a config-less GHN-2 state dict (the Hub's ``ghn2.pt``), by the GHN-3 loader's rules."""
    side = math.isqrt(int(shapes["decoder.conv.2.weight"][0]))
    spatial = 11 if int(shapes["shape_enc.embed_spatial.weight"][0]) == 9 else 16
    return GHNConfig(
        max_shape=(side, side, spatial, spatial),
        num_classes=int(shapes["decoder.class_layer_predictor.1.weight"][0]),
        layernorm="ln.weight" in shapes,
        hid=int(shapes["embed.weight"][-1]),
    )


def _normalise_state_dict(state_dict: dict[str, torch.Tensor], config: GHNConfig) -> dict[str, torch.Tensor]:
    """Bring the key layouts of the released files to this package's module layout.

    GHN-3: the three graph-embedding tables may sit at top level (released files); they belong to
    the first Graphormer layer. GHN-2: the decoder's 1x1 convolutions may be stored as 2-D linear
    weights (the GHN-3 code's GHN-2 mode); they get two trailing unit dims.
    """
    state_dict = dict(state_dict)
    if isinstance(config, GHN3Config):
        for name in _GHN3_TABLES:
            if name in state_dict:
                state_dict[f"gnn.0.{name}"] = state_dict.pop(name)
    else:
        for name in _GHN2_DECODER_CONVS:
            if name in state_dict and state_dict[name].dim() == 2:
                state_dict[name] = state_dict[name][:, :, None, None]
    return state_dict


def _config_from_values(values: Mapping[str, Any]) -> GHNConfig:
    values = dict(values)
    is_ghn2 = values.pop("is_ghn2", None)
    if is_ghn2 is False or "layers" in values or "heads" in values:
        values.pop("pretrained", None)
        return GHN3Config.from_dict(values)
    return GHNConfig.from_dict(values)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], GHNConfig]:
    if _is_safetensors(path):
        state_dict, values = _read_safetensors(path)
        return state_dict, _config_from_values(values)
    with open(path, "rb") as handle:
        head = handle.read(1)
    if head == b"\x80" and not _is_legacy_torch_save(path):
        state_dict = load_joblib_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        if any("gnn.gru." in key for key in state_dict):
            return state_dict, _infer_ghn2_config(shapes)
        return state_dict, infer_ghn3_config(shapes)
    state_dict, values = _read_ppuda(path)
    return state_dict, _config_from_values(values)


def build_network(config: GHNConfig, device: str | torch.device = "meta") -> GHN2:
    """Construct the GHN class of ``config`` (:class:`GHN2` or :class:`GHN3`) on ``device``."""
    with torch.device(device):
        return GHN3(config) if isinstance(config, GHN3Config) else GHN2(config)


def load_ghn(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedGHN:
    """Load a GHN checkpoint in eval mode, without executing code from the file.

    Formats: ppuda's ``torch.save`` dict (GHN-1, GHN-2, MLP), the GHN-3 trainer's ``torch.save``
    dict, the released GHN-3 joblib container (``ghn3*.pt``, read by
    :mod:`timm_ghn.hypernet.safe_pickle`), and this package's safetensors form. The network is
    built on the meta device and takes the loaded tensors without copying them.

    Raises:
        CheckpointError: the file is missing, corrupt, references non-tensor objects, or its
            tensors do not match the configured network exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GHN checkpoint not found: {path}; pass the path of an existing file")
    state_dict, config = _read_checkpoint(path)
    state_dict = _normalise_state_dict(state_dict, config)

    model = build_network(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a GHN with config {config.to_dict()}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: tensor {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(expected[k].shape)} "
            f"for config {config.to_dict()}"
        )
    tensors = {k: _aligned_float(v) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval().requires_grad_(False).to(device)
    digest = file_sha256(path)
    logger.info("loaded %s %s (sha256 %s..., %s)", type(model).__name__, path.name, digest[:12], config.to_dict())
    return LoadedGHN(model=model, name=path.name, sha256=digest, path=path)


def _aligned_float(tensor: torch.Tensor) -> torch.Tensor:
    """Float32 tensor whose data starts on a 64-byte boundary (copied only when it does not).

    BLAS kernels may round differently for differently aligned inputs, so equal weights read from
    different files (a container and its converted safetensors) could predict slightly different
    tensors. torch's own allocations are 64-byte aligned, and so is every tensor returned here.
    """
    if tensor.dtype != torch.float32:
        return tensor.float()
    if tensor.data_ptr() % ALIGNMENT:
        return tensor.clone()
    return tensor


def save_ghn(model: GHN2, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a GHN as safetensors with its config in the header; the file appears atomically."""
    path = Path(path)
    kind = "ghn3" if isinstance(model.config, GHN3Config) else "ghn2"
    header = {FORMAT_KEY: kind, CONFIG_KEY: json.dumps(model.config.to_dict())}
    header.update(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=header)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
