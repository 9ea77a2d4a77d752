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


#: Released GHNs by name. Sizes are the float32 weight sizes of each configuration.
NAMED_GHNS: dict[str, NamedGHN] = {
    "ghn3-tm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3tm8.pt", "GHN-3-T (6.9 M parameters), ImageNet", 27.6),
    "ghn3-sm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3sm8.pt", "GHN-3-S (35.8 M parameters), ImageNet", 143.2),
    "ghn3-lm8": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3lm8.pt", "GHN-3-L (214.7 M parameters), ImageNet", 858.7),
    "ghn3-xlm16": NamedGHN("SamsungSAILMontreal/ghn3", "ghn3xlm16.pt", "GHN-3-XL (654.4 M parameters), ImageNet", 2617.5),
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
