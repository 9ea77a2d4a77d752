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
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from timm_ghn.errors import CheckpointError
from timm_ghn.hypernet.config import GHNConfig
from timm_ghn.hypernet.network import GHN2

__all__ = ["LoadedGHN", "load_ghn", "save_ghn", "file_sha256"]

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
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
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
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
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
    if metadata.get(FORMAT_KEY) != "ghn2" or CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a timm_ghn GHN checkpoint: its header has no "
            f"'{FORMAT_KEY}: ghn2' and '{CONFIG_KEY}' metadata; convert the GHN with timm-ghn"
        )
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: header metadata '{CONFIG_KEY}' is not valid JSON ({error})") from error
    return state_dict, config


def load_ghn(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedGHN:
    """Load a GHN-1/GHN-2 checkpoint (ppuda ``.pt`` or timm_ghn ``.safetensors``) in eval mode.

    Raises:
        CheckpointError: the file is missing, corrupt, holds non-tensor objects, or its tensors
            do not match the configured network exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GHN checkpoint not found: {path}; pass the path of an existing file")
    if _is_safetensors(path):
        state_dict, config_values = _read_safetensors(path)
    else:
        state_dict, config_values = _read_ppuda(path)

    config = GHNConfig.from_dict(config_values)
    model = GHN2(config)
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
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model.eval().requires_grad_(False).to(device)
    digest = file_sha256(path)
    logger.info("loaded GHN %s (sha256 %s..., %s)", path.name, digest[:12], config.to_dict())
    return LoadedGHN(model=model, name=path.name, sha256=digest, path=path)


def save_ghn(model: GHN2, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a GHN as safetensors with its config in the header; the file appears atomically."""
    path = Path(path)
    header = {FORMAT_KEY: "ghn2", CONFIG_KEY: json.dumps(model.config.to_dict())}
    header.update(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=header)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
