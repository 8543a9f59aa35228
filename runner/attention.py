"""Attention backends and metadata strategies, chosen by config, checked at start-up.

Every backend implements ``models.context.AttentionBackend.forward`` and reads the step's metadata
(``qo_indptr``, ``seq_lens``, ``block_table`` and whatever its kernels need). Every backend accepts
both metadata strategies. An unavailable backend fails here, before any work, with one sentence that
says what to install or which backend to pick.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from kernels.reference import mla_attention_reference
from runner.errors import ConfigError


@dataclass
class StepMetadata:
    """The minimal metadata (what the torch reference reads); used for prefill steps."""

    qo_indptr: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class TorchAttention:
    """Plain PyTorch over the gathered pages: the reference, usable anywhere."""

    name = "torch"

    def __init__(self, kv_lora_rank: int):
        self.kv_lora_rank = kv_lora_rank

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float) -> torch.Tensor:
        return mla_attention_reference(
            q, kv_cache, metadata.qo_indptr, metadata.seq_lens, metadata.block_table, sm_scale, self.kv_lora_rank
        )


class TritonAttention:
    """This project's persistent split-KV MLA decode kernel plus the merge of split requests."""

    name = "triton"

    def __init__(self, kv_lora_rank: int):
        from kernels.mla_decode import mla_decode

        self.kv_lora_rank = kv_lora_rank
        self._decode = mla_decode

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float) -> torch.Tensor:
        return self._decode(q, kv_cache, metadata, sm_scale, kv_lora_rank=self.kv_lora_rank)


def use_interpreter_without_gpu() -> None:
    """Without a CUDA GPU, Triton kernels (decode and metadata) run under Triton's interpreter, whose switch
    must be on before triton itself is imported: ``import runner`` does this first thing."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def prepare_triton(device: torch.device) -> None:
    """Check, before any kernel is defined, that Triton can run on ``device``."""
    use_interpreter_without_gpu()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "device=cpu runs the Triton kernels under Triton's interpreter, which must be switched on before "
            "triton is imported: set TRITON_INTERPRET=1, or import runner before anything that imports triton"
        )


def make_backend(name: str, device: torch.device, kv_lora_rank: int):
    if name == "torch":
        return TorchAttention(kv_lora_rank)
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("attention=triton needs the triton package: pip install triton (or use attention=torch)")
        prepare_triton(device)
        return TritonAttention(kv_lora_rank)
    raise ConfigError(f"attention.name={name!r} is not a known backend")
