"""User-facing errors, printed as one line, never as a traceback; and the interruption of a run."""
from __future__ import annotations

from typing import Any, Optional

from mla_runner.models.errors import CheckpointError, UserError


class ConfigError(UserError):
    """A config value that cannot work; the message names the field."""


class Interrupted(Exception):
    """A run stopped at a step boundary because a stop was asked for (SIGINT or SIGTERM on the command line). The
    message says what finished and where it is; ``metrics`` holds the figures so far."""

    def __init__(self, message: str, metrics: Optional[dict[str, Any]] = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


__all__ = ["UserError", "ConfigError", "CheckpointError", "Interrupted"]
