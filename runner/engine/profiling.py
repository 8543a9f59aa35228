"""A torch.profiler trace of a few steps of a run (``profile=true``), written as Chrome / Perfetto JSON.

The first steps compile kernels and fill caches, so the trace skips them: it covers steps ``skip + 1`` to
``skip + steps`` of the model runner (or fewer, when the run ends first), each labelled by its kind and batch size.
Open the file in https://ui.perfetto.dev or chrome://tracing.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, path: Path, device: torch.device, skip: int = 2, steps: int = 5):
        self.path, self.skip, self.steps = Path(path), skip, steps
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.seen = 0
        self.traced = 0
        self._profile: Optional[profile] = None

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Around one step of the runner: starts the trace at the first traced step, ends it after the last."""
        if self.seen == self.skip and self._profile is None and self.traced == 0:
            self._profile = profile(activities=self.activities)
            self._profile.__enter__()
        self.seen += 1
        if self._profile is None:
            yield
            return
        with record_function(label):
            yield
        self.traced += 1
        if self.traced == self.steps:
            self.close()

    def close(self) -> None:
        """Write the trace of the steps traced so far (a run shorter than the window still gets one)."""
        if self._profile is None:
            return
        self._profile.__exit__(None, None, None)
        self._profile.export_chrome_trace(str(self.path))
        self._profile = None
        log.info("trace of steps %d-%d: %s", self.skip + 1, self.skip + self.traced, self.path)
