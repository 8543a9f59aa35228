"""Merge of the split-KV partial results of the MLA decode kernel (Triton), and its wrapper.

A request cut over ``n`` parts has ``n`` partial outputs ``o_s`` (each normalized by its own softmax sum)
and their log2-sum-exp ``lse_s`` in the plan's partial buffers, slots ``split_indptr[b] ..
split_indptr[b] + n``. The result is sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse).
Program (row, value chunk, g) merges that slice of jobs ``merge_reqs[g], merge_reqs[g + G], ...`` below
``num_merge`` (a device scalar written by the plan), BLOCK_S splits per load with an online max, so the
grid is fixed (graph-capturable) and small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_merge_kernel(
    O, O_PART, LSE_PART, QO_INDPTR, NUM_SPLITS, SPLIT_INDPTR, MERGE_REQS, NUM_MERGE,
    stride_ot, stride_oh, stride_ps, stride_pr, stride_ls,
    H, G, merged_upto,
    DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < DV
    offs_s = tl.arange(0, BLOCK_S)
    for m in range(tl.program_id(2), tl.load(NUM_MERGE), G):
        b = tl.load(MERGE_REQS + m)
        q_start = tl.load(QO_INDPTR + b)
        n_rows = (tl.load(QO_INDPTR + b + 1) - q_start) * H
        n_split = tl.load(NUM_SPLITS + b)
        if (r < n_rows) & (n_split > merged_upto):
            slot0 = tl.load(SPLIT_INDPTR + b).to(tl.int64)
            mx = float("-inf")
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            w_sum = 0.0
            for s0 in range(0, n_split, BLOCK_S):
                s_ok = s0 + offs_s < n_split
                slot = slot0 + s0 + offs_s
                lse = tl.load(LSE_PART + slot * stride_ls + r, mask=s_ok, other=float("-inf"))
                o = tl.load(O_PART + slot[:, None] * stride_ps + r * stride_pr + offs_d[None, :],
                            mask=s_ok[:, None] & d_ok[None, :], other=0.0)
                mx_new = tl.maximum(mx, tl.max(lse, 0))
                base = tl.where(mx_new == float("-inf"), 0.0, mx_new)
                scale = tl.exp2(mx - base)
                w = tl.exp2(lse - base)
                acc = acc * scale + tl.sum(w[:, None] * o, 0)
                w_sum = w_sum * scale + tl.sum(w, 0)
                mx = mx_new
            out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)
            o_ptr = O + (q_start + r // H) * stride_ot + (r % H) * stride_oh
            tl.store(o_ptr + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


def mla_merge(out: torch.Tensor, meta, block_s: int = 16, block_d: int = 256, groups: int = 16,
              merged_upto: int = 0) -> torch.Tensor:
    """Merge the partials of ``meta``'s split requests into ``out`` [T, H, kv_lora_rank] in place.

    Requests cut into at most ``merged_upto`` parts are skipped (the decode kernel merged them itself)."""
    if out.dim() != 3 or out.shape[1] != meta.num_heads or out.shape[2] != meta.kv_lora_rank:
        raise ValueError(f"out must be [T, {meta.num_heads}, {meta.kv_lora_rank}], got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in the last dim")
    if meta.max_merges == 0:
        return out
    H, dv = meta.num_heads, meta.kv_lora_rank
    block_d = min(block_d, max(16, triton.next_power_of_2(dv)))
    G = min(groups, meta.max_merges)
    _mla_merge_kernel[(meta.max_q_len * H, triton.cdiv(dv, block_d), G)](
        out, meta.o_partial, meta.lse_partial, meta.qo_indptr, meta.num_splits, meta.split_indptr,
        meta.merge_reqs, meta.num_merge,
        out.stride(0), out.stride(1), meta.o_partial.stride(0), meta.o_partial.stride(1),
        meta.lse_partial.stride(0), H, G, merged_upto,
        DV=dv, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4,
    )
    return out
