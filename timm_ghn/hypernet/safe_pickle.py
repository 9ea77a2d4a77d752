"""Reading the released GHN-3 container (a joblib pickle of a state dict) without running its code.

The released ``ghn3*.pt`` files are one plain pickle stream (protocol 4) written by
``joblib.dump(state_dict)``. Each tensor is rebuilt by ``torch._utils._rebuild_tensor_v2`` from a
storage that ``torch.storage._load_from_bytes`` reads from a nested legacy ``torch.save`` stream.
A normal unpickler imports and calls whatever globals the stream names, and the real
``_load_from_bytes`` runs an unrestricted ``torch.load``. This module instead allows exactly these
globals and implements each of them itself:

* ``collections.OrderedDict``;
* ``torch._utils._rebuild_tensor_v2`` and ``torch._utils._rebuild_parameter``;
* ``torch.storage._load_from_bytes``, parsed here: five small pickles (magic number, protocol
  version, system info, the storage as a persistent id, the list of storage keys) followed by each
  storage's raw little-endian data (int64 element count, then the elements);
* ``torch.<Type>Storage`` inside the nested stream, for the storage dtypes below.

Any other global raises :class:`~timm_ghn.errors.CheckpointError` naming it; nothing is imported
or called. The file is memory-mapped copy-on-write and tensors alias the mapping where their data starts on a
64-byte boundary (pages are read on first use). Other tensors are copied and their mapped pages
released, so loading holds about one copy of the weights.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from timm_ghn.errors import CheckpointError

__all__ = ["STORAGE_DTYPES", "load_joblib_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: Storage classes a nested stream may name, and their element types.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Tensors whose data starts on this byte boundary alias the mapping; others are copied (torch's
# CPU allocator aligns to 64 bytes, so every tensor gets the alignment of a fresh allocation).
_ALIGNMENT = 64

# Reads at least this long return a view of the mapped file instead of a copy.
_ZERO_COPY_BYTES = 1 << 16


class _MappedReader(io.RawIOBase):
    """File-like reader over a memory map whose large reads return memoryviews (no copy)."""

    def __init__(self, mapping: mmap.mmap) -> None:
        super().__init__()
        self.mapping = mapping
        self._view = memoryview(mapping)
        self._position = 0
        self.offsets: dict[int, int] = {}

    def read(self, size: int = -1):  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        chunk = self._view[self._position : end]
        start, self._position = self._position, end
        if len(chunk) < _ZERO_COPY_BYTES:
            return chunk.tobytes()
        self.offsets[id(chunk)] = start
        return chunk

    def readline(self, size: int = -1) -> bytes:  # type: ignore[override]
        start = self._position
        limit = len(self._view) if size is None or size < 0 else min(len(self._view), start + size)
        end = start
        while end < limit and self._view[end] != 0x0A:
            end += 1
        end = min(limit, end + 1)
        self._position = end
        return self._view[start:end].tobytes()

    def readinto(self, buffer) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def peek(self, size: int = 1) -> bytes:
        return self._view[self._position : self._position + max(size, 1)].tobytes()


class _StorageRecord:
    """Persistent id of a storage in a nested stream: element type, key and element count."""

    def __init__(self, dtype: torch.dtype, key: str, numel: int) -> None:
        self.dtype = dtype
        self.key = key
        self.numel = numel


def _reject(module: str, name: str, where: str) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {where}: its pickle references the global {module}.{name}, which is not "
        f"one of the few tensor and container globals a GHN checkpoint needs; the file was not executed"
    )


class _NestedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler of the small pickles inside a nested storage stream."""

    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise _reject(module, name, self._where)

    def persistent_load(self, pid: Any) -> _StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointError(f"{self._where}: unexpected storage reference {pid!r} in a nested tensor stream")
        return _StorageRecord(pid[1], str(pid[2]), int(pid[4]))


