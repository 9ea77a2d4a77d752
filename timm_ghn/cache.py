"""A local cache of predicted initializations, keyed by everything that determines the tensors.

A request (:class:`InitRequest`) names a timm model, its constructor arguments, the GHN checkpoint
and the method with its options. Its key is the SHA-256 of a JSON document with these fields:

* ``format``: :data:`CACHE_FORMAT_VERSION`, raised whenever the file layout, the meaning of a
  field or the prediction rules change, so older entries are never served for a newer request;
* ``model_name`` and ``model_kwargs`` (sorted JSON, without ``pretrained``);
* ``architecture``: the SHA-256 of the ordered list of ``model.state_dict()`` names, shapes and
  safetensors dtypes, read from the model built on the ``meta`` device;
* ``ghn_sha256``: the SHA-256 of the GHN checkpoint file;
* ``method`` and ``options``: β, the resolved start layer L and the variant for ``ghn_orth``
  (``null`` for ``ghn``, which ignores them), and ``predict_classifier`` as requested;
* ``seed``.

The device, the checkpoint's path and the timm and torch versions are not part of the key.

Entries live flat in :func:`default_cache_dir` as ``MODEL-METHOD-KEY.safetensors``, with lock
files under ``.locks/``. Every entry is checked before use: its header, tensor names, shapes,
dtypes, data length and the key in its metadata. A damaged entry is logged, removed and rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import timm
import torch
from filelock import FileLock, Timeout
from huggingface_hub import constants as hf_constants

from timm_ghn.errors import InvalidOptionError, TimmGhnError
from timm_ghn.export import METADATA_PREFIX, encode_json
from timm_ghn.hypernet.checkpoint import LoadedGHN, file_sha256
from timm_ghn.options import InitOptions, with_overrides
from timm_ghn.pipeline import DEFAULT_GHN, GHN_ENV, check_model_name, resolve_ghn
from timm_ghn.postprocess import default_start_layer, weight_modules
from timm_ghn.registry import download_named_ghn, is_named_ghn

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT_VERSION",
    "CacheEntry",
    "CacheEntryError",
    "InitRequest",
    "KEY_METADATA",
    "LocalCache",
    "default_cache_dir",
    "make_request",
    "read_header",
    "validate_entry",
]

logger = logging.getLogger(__name__)

#: Version of the cache layout, the key fields and the prediction rules; part of every key.
#: Raise it also when the graph or decoding rules change the tensors a key stands for. Version 2:
#: the graph places layer scales, tokens, position tables, other norms and convolutions.
CACHE_FORMAT_VERSION = 2

#: Environment variable that overrides the cache directory.
CACHE_ENV = "TIMM_GHN_CACHE"

#: Header metadata that stores an entry's key, its format version and its class count.
KEY_METADATA = METADATA_PREFIX + "cache_key"
FORMAT_METADATA = METADATA_PREFIX + "cache_format"
NUM_CLASSES_METADATA = METADATA_PREFIX + "num_classes"

# safetensors dtype codes and their item sizes in bytes.
_SAFETENSORS_DTYPES = {
    torch.float64: ("F64", 8),
    torch.float32: ("F32", 4),
    torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 2),
    torch.int64: ("I64", 8),
    torch.int32: ("I32", 4),
    torch.int16: ("I16", 2),
    torch.int8: ("I8", 1),
    torch.uint8: ("U8", 1),
    torch.bool: ("BOOL", 1),
}
_ITEM_SIZES = dict(_SAFETENSORS_DTYPES.values())

# A safetensors header larger than this is treated as damage, not read.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CacheEntryError(TimmGhnError, ValueError):
    """A cached or downloaded file is not a valid entry for the request it was looked up for."""


def default_cache_dir() -> Path:
    """Return ``$TIMM_GHN_CACHE``, else ``$HF_HOME/timm_ghn`` (``~/.cache/huggingface/timm_ghn``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(hf_constants.HF_HOME).expanduser() / "timm_ghn"


def safe_model_name(model_name: str) -> str:
    """Return ``model_name`` usable as a file name (``/`` and ``:`` of hub names become ``_``)."""
    return model_name.replace("/", "_").replace(":", "_")


# --- the request and its key ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The ordered ``(name, shape, safetensors dtype)`` of a model's state dict, and its digest."""

    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    digest: str
    num_classes: int
    num_weight_layers: int

    @functools.cached_property
    def header_entries(self) -> dict[str, tuple[str, list[int], int]]:
        """Each tensor's expected safetensors header values: dtype, shape and size in bytes."""
        entries = {}
        for name, shape, dtype in self.tensors:
            numel = 1
            for dim in shape:
                numel *= dim
            entries[name] = (dtype, list(shape), numel * _ITEM_SIZES[dtype])
        return entries


@dataclasses.dataclass(frozen=True)
class InitRequest:
    """Everything that determines an initialization's tensors, and the cache key derived from it."""

    model_name: str
    model_kwargs: Mapping[str, Any]
    method: str
    ghn_sha256: str
    beta: float | None
    start_layer: int | None
    variant: str | None
    seed: int
    predict_classifier: bool | None
    architecture: Architecture

    def key_fields(self) -> dict[str, Any]:
        """Return the JSON document whose SHA-256 is :attr:`key`."""
        return {
            "format": CACHE_FORMAT_VERSION,
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "architecture": self.architecture.digest,
            "ghn_sha256": self.ghn_sha256,
            "method": self.method,
            "options": {
                "beta": self.beta,
                "start_layer": self.start_layer,
                "variant": self.variant,
                "predict_classifier": "auto" if self.predict_classifier is None else self.predict_classifier,
            },
            "seed": self.seed,
        }

    @functools.cached_property
    def key(self) -> str:
        """The cache key: hex SHA-256 of :meth:`key_fields` as sorted, compact JSON."""
        return hashlib.sha256(encode_json(self.key_fields()).encode()).hexdigest()

    @property
    def filename(self) -> str:
        """The entry's file name, ``MODEL-METHOD-KEY.safetensors``."""
        return f"{safe_model_name(self.model_name)}-{self.method}-{self.key}.safetensors"

    def metadata(self) -> dict[str, str]:
        """Header metadata that marks a file as this request's cache entry."""
        return {
            KEY_METADATA: self.key,
            FORMAT_METADATA: str(CACHE_FORMAT_VERSION),
            NUM_CLASSES_METADATA: str(self.architecture.num_classes),
        }


_ARCHITECTURES: dict[tuple[str, str], Architecture] = {}
_GHN_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_NAMED_GHN_FILES: dict[str, Path] = {}


def architecture_of(model_name: str, model_kwargs: Mapping[str, Any]) -> Architecture:
    """Return the state-dict layout of ``timm.create_model(model_name, **model_kwargs)``.

    The model is built on the ``meta`` device, so no weights are allocated; results are kept for
    the life of the process.
    """
    memo_key = (model_name, encode_json(dict(model_kwargs)))
    cached = _ARCHITECTURES.get(memo_key)
    if cached is not None:
        return cached

    check_model_name(model_name)
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    except TypeError as error:
        raise InvalidOptionError(f"timm cannot build {model_name!r} with {dict(model_kwargs)}: {error}") from error

    tensors = []
    for name, tensor in model.state_dict().items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InvalidOptionError(f"{model_name}: tensor {name} has dtype {tensor.dtype}, which the cache cannot store")
        tensors.append((name, tuple(tensor.shape), _SAFETENSORS_DTYPES[tensor.dtype][0]))
    digest = hashlib.sha256(json.dumps(tensors, separators=(",", ":")).encode()).hexdigest()
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        num_classes = int(model_kwargs.get("num_classes", 1000))
    architecture = Architecture(tuple(tensors), digest, num_classes, len(weight_modules(model)))
    _ARCHITECTURES[memo_key] = architecture
    return architecture


def ghn_digest(ghn: str | os.PathLike | LoadedGHN | None) -> tuple[str, str | os.PathLike | LoadedGHN]:
    """Return the SHA-256 of a GHN checkpoint and the value to pass on to the prediction.

    A path, or the name of a released GHN (see :mod:`timm_ghn.registry`), is hashed without
    loading the network, and the digest is kept for the life of the process while the file's
    device, inode, size and modification time stay the same. ``None`` means
    ``$TIMM_GHN_CHECKPOINT``, else the bundled :data:`timm_ghn.pipeline.DEFAULT_GHN`, as in
    :func:`timm_ghn.pipeline.resolve_ghn`.
    """
    if isinstance(ghn, LoadedGHN):
        return ghn.sha256, ghn
    if ghn is None:
        ghn = os.environ.get(GHN_ENV) or None
    if ghn is None:
        if not DEFAULT_GHN.is_file():
            # resolve_ghn raises the project's error for a missing bundled GHN, with the fix.
            loaded = resolve_ghn(None)
            return loaded.sha256, loaded
        ghn = str(DEFAULT_GHN)

    path = os.path.expanduser(ghn)
    if isinstance(ghn, str) and is_named_ghn(ghn) and not os.path.exists(path):
        # A released GHN's name: hash its file in the Hugging Face cache instead of loading the
        # network, and pass that file on to the prediction.
        if ghn not in _NAMED_GHN_FILES:
            _NAMED_GHN_FILES[ghn] = download_named_ghn(ghn)
        path = ghn = str(_NAMED_GHN_FILES[ghn])
    try:
        stat = os.stat(path)
    except OSError:
        # load_ghn raises the project's error for a missing checkpoint, with the fix.
        loaded = resolve_ghn(path)
        return loaded.sha256, loaded
    memo_key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    digest = _GHN_DIGESTS.get(memo_key)
    if digest is None:
        digest = file_sha256(path)
        _GHN_DIGESTS[memo_key] = digest
    return digest, ghn


def make_request(
    model_name: str, options: InitOptions | None = None, **fields: Any
) -> tuple[InitRequest, str | os.PathLike | LoadedGHN]:
    """Build the :class:`InitRequest` for the arguments of :func:`timm_ghn.initialize_model`.

    ``options`` and ``fields`` are those of :func:`timm_ghn.initialize_model`. The device and
    ``require_coverage`` are not part of the key. Returns the request and the GHN to predict with
    (a path or a loaded GHN).

    Raises:
        InvalidOptionError: an option is out of range, or ``model_kwargs`` is not JSON-serializable.
        UnknownModelError: timm does not know ``model_name``.
    """
    # The same checks and messages as initialize_model, before any work on the key.
    options = with_overrides(options, fields)
    kwargs = options.timm_kwargs
    try:
        kwargs = json.loads(encode_json(kwargs))
    except (TypeError, ValueError) as error:
        raise InvalidOptionError(
            f"model kwargs {kwargs!r} are not JSON-serializable, so they cannot be part of a cache key; "
            "pass use_cache=False (CLI: --no-cache)"
        ) from error

    architecture = architecture_of(model_name, kwargs)
    digest, ghn_value = ghn_digest(options.ghn)
    if options.method == "ghn_orth":
        start_layer = options.start_layer
        if start_layer is None:
            start_layer = default_start_layer(architecture.num_weight_layers, model_name, options.variant)
        # Layers are numbered from 1, and 0 means the same as 1, so both give one key.
        start_layer = max(1, int(start_layer))
        orth_options = {"beta": float(options.beta), "start_layer": start_layer, "variant": options.variant}
    else:
        orth_options = {"beta": None, "start_layer": None, "variant": None}
    request = InitRequest(
        model_name=model_name,
        model_kwargs=kwargs,
        method=options.method,
        ghn_sha256=digest,
        seed=options.seed,
        predict_classifier=options.predict_classifier,
        architecture=architecture,
        **orth_options,
    )
    return request, ghn_value


# --- checking a file ----------------------------------------------------------------------------


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """Return the raw JSON header of a safetensors file and the file's size in bytes."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CacheEntryError(f"{path} is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise CacheEntryError(f"{path}: header length {length} exceeds the file size {size}")
        return handle.read(length), size


def _parse_header(path: Path, text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheEntryError(f"{path}: the safetensors header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise CacheEntryError(f"{path}: the safetensors header is not a JSON object")
    return header


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Return the JSON header of a safetensors file and the number of data bytes after it.

    Raises:
        CacheEntryError: the file is shorter than its header, or the header is not a JSON object.
    """
    path = Path(path)
    text, size = _read_header_bytes(path)
    return _parse_header(path, text), size - 8 - len(text)


# Key -> (raw header, file size) of the last file that passed validate_entry in this process. A
# file with the same header bytes and size passes the same checks, so they are not repeated.
_VALIDATED: dict[str, tuple[bytes, int]] = {}


def validate_entry(path: str | os.PathLike, request: InitRequest) -> None:
    """Check that ``path`` is a complete cache entry for ``request``, reading only its header.

    Raises:
        CacheEntryError: naming the first problem found (header, key, tensor names, shapes,
            dtypes, or a data section shorter or longer than the header describes).
    """
    path = Path(path)
    text, size = _read_header_bytes(path)
    if _VALIDATED.get(request.key) == (text, size):
        return
    header = _parse_header(path, text)
    data_bytes = size - 8 - len(text)
    metadata = header.pop("__metadata__", None) or {}
    found_key = metadata.get(KEY_METADATA)
    if found_key != request.key:
        raise CacheEntryError(f"{path}: metadata key {found_key!r} does not match the request key {request.key}")

    expected = request.architecture.header_entries
    # Equal sizes and every expected name present means equal name sets (JSON keys are unique).
    if len(header) != len(expected) or any(name not in header for name in expected):
        missing = sorted(set(expected) - set(header))
        unexpected = sorted(set(header) - set(expected))
        raise CacheEntryError(f"{path}: tensor names differ from {request.model_name}'s state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")

    end = 0
    for name, (dtype, shape, nbytes) in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            raise CacheEntryError(f"{path}: tensor {name} is {entry!r}, expected dtype {dtype} and shape {shape}")
        begin, stop = entry["data_offsets"]
        if stop - begin != nbytes:
            raise CacheEntryError(f"{path}: tensor {name} spans {stop - begin} bytes, expected {nbytes}")
        if stop > end:
            end = stop
    if end != data_bytes:
        raise CacheEntryError(f"{path}: the data section is {data_bytes} bytes but the header describes {end} (truncated or padded file)")
    _VALIDATED[request.key] = (text, size)


def atomic_copy(source: str | os.PathLike, destination: Path) -> Path:
    """Copy ``source`` to ``destination`` through a temporary file in the same directory and a rename.

    Readers see the old file or the whole new one, never a partial copy.
    """
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return destination


# --- the local store ----------------------------------------------------------------------------


@dataclasses.dataclass
class CacheEntry:
    """One file in the cache directory, described by its header metadata."""

    path: Path
    size: int
    key: str | None
    metadata: dict[str, str]
    error: str | None = None

    @property
    def model_name(self) -> str:
        return self.metadata.get(METADATA_PREFIX + "model_name", "?")

    @property
    def method(self) -> str:
        return self.metadata.get(METADATA_PREFIX + "method", "?")


class LocalCache:
    """The cache directory: lookup with checks, atomic stores, a lock per key, listing and removal."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise TimmGhnError(f"the cache directory {self.root} is not a directory; set {CACHE_ENV} to a directory")

    def path_for(self, request: InitRequest) -> Path:
        """Return where the entry for ``request`` is stored (whether or not it exists)."""
        return self.root / request.filename

    def ensure_root(self) -> None:
        """Create the cache directory and its ``.locks`` folder if they are missing."""
        if self.root.exists() and not self.root.is_dir():
            raise TimmGhnError(f"the cache directory {self.root} is not a directory; set {CACHE_ENV} to a directory")
        try:
            (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TimmGhnError(
                f"cannot create the cache directory {self.root}: {error.strerror or error}; "
                f"set {CACHE_ENV} to a writable directory"
            ) from error

    def lookup(self, request: InitRequest) -> Path | None:
        """Return the checked entry for ``request``, or ``None``; a damaged entry is logged and removed."""
        path = self.path_for(request)
        try:
            validate_entry(path, request)
        except FileNotFoundError:
            return None
        except CacheEntryError as error:
            logger.warning("removing damaged cache entry %s (key %s): %s; it will be rebuilt", path, request.key[:12], error)
            path.unlink(missing_ok=True)
            return None
        except OSError as error:
            raise TimmGhnError(
                f"cannot read cache entry {path}: {error.strerror or error}; fix its permissions, remove it, "
                f"or set {CACHE_ENV} to another directory"
            ) from error
        logger.info("cache hit for %s %s (key %s): %s", request.model_name, request.method, request.key[:12], path)
        return path

    @contextmanager
    def lock(self, request: InitRequest) -> Iterator[None]:
        """Hold the lock for ``request``'s key, so concurrent processes predict it once."""
        self.ensure_root()
        lock = FileLock(str(self.root / ".locks" / f"{request.key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process that builds key %s (lock %s)", request.key[:12], lock.lock_file)
            start = time.perf_counter()
            lock.acquire()
            logger.info("lock for key %s acquired after %.1f s", request.key[:12], time.perf_counter() - start)
        try:
            yield
        finally:
            lock.release()

    def store_file(self, request: InitRequest, source: str | os.PathLike) -> Path:
        """Copy a file that is a valid entry for ``request`` into the cache atomically.

        Raises:
            CacheEntryError: ``source`` is not a valid entry for ``request``.
        """
        validate_entry(source, request)
        self.ensure_root()
        path = atomic_copy(source, self.path_for(request))
        logger.info("stored %s %s (key %s) in the cache: %s", request.model_name, request.method, request.key[:12], path)
        return path

    def entries(self) -> list[CacheEntry]:
        """Return every ``*.safetensors`` file in the cache, sorted by name, with its metadata."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*.safetensors")):
            size = path.stat().st_size
            try:
                header, _ = read_header(path)
            except (CacheEntryError, OSError) as error:
                found.append(CacheEntry(path, size, None, {}, error=str(error)))
                continue
            metadata = header.get("__metadata__") or {}
            key = metadata.get(KEY_METADATA)
            error = None if key and path.name.endswith(f"-{key}.safetensors") else "no cache key matching the file name"
            found.append(CacheEntry(path, size, key, dict(metadata), error=error))
        return found

    def find(self, key_prefix: str) -> CacheEntry:
        """Return the one entry whose key starts with ``key_prefix``.

        Raises:
            TimmGhnError: no entry, or several entries, match.
        """
        matches = [entry for entry in self.entries() if entry.key and entry.key.startswith(key_prefix.lower())]
        if not matches:
            raise TimmGhnError(f"no cache entry with key {key_prefix!r} in {self.root}; run `timm-ghn cache list`")
        if len(matches) > 1:
            raise TimmGhnError(f"key prefix {key_prefix!r} matches {len(matches)} cache entries; give more characters")
        return matches[0]

    def clear(self, key_prefixes: list[str] | None = None) -> list[CacheEntry]:
        """Remove the given entries (every entry, lock and temporary file if ``None``); return the removed entries."""
        if key_prefixes:
            removed = [self.find(prefix) for prefix in key_prefixes]
        else:
            removed = self.entries()
        for entry in removed:
            entry.path.unlink(missing_ok=True)
            logger.info("removed cache entry %s", entry.path)
        if not key_prefixes and self.root.is_dir():
            shutil.rmtree(self.root / ".locks", ignore_errors=True)
            for leftover in self.root.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
        return removed
