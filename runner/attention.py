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

    def plan(self, metadata: Any, q_len: int) -> Any:
        """Backend-specific work on the step's metadata, once per step before the layers (none here)."""
        return metadata

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

    def plan(self, metadata: Any, q_len: int) -> Any:
        return metadata

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float) -> torch.Tensor:
        return self._decode(q, kv_cache, metadata, sm_scale, kv_lora_rank=self.kv_lora_rank)


class FlashMLAAttention:
    """FlashMLA's dense decode kernel (Hopper, page 64, 64 or 128 heads), fed from the configured metadata
    strategy's lengths and block table; its own schedule is planned once per step."""

    name = "flashmla"

    def __init__(self, kv_lora_rank: int, num_heads: int):
        from kernels import flashmla

        self.kv_lora_rank, self.num_heads = kv_lora_rank, num_heads
        self._flashmla = flashmla

    def plan(self, metadata: Any, q_len: int) -> Any:
        return self._flashmla.plan(metadata.seq_lens, metadata.block_table, q_len, self.num_heads)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float) -> torch.Tensor:
        return self._flashmla.flashmla_decode(q, kv_cache, metadata, sm_scale, self.kv_lora_rank)


def _aiter_unavailable() -> str:
    if importlib.util.find_spec("aiter") is None:
        return "attention=aiter needs AMD's aiter package on a ROCm GPU; use attention=triton instead"
    return ("attention=aiter: aiter imports, but this project has not validated its MLA decode on ROCm hardware "
            "yet; use attention=triton, which runs on AMD GPUs too")


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


def make_backend(name: str, device: torch.device, kv_lora_rank: int, num_heads: int, page_size: int):
    """The backend ``name``; a ``ConfigError`` of one sentence, before any work, where it cannot run."""
    if name == "torch":
        return TorchAttention(kv_lora_rank)
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("attention=triton needs the triton package: pip install triton (or use attention=torch)")
        prepare_triton(device)
        return TritonAttention(kv_lora_rank)
    if name == "flashmla":
        from kernels.flashmla import HEAD_COUNTS, PAGE_SIZE, unavailable_reason

        reason = unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"{reason}; or use attention=triton")
        if page_size != PAGE_SIZE or num_heads not in HEAD_COUNTS or kv_lora_rank != 512:
            raise ConfigError(f"attention=flashmla needs page_size={PAGE_SIZE}, 64 or 128 heads and a 512 latent "
                              f"(here page_size={page_size}, {num_heads} heads, {kv_lora_rank}); use attention=triton")
        return FlashMLAAttention(kv_lora_rank, num_heads)
    if name == "aiter":
        raise ConfigError(_aiter_unavailable())
    raise ConfigError(f"attention.name={name!r} is not a known backend")
