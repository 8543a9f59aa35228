"""mla-runner: an inference runner for MLA models (DeepSeek-V3, Kimi-K2).

Python API: ``from mla_runner import LLM, SamplingParams``; command line: ``mla-runner`` or ``python -m mla_runner``.
The API names load on first use, so importing a submodule (the config, the CLI, a kernel) stays cheap. Without a CUDA
GPU, Triton kernels run under Triton's interpreter, switched on here, before any kernel module imports triton.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mla_runner.kernels.interpreter import use_interpreter_without_gpu

__version__ = "0.2.0"

use_interpreter_without_gpu()

if TYPE_CHECKING:
    from mla_runner.api import LLM, CompletionOutput, RequestOutput
    from mla_runner.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "SamplingParams":
        from mla_runner.sampling import SamplingParams

        return SamplingParams
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from mla_runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'mla_runner' has no attribute {name!r}")
