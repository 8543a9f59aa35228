"""A run's output directory: one live run at a time writes into it, and an earlier run's results are never written
over unless that run is being resumed.

The default directory is unique (``outputs/<date>/<time>-<random>``, ``conf/config.yaml``); these checks are for a
directory named on the command line (``hydra.run.dir=``). A run holds ``.runner.lock`` (an advisory ``flock``, so it
is released when the process ends, however it ends) for as long as it writes.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import yaml

from mla_runner.errors import UserError
from mla_runner.sweep.result import RESULT_FILE

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

LOCK_FILE = ".runner.lock"
RESOLVED_CONFIG = "resolved_config.yaml"
# Settings a resumed run may change: they change no output.
RESUME_MAY_CHANGE = ("task.resume", "progress")


def run_options(task: Any) -> tuple[bool, tuple[str, ...]]:
    """(whether the run resumes an earlier one, the files of results its task writes besides result.json), from the
    task's config (a dataclass or Hydra's DictConfig)."""
    output = getattr(task, "output", None)
    return bool(getattr(task, "resume", False)), (output,) if output else ()


def check_run_dir(path: Path, resume: bool, outputs: tuple[str, ...] = ()) -> None:
    """A one-line ``UserError`` if ``path`` is held by a live run, or holds an earlier run's results (its
    result.json or one of the task's ``outputs``) and this run does not resume it."""
    with claim_run_dir(path, resume, outputs, create=False):
        pass


@contextmanager
def claim_run_dir(path: Path, resume: bool, outputs: tuple[str, ...] = (), create: bool = True) -> Iterator[None]:
    """Hold ``path`` for this run (the checks of ``check_run_dir``); ``create``: make the lock file if needed."""
    lock = path / LOCK_FILE
    fd = None
    if fcntl is not None and (create or lock.exists()):
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{path} is in use by another run (pid {holder}): choose another hydra.run.dir") from None
    try:
        if not resume and any((path / name).exists() for name in (RESULT_FILE, *outputs)):
            raise UserError(f"{path} holds an earlier run's results: choose another hydra.run.dir (a generate run "
                            "continues with task.resume=true)")
        if fd is not None and create:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def resume_mismatch(path: Path, config: dict[str, Any]) -> Optional[str]:
    """Why ``config`` (the resolved config of this run) cannot resume the run in ``path``: a setting that differs
    from the earlier run's, which would change its outputs; None when it can (or there is nothing to compare)."""
    previous_file = path / RESOLVED_CONFIG
    if not previous_file.exists():
        return None
    previous = _flat(yaml.safe_load(previous_file.read_text()) or {})
    current = _flat(config)
    for key in sorted(set(previous) | set(current)):
        if key not in RESUME_MAY_CHANGE and previous.get(key) != current.get(key):
            return (f"task.resume: {key}={current.get(key)!r} differs from the earlier run's {previous.get(key)!r} "
                    f"({previous_file}); resume with the same settings, or start a new run")
    return None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out
