"""Errors a user can fix. The CLI prints them as one line and exits 2, no traceback."""
from __future__ import annotations

from hybridlab.config import ConfigError

__all__ = ["ConfigError", "UserError"]


class UserError(RuntimeError):
    """Bad input other than a YAML key (a missing file, a broken checkpoint): one line."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(UserError):
    """Ctrl-C or SIGTERM: the run checkpointed at a step boundary and can be resumed."""
