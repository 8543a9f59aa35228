"""Triton's interpreter on machines without a CUDA GPU.

Triton reads its interpreter switch (``TRITON_INTERPRET=1``) once, when ``triton`` is first imported, so it must be
set before any kernel module loads: ``import mla_runner`` calls ``use_interpreter_without_gpu`` first thing, and every
kernel module lives below that package.
"""
from __future__ import annotations

import os
import sys

import torch


def use_interpreter_without_gpu() -> None:
    """Switch Triton's interpreter on when no CUDA GPU is visible and triton is not imported yet (an explicit
    ``TRITON_INTERPRET`` in the environment is left as it is)."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, in one sentence; None when they can."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("device=cpu runs the Triton kernels under Triton's interpreter, which must be switched on before "
                "triton is imported: set TRITON_INTERPRET=1, or import mla_runner before anything that imports triton")
    return None
