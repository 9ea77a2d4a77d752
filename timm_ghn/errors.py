"""Exceptions raised for bad input, with messages that name the value and the fix.

The CLI prints these as one line and exits with a non-zero status; any other exception is a bug
and keeps its traceback.
"""


class TimmGhnError(Exception):
    """Base class of every error caused by user input (model name, checkpoint, path, option)."""


class UnknownModelError(TimmGhnError, ValueError):
    """The requested timm model name is not registered."""


class CheckpointError(TimmGhnError, ValueError):
    """A GHN checkpoint is missing, unreadable, corrupt or not a GHN checkpoint."""


class OutputPathError(TimmGhnError, OSError):
    """The output file cannot be written (missing directory, no permission)."""


class InvalidOptionError(TimmGhnError, ValueError):
    """An option value is out of range (for example a negative beta)."""


class CoverageError(TimmGhnError):
    """The GHN predicted a smaller fraction of a model's parameters than the caller requires."""