def _load_storage(blob, where: str, reader: _MappedReader | None = None) -> torch.Tensor:
    """Parse one nested legacy ``torch.save`` stream of a single storage into a 1-D tensor.

    The tensor aliases ``blob`` when its data starts on a 64-byte boundary. Otherwise it is
    copied, and when ``blob`` is a view of ``reader``'s memory map the mapped pages of that range
    are released, so the file's data is held once either way.
    """
    view = memoryview(blob)
    header_size = min(len(view), 4096)
    while True:
        stream = io.BytesIO(view[:header_size].tobytes())
        try:
            unpickler = lambda: _NestedUnpickler(stream, where).load()  # noqa: E731
            magic = unpickler()
            protocol = unpickler()
            unpickler()  # system info: byte order and type sizes of the writer
            record = unpickler()
            keys = unpickler()
            break
        except (EOFError, pickle.UnpicklingError, struct.error):
            if header_size >= len(view):
                raise CheckpointError(f"{where}: a nested tensor stream is truncated or corrupt") from None
            header_size = min(len(view), header_size * 4)
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{where}: a nested tensor stream has magic {magic!r} and protocol {protocol!r}, not torch's legacy format")
    if not isinstance(record, _StorageRecord) or keys != [record.key]:
        raise CheckpointError(f"{where}: a nested tensor stream does not hold exactly one storage")

    offset = stream.tell()
    (count,) = struct.unpack_from("<q", view, offset)
    offset += 8
    itemsize = torch.empty((), dtype=record.dtype).element_size()
    if count != record.numel or offset + count * itemsize > len(view):
        raise CheckpointError(f"{where}: a storage of {record.numel} elements is truncated (header says {count})")
    if count == 0:
        return torch.empty(0, dtype=record.dtype)
    with warnings.catch_warnings():
        # A small blob is a read-only bytes copy; a large one a view of a copy-on-write mapping.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(view, dtype=record.dtype, count=count, offset=offset)
    if tensor.data_ptr() % _ALIGNMENT == 0:
        return tensor
    base = reader.offsets.get(id(blob)) if reader is not None else None
    return _copy_releasing_pages(tensor, reader.mapping if base is not None else None, (base or 0) + offset)


def _copy_releasing_pages(source: torch.Tensor, mapping: mmap.mmap | None, file_offset: int) -> torch.Tensor:
    """Copy ``source`` (a view of ``mapping`` at ``file_offset``) in 64 MiB chunks, releasing the
    mapped pages of each chunk once it is copied, so the data is never held twice."""
    copy = torch.empty_like(source)
    itemsize = source.element_size()
    step = max(1, (64 << 20) // itemsize)
    for start in range(0, source.numel(), step):
        stop = min(source.numel(), start + step)
        copy[start:stop] = source[start:stop]
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            # Whole pages only; a page shared with a neighbour is re-read from the file when used.
            first = -(-(file_offset + start * itemsize) // mmap.PAGESIZE) * mmap.PAGESIZE
            last = (file_offset + stop * itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
    return copy


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("a tensor in the checkpoint is rebuilt from something that is not a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data: torch.Tensor, requires_grad=False, hooks=None):
    return data


class _OuterUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler of the joblib stream with its allowlist of globals."""

    def __init__(self, file: _MappedReader, where: str) -> None:
        super().__init__(file)
        self._where = where
        self._reader = file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda blob: _load_storage(blob, self._where, self._reader)
        raise _reject(module, name, self._where)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._where}: unexpected persistent reference {pid!r}; not a joblib GHN file")


def load_joblib_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a joblib-pickled GHN state dict with the allowlist above.

    Returns:
        The name -> tensor mapping, tensors on CPU aliasing a copy-on-write memory map of the file.

    Raises:
        CheckpointError: compressed joblib file, a disallowed global, a truncated stream, or a
            result that is not a mapping of names to tensors.
    """
    path = Path(path)
    where = str(path)
    with open(path, "rb") as handle:
        first = handle.read(1)
        if first in (b"\x78",) or first == b"":
            raise CheckpointError(
                f"cannot read {path}: {'empty file' if not first else 'a compressed joblib file'}; "
                f"only uncompressed joblib pickles (the released GHN-3 format) are read"
            )
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        content = _OuterUnpickler(_MappedReader(mapping), where).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, IndexError, KeyError) as error:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt pickle ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise CheckpointError(f"{path} is not a GHN state dict: expected a mapping of names to tensors, found {type(content).__name__}")
    return dict(content)
