"""Writing an initialized model as a safetensors file that timm loads strictly.

The file holds exactly ``model.state_dict()`` (parameters and buffers, contiguous, no shared
storage), so ``timm.models.load_checkpoint(model, path, strict=True)`` — what timm's ``train.py
--initial-checkpoint`` calls — and ``pretrained_cfg_overlay={'file': path}`` both accept it. How
it was made is recorded as string metadata in the header under ``timm_ghn.*`` keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from timm_ghn.errors import OutputPathError

__all__ = ["METADATA_PREFIX", "read_metadata", "save_state_dict"]

METADATA_PREFIX = "timm_ghn."


def _check_writable_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise OutputPathError(f"output directory does not exist: {directory}; create it or choose another -o path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory is not writable: {directory}; choose another -o path")


def save_state_dict(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write ``model.state_dict()`` to ``path`` as safetensors with ``metadata`` in the header.

    The tensors are copied to CPU and made contiguous; tied parameters are stored once per name.
    The file is written to a temporary file in the same directory and renamed, so a failed or
    interrupted write never leaves a partial file at ``path``.

    Raises:
        OutputPathError: the directory is missing or not writable.
    """
    path = Path(path).expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    _check_writable_directory(directory)
    if path.is_dir():
        raise OutputPathError(f"output path is a directory: {path}; give a file name such as {path / 'init.safetensors'}")

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    header = {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}}

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        raise OutputPathError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the header metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def encode_json(value: object) -> str:
    """JSON text with sorted keys, for metadata values that are not plain strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
