"""FlashMLA's dense MLA decode (Hopper, page size 64) behind the same interface as our kernels.

FlashMLA ships on PyPI as ``sgl-flash-mla`` (SGLang's build: compiled SM90 kernels; dense bf16 decode is
its "legacy" path). Its scheduler runs on the GPU once per step from the sequence lengths
(``get_mla_decoding_metadata``); every layer reuses the result, as with our persistent metadata. It needs
the same q_len for every request and a 576-wide latent (512 + 64 rope); ``HEAD_COUNTS`` are the head counts whose
outputs were checked against the reference on an H100 (q_len 1 and 2: tests/runner/attention/test_backends.py).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

import torch

PAGE_SIZE = 64
HEAD_COUNTS = (8, 16, 32, 64, 128)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why FlashMLA cannot run on ``device``, in one phrase ("needs ..."); None when it can."""
    if device.type != "cuda":
        return "needs a Hopper GPU (device=cuda)"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"needs a Hopper GPU (SM90), this is {torch.cuda.get_device_name(device)}"
    if importlib.util.find_spec("flash_mla") is None:
        return "needs the flash_mla package: pip install 'mla-runner[flashmla]' (sgl-flash-mla)"
    return None


@dataclass
class FlashMLAPlan:
    """One step's FlashMLA schedule, shared by every layer."""

    sched: Any  # flash_mla.FlashMLASchedMeta with its tile scheduler metadata filled
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    q_len: int


def plan(seq_lens: torch.Tensor, block_table: torch.Tensor, q_len: int, num_heads: int) -> FlashMLAPlan:
    """FlashMLA's split-KV schedule for this step's lengths (a GPU kernel, no host sync). CUDA-graph padding
    slots (seq_len 0) are given one token, so no part of the kernel waits on an empty request."""
    from flash_mla import get_mla_decoding_metadata, get_mla_metadata

    seq_lens = seq_lens.clamp_min(1)
    sched, _ = get_mla_metadata()
    sched.tile_scheduler_metadata, sched.num_splits = get_mla_decoding_metadata(
        seq_lens, q_len * num_heads, 1, use_legacy=True)
    return FlashMLAPlan(sched, seq_lens, block_table, q_len)


def flashmla_decode(q: torch.Tensor, kv_cache: torch.Tensor, step: FlashMLAPlan, sm_scale: float,
                    kv_lora_rank: int = 512) -> torch.Tensor:
    """q [B * q_len, H, 576] bf16, kv_cache [pages, 64, 576] -> [B * q_len, H, 512]."""
    from flash_mla import flash_mla_with_kvcache

    T, H, D = q.shape
    if H not in HEAD_COUNTS:
        raise ValueError(f"FlashMLA runs {', '.join(map(str, HEAD_COUNTS))} heads, got {H}")
    if kv_cache.shape[1] != PAGE_SIZE:
        raise ValueError(f"FlashMLA needs page size {PAGE_SIZE}, got {kv_cache.shape[1]}")
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        raise ValueError(f"FlashMLA's dense decode needs bf16 q and cache, got {q.dtype} and {kv_cache.dtype}")
    B = step.seq_lens.shape[0]
    if T != B * step.q_len:
        raise ValueError(f"FlashMLA needs the same q_len for every request: {T} tokens for {B} requests")
    out, _ = flash_mla_with_kvcache(
        q.view(B, step.q_len, H, D), kv_cache.view(kv_cache.shape[0], PAGE_SIZE, 1, D), step.block_table,
        step.seq_lens, kv_lora_rank, step.sched, softmax_scale=sm_scale, causal=True, use_legacy=True)
    return out.view(T, H, kv_lora_rank)
