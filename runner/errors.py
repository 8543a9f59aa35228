"""User-facing errors: printed as one line, never as a traceback."""
from mla_runner.models.errors import CheckpointError, UserError


class ConfigError(UserError):
    """A config value that cannot work; the message names the field."""


__all__ = ["UserError", "ConfigError", "CheckpointError"]
