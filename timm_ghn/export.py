"""Writing an initialized model as a safetensors file that timm loads strictly.

The file holds exactly ``model.state_dict()`` (parameters and buffers, contiguous, no shared
storage), so ``timm.models.load_checkpoint(model, path, strict=True)`` — what timm's ``train.py
--initial-checkpoint`` calls — and ``pretrained_cfg_overlay={'file': path}`` both accept it. How
it was made is recorded as string metadata in the header under ``timm_ghn.*`` keys.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from timm_ghn.errors import OutputPathError

__all__ = ["METADATA_PREFIX", "check_output_path", "read_metadata", "save_state_dict"]

METADATA_PREFIX = "timm_ghn."


def check_output_path(path: Path) -> Path:
    """Return the directory of ``path`` after checking that a file can be written there.

    Raises:
        OutputPathError: the directory is missing, is not a directory or is not writable, or
            ``path`` is itself a directory.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise OutputPathError(f"cannot write {path}: {directory} is not a directory; choose another -o path")
    if not directory.is_dir():
        raise OutputPathError(f"output directory does not exist: {directory}; create it or choose another -o path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory is not writable: {directory}; choose another -o path")
    if path.is_dir():
        raise OutputPathError(f"output path is a directory: {path}; give a file name such as {path / 'init.safetensors'}")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # The file is written elsewhere and renamed over the path, which would replace a device,
        # a FIFO or a symbolic link itself rather than write through it.
        raise OutputPathError(f"output path exists and is not a regular file: {path}; choose another -o path")
    return directory


def save_state_dict(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write ``model.state_dict()`` to ``path`` as safetensors with ``metadata`` in the header.

    The tensors are copied to CPU and made contiguous; tied parameters are stored once per name.
    The file is written to a temporary file in the same directory and renamed, so a failed or
    interrupted write never leaves a partial file at ``path``.

    Raises:
        OutputPathError: see :func:`check_output_path`, or the write failed.
    """
    path = Path(path).expanduser()
    directory = check_output_path(path)

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        # Copy only what safetensors cannot write as is: GPU tensors, strided views and tensors
        # that share storage with one already listed (tied weights). The rest is written in place.
        storage = tensor.untyped_storage().data_ptr() if tensor.device.type == "cpu" else None
        if storage is None or storage in storages or not tensor.is_contiguous():
            tensor = tensor.to("cpu", copy=True).contiguous()
            storage = tensor.untyped_storage().data_ptr()
        storages.add(storage)
        tensors[name] = tensor
    header = {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}}

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        _sort_header_metadata(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        raise OutputPathError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _sort_header_metadata(path: str) -> None:
    """Rewrite a safetensors header in place with its metadata keys in sorted order.

    safetensors 0.8 writes the metadata from a Rust hash map, so the key order, and with it the
    file's bytes, differ between processes. The header is compact JSON padded with spaces to a
    multiple of 8 bytes, and the sorted JSON has the same length, so it overwrites the old one.
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            return
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        if len(text) > length:
            # NOTE: only reachable if Python's JSON escaping is longer than serde_json's. The file
            # is then left valid, but with the metadata in hash-map order.
            return
        handle.seek(8)
        handle.write(text.ljust(length, b" "))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the header metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def encode_json(value: object) -> str:
    """JSON text with sorted keys, for metadata values that are not plain strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
