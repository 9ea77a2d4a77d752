"""Named public GHN checkpoints, downloaded and cached through huggingface_hub.

``--ghn ghn3-tm8`` (or ``ghn="ghn3-tm8"`` in Python) resolves to the released file in the Hub
repository ``SamsungSAILMontreal/ghn3`` (GHN-3, Knyazev et al., ICML 2023, trained on ImageNet).
The file lands in the ordinary Hugging Face cache (``$HF_HOME/hub``), so ``HF_HUB_OFFLINE=1`` and
the other huggingface_hub settings apply. After download the file's SHA-256 is compared with the
name of its cache blob, which for files stored with Git LFS is the SHA-256 the Hub reports.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from timm_ghn.errors import CheckpointError
from timm_ghn.hypernet.checkpoint import file_sha256

__all__ = ["NAMED_GHNS", "NamedGHN", "download_named_ghn", "is_named_ghn"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NamedGHN:
    """A released GHN: where it lives and what it is (sizes in MB of float32 weights)."""

    repo_id: str
    filename: str
    description: str
    size_mb: float
    #: Published address of a file that is not on the Hub; it is downloaded into the Hub cache.
    url: str | None = None


#: ppuda's checkpoints folder at the commit that the GHN-2 reference vectors were made with.
_PPUDA = "https://github.com/facebookresearch/ppuda/raw/4673a42507a9dcd0a5ae04e74599e8c92af689b9/checkpoints"

#: Released GHNs by name. Sizes are the float32 weight sizes of each configuration.
NAMED_GHNS: dict[str, NamedGHN] = {
    "ghn3-tm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3tm8.pt", "GHN-3-T (6.9 M parameters), ImageNet", 27.6),
    "ghn3-sm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3sm8.pt", "GHN-3-S (35.8 M parameters), ImageNet", 143.2),
    "ghn3-lm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3lm8.pt", "GHN-3-L (214.7 M parameters), ImageNet", 858.7),
    "ghn3-xlm16": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3xlm16.pt", "GHN-3-XL (654.4 M parameters), ImageNet", 2617.5),
    # GHN-2 files are published in the ppuda git repository (facebookresearch/ppuda, checkpoints/),
    # not on the Hub. Sizes are those of the configs inferred for them (2.32 M and 1.62 M parameters).
    # NOTE: these addresses were not fetched from this project's machines, which have no internet.
    "ghn2-imagenet": NamedGHN("facebookresearch/ppuda", "ghn2_imagenet.pt", "GHN-2, ImageNet (ppuda)", 9.3, url=f"{_PPUDA}/ghn2_imagenet.pt"),
    "ghn2-cifar10": NamedGHN("facebookresearch/ppuda", "ghn2_cifar10.pt", "GHN-2, CIFAR-10 (ppuda)", 6.5, url=f"{_PPUDA}/ghn2_cifar10.pt"),
}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_named_ghn(name: str) -> bool:
    return name in NAMED_GHNS


def download_named_ghn(name: str) -> Path:
    """Download (or find in the local cache) the released file of ``name`` and verify it.

    Raises:
        CheckpointError: unknown name, the Hub is unreachable or offline and the file is not
            cached, or the file's SHA-256 differs from its cache blob name.
    """
    entry = NAMED_GHNS.get(name)
    if entry is None:
        raise CheckpointError(f"unknown GHN name {name!r}; known names: {', '.join(NAMED_GHNS)}, or pass a file path")
    if entry.url is not None:
        return _download_url(name, entry)
    hint = (
        f"download {entry.filename} from the Hugging Face repo {entry.repo_id} on a machine with "
        f"internet and pass --ghn PATH (Python: ghn=PATH)"
    )
    try:
        path = Path(hf_hub_download(entry.repo_id, entry.filename))
    except LocalEntryNotFoundError as error:
        raise CheckpointError(f"GHN {name!r} is not cached and the Hub cannot be reached (offline mode or no network); {hint}") from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise CheckpointError(f"GHN {name!r} was not found on the Hub as {entry.repo_id}/{entry.filename}; {hint}") from error
    except OSError as error:
        raise CheckpointError(f"downloading GHN {name!r} failed ({error}); {hint}") from error

    blob = path.resolve().name
    if _SHA256.match(blob):
        digest = file_sha256(path)
        if digest != blob:
            raise CheckpointError(
                f"GHN {name!r} at {path} is corrupt: its SHA-256 is {digest}, the Hub says {blob}; "
                f"delete it and download again"
            )
    else:
        # NOTE: files stored without Git LFS are cached under their git blob hash, which is not
        # a SHA-256 of the content, so no checksum can be verified for them.
        logger.warning("GHN %r (%s) has no SHA-256 to verify against", name, path)
    logger.info("resolved GHN %r to %s", name, path)
    return path


def _download_url(name: str, entry: NamedGHN) -> Path:
    """Download a GHN published outside the Hub into ``$HF_HUB_CACHE/timm_ghn-urls`` once.

    Honours ``HF_HUB_OFFLINE``: offline, only an already cached file is returned.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get

    target = Path(constants.HF_HUB_CACHE) / "timm_ghn-urls" / entry.repo_id.replace("/", "--") / entry.filename
    if target.is_file():
        return target
    hint = f"download {entry.url} on a machine with internet and pass --ghn PATH (Python: ghn=PATH)"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"GHN {name!r} is not cached at {target} and HF_HUB_OFFLINE is set; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.incomplete")
    try:
        with open(temporary, "wb") as handle:
            http_get(entry.url, handle)
        temporary.replace(target)
    except OSError as error:
        raise CheckpointError(f"downloading GHN {name!r} from {entry.url} failed ({error}); {hint}") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    logger.info("downloaded GHN %r to %s", name, target)
    return target
