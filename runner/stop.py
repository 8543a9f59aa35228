"""SIGINT and SIGTERM on the command line stop a run at its next step boundary instead of killing it mid-step.

Within ``with StopSignals() as stop:`` the first SIGINT or SIGTERM only records itself (``stop()`` is then True,
``stop.exit_code`` is 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM); the engine loop checks it between
steps and raises ``Interrupted``, so the task can write what finished and ``result.json`` can say so. A second Ctrl-C
raises KeyboardInterrupt at once, for a step that takes too long.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self, announce: bool = True) -> None:
        """``announce``: say on stderr that the run stops (rank 0 alone under torchrun)."""
        self.announce = announce
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None and self.announce:
            print(f"{signal.Signals(signum).name}: stopping after the current step (Ctrl-C again to abort at once)",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum
