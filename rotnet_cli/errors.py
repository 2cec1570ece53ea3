"""The only exceptions the CLI turns into a one-line message (exit 1).

Library code raises these for anything a user can fix: bad data, a missing file, an
unknown model, weights that do not fit. The message must say what to do. Anything
else is a bug: the CLI names its type and message in one line and shows the traceback
with --debug.
"""

from __future__ import annotations


class RotnetError(Exception):
    """A problem the user can fix; the message names the fix."""

    exit_code = 1


class ConfigError(RotnetError):
    """An option value, or a combination of options, that cannot work."""


class DataError(RotnetError):
    """A dataset that cannot be read or is unusable (empty, too small, unlabelled...)."""


class ModelError(RotnetError):
    """An unknown timm model, or one that cannot be built as asked."""


class InputSizeError(ModelError):
    """An input size the model cannot run on; ``size`` is one it can (timm's own for it)."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


class WeightsError(RotnetError):
    """Weights that are missing, corrupt, unsafe, or do not fit the model."""


class DeviceError(RotnetError):
    """A device that does not exist here."""


class OutputError(RotnetError):
    """An output path that exists, cannot be written, or a disk that is full."""


class NonFiniteLossError(RotnetError):
    """Training diverged (NaN/inf loss); the last good checkpoint is kept."""


class Interrupted(RotnetError):
    """The user stopped a run (Ctrl-C) after a checkpoint was written."""

    exit_code = 130
