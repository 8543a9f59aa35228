"""FlashMLA's dense MLA decode (Hopper, page size 64) behind the same interface as our kernels, over a bf16 cache and,
through vLLM's build of the community FP8 kernel, over our ``fp8`` cache layout.

FlashMLA ships on PyPI as ``sgl-flash-mla`` (SGLang's build: compiled SM90 kernels; dense bf16 decode is
its "legacy" path). Its scheduler runs on the GPU once per step from the sequence lengths
(``get_mla_decoding_metadata``); every layer reuses the result, as with our persistent metadata. It needs
the same q_len for every request and a 576-wide latent (512 + 64 rope); ``HEAD_COUNTS`` are the head counts whose
outputs were checked against the reference on an H100 (q_len 1 and 2: tests/runner/attention/test_backends.py).

The FP8 kernel (FP8 query and cache, per-tensor scales) is not in upstream FlashMLA or in ``sgl-flash-mla``: vLLM's
wheel carries it as ``vllm/_flashmla_extension_C.abi3.so`` (torch's stable ABI). ``fp8_library`` finds it in an
installed vllm package without importing vllm, or at ``$MLA_RUNNER_FLASHMLA_FP8``; its ops are
``get_mla_decoding_metadata_dense_fp8`` and ``fwd_kvcache_mla_fp8``, called as vLLM's
``vllm/v1/attention/ops/flashmla.py`` calls them.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mla_runner.kernels.fp8_block import FP8_MAX

PAGE_SIZE = 64
HEAD_COUNTS = (8, 16, 32, 64, 128)
FP8_LIBRARY_ENV = "MLA_RUNNER_FLASHMLA_FP8"
FP8_LIBRARY_NAME = "_flashmla_extension_C.abi3.so"


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


def _shape(q: torch.Tensor, kv_cache: torch.Tensor, step: FlashMLAPlan) -> tuple[int, int, int, int]:
    """(T, H, D, B) of a call, checked against what both dense kernels take: the head counts, the page size, one q_len
    for every request."""
    T, H, D = q.shape
    if H not in HEAD_COUNTS:
        raise ValueError(f"FlashMLA runs {', '.join(map(str, HEAD_COUNTS))} heads, got {H}")
    if kv_cache.shape[1] != PAGE_SIZE:
        raise ValueError(f"FlashMLA needs page size {PAGE_SIZE}, got {kv_cache.shape[1]}")
    B = step.seq_lens.shape[0]
    if T != B * step.q_len:
        raise ValueError(f"FlashMLA needs the same q_len for every request: {T} tokens for {B} requests")
    return T, H, D, B


def flashmla_decode(q: torch.Tensor, kv_cache: torch.Tensor, step: FlashMLAPlan, sm_scale: float,
                    kv_lora_rank: int = 512) -> torch.Tensor:
    """q [B * q_len, H, 576] bf16, kv_cache [pages, 64, 576] -> [B * q_len, H, 512]."""
    from flash_mla import flash_mla_with_kvcache

    T, H, D, B = _shape(q, kv_cache, step)
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        raise ValueError(f"FlashMLA's dense decode needs bf16 q and cache, got {q.dtype} and {kv_cache.dtype}")
    out, _ = flash_mla_with_kvcache(
        q.view(B, step.q_len, H, D), kv_cache.view(kv_cache.shape[0], PAGE_SIZE, 1, D), step.block_table,
        step.seq_lens, kv_lora_rank, step.sched, softmax_scale=sm_scale, causal=True, use_legacy=True)
    return out.view(T, H, kv_lora_rank)


def fp8_library() -> Optional[Path]:
    """vLLM's FlashMLA extension library: ``$MLA_RUNNER_FLASHMLA_FP8``, else the file in an installed vllm package
    (found, not imported); None where neither is."""
    if os.environ.get(FP8_LIBRARY_ENV):
        return Path(os.environ[FP8_LIBRARY_ENV])
    spec = importlib.util.find_spec("vllm")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / FP8_LIBRARY_NAME).is_file():
            return Path(folder) / FP8_LIBRARY_NAME
    return None


@functools.cache
def fp8_ops() -> Any:
    """``torch.ops._flashmla_extension_C``, loaded once from ``fp8_library()``; a RuntimeError saying what to install
    where it cannot load."""
    path = fp8_library()
    if path is None:
        raise RuntimeError(f"needs vLLM's FP8 FlashMLA ({FP8_LIBRARY_NAME}): pip install vllm, or set "
                           f"{FP8_LIBRARY_ENV}=/path/to/{FP8_LIBRARY_NAME}")
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    return torch.ops._flashmla_extension_C


def plan_fp8(seq_lens: torch.Tensor, block_table: torch.Tensor, q_len: int, num_heads: int) -> FlashMLAPlan:
    """``plan`` for the FP8 kernel: its own split-KV schedule (``sched`` = (tile metadata, split counts))."""
    seq_lens = seq_lens.clamp_min(1)
    sched = tuple(fp8_ops().get_mla_decoding_metadata_dense_fp8(seq_lens, q_len * num_heads, 1))
    return FlashMLAPlan(sched, seq_lens, block_table, q_len)


def flashmla_decode_fp8(q: torch.Tensor, kv_cache: torch.Tensor, step: FlashMLAPlan, sm_scale: float,
                        kv_scale: torch.Tensor, kv_lora_rank: int = 512) -> torch.Tensor:
    """q [B * q_len, H, 576] bf16, kv_cache e4m3 [pages, 64, 576] holding x / ``kv_scale`` ([1] float32) -> [B * q_len,
    H, 512] in q's dtype. The query goes in as e4m3 too, with one scale for the step's whole query (its largest
    magnitude over 448, computed on the device: no sync)."""
    T, H, D, B = _shape(q, kv_cache, step)
    if kv_cache.dtype != torch.float8_e4m3fn or kv_cache.shape[-1] != D:
        raise ValueError(f"FP8 FlashMLA needs an e4m3 cache [pages, {PAGE_SIZE}, {D}], got {kv_cache.dtype} "
                         f"{tuple(kv_cache.shape)}")
    q_scale = (q.abs().amax().float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    q8 = (q.float() / q_scale).to(torch.float8_e4m3fn)
    metadata, num_splits = step.sched
    out = fp8_ops().fwd_kvcache_mla_fp8(
        q8.view(B, step.q_len, H, D), kv_cache.view(kv_cache.shape[0], PAGE_SIZE, 1, D), kv_lora_rank,
        step.seq_lens, step.block_table, sm_scale, step.q_len > 1, metadata, num_splits, q_scale, kv_scale)[0]
    return out.view(T, H, kv_lora_rank).to(q.dtype)
