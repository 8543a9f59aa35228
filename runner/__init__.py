"""An inference runner for MLA models (DeepSeek-V3, Kimi-K2).

Python API: ``from runner import LLM, SamplingParams``; command line: ``python -m runner``.
The API names load on first use, so importing a submodule (the config, the CLI) stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from runner.attention import use_interpreter_without_gpu

use_interpreter_without_gpu()

if TYPE_CHECKING:
    from runner.api import LLM, CompletionOutput, RequestOutput
    from runner.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "SamplingParams":
        from runner.sampling import SamplingParams

        return SamplingParams
    if name in __all__:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
