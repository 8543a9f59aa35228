"""User-facing errors: the runner prints their message as one line, without a traceback.

A message names the file, tensor or field at fault and what is wrong with it, so the user can fix the input
without reading our code.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by user input (paths, configs, checkpoints) rather than by a bug."""


class CheckpointError(UserError):
    """A checkpoint directory, its config.json, index or shards are missing, unreadable or inconsistent."""
