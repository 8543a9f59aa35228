"""Merge of the split-KV partial results of the MLA decode kernel (Triton), and its wrapper.

A request cut over ``n`` parts has ``n`` partial outputs ``o_s`` (each normalized by its own softmax sum)
and their log2-sum-exp ``lse_s`` in the plan's partial buffers, slots ``split_indptr[b] ..
split_indptr[b] + n``. The result is sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse).

Program (j, row block, value chunk) merges BLOCK_R rows x BLOCK_D value columns of job j = ``merge_reqs[j]``
(jobs at or past ``num_merge``, a device scalar written by the plan, do nothing), BLOCK_S splits per load
with an online max: the grid is fixed (graph-capturable) and no program loops over jobs, so the loads of all
jobs are in flight together (``merge_tiles`` picks the tile).

On sm90 the merge is a programmatic dependent launch of the decode kernel (``dependent_launch``): its programs
may start while the decode kernel runs (the decode CTAs signal it, see ``EARLY_LAUNCH_SPLITS``), read the plan,
then wait (griddepcontrol.wait) for the decode grid to finish before reading the partials. Programs with nothing
to merge leave at once, except program (0, 0, 0), which always waits: the merge grid never ends before the
decode kernel, so work after it in the stream still sees the decode kernel's outputs. Measurements:
docs/mla_decode.md#9-the-merge-kernel.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # griddepcontrol (programmatic dependent launch, sm90+); Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _mla_merge_kernel(
    O, O_PART, LSE_PART, QO_INDPTR, NUM_SPLITS, SPLIT_INDPTR, MERGE_REQS, NUM_MERGE,
    stride_ot, stride_oh, stride_ps, stride_pr, stride_ls,
    H,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    # the plan's facts (written before the decode kernel started) are read before waiting for the decode
    # kernel: with a programmatic dependent launch this prologue overlaps the decode kernel's tail
    j = tl.program_id(0)
    active = j < tl.load(NUM_MERGE)
    b = tl.where(active, tl.load(MERGE_REQS + j), 0)  # (entries past num_merge are stale)
    q_start = tl.load(QO_INDPTR + b)
    n_rows = (tl.load(QO_INDPTR + b + 1) - q_start) * H
    n_split = tl.load(NUM_SPLITS + b)
    slot0 = tl.load(SPLIT_INDPTR + b).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_R
    work = active & (r0 < n_rows)
    if PDL:
        first = (j == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0)
        if work | first:  # the decode kernel's partials are complete and visible (idle programs just leave)
            gdc_wait()
    if work:
        rows = r0 + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        r_ok = rows < n_rows
        ok = r_ok[:, None] & (cols < DV)[None, :]
        offs_s = tl.arange(0, BLOCK_S)
        mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
        w_sum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for s0 in range(0, n_split, BLOCK_S):
            s_ok = s0 + offs_s < n_split
            slot = slot0 + s0 + offs_s
            lse = tl.load(LSE_PART + slot[:, None] * stride_ls + rows[None, :],
                          mask=s_ok[:, None] & r_ok[None, :], other=float("-inf"))  # [S, R]
            o = tl.load(O_PART + slot[:, None, None] * stride_ps + rows[None, :, None] * stride_pr
                        + cols[None, None, :], mask=s_ok[:, None, None] & ok[None, :, :], other=0.0)  # [S, R, D]
            mx_new = tl.maximum(mx, tl.max(lse, 0))
            base = tl.where(mx_new == float("-inf"), 0.0, mx_new)
            scale = tl.exp2(mx - base)
            w = tl.exp2(lse - base[None, :])
            acc = acc * scale[:, None] + tl.sum(w[:, :, None] * o, 0)
            w_sum = w_sum * scale + tl.sum(w, 0)
            mx = mx_new
        out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
        o_ptr = O + (q_start + rows // H) * stride_ot + (rows % H) * stride_oh
        tl.store(o_ptr[:, None] + cols[None, :], out.to(O.dtype.element_ty), mask=ok)


def merge_tiles(batch_size: int, num_parts: int, dv: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, BLOCK_S) of a merge program, from the splits a request gets when all lengths are equal
    (parts / batch): tiles of 8k fp32 values (64 registers a thread) with about that many splits a load, so most
    jobs take one round of loads. Many requests: 2 whole rows, 8 splits a load, so a long request cut dozens of
    ways among short ones spreads over many programs (a fixed 4 rows x 4 splits took 4-6 us more at 1 x 32k +
    63 x 512, H = 64, and 1-2.5 us less where 32-64 requests are cut in 2-4); a few requests: one row, 16 splits a
    load; one or two: half a row, 32. Measured on H100 (docs/mla_decode.md#9-the-merge-kernel)."""
    d = max(16, triton.next_power_of_2(dv))
    per_request = num_parts // max(batch_size, 1)
    if per_request >= 32:
        return 1, min(d, 256), 32
    if per_request >= 16:
        return 1, d, 16
    return 2, d, 8


# A decode CTA whose (first) request is cut at most this many ways lets the merge launch at its start (its
# programs then take the SMs the decode kernel leaves idle and wait there); past it, a merge program reads
# over 32 partial rows, and programs launched early crowd onto the few idle SMs (H100, B = 1, L = 16k at
# H = 128: 33.2 -> 37.2 us if launched early), so those CTAs leave the launch to their exit.
EARLY_LAUNCH_SPLITS = 32


@functools.cache
def dependent_launch(device: torch.device) -> bool:
    """Whether the merge is launched as a programmatic dependent of the decode kernel (sm90+ with a Triton that
    has griddepcontrol): its programs then start while the decode kernel's last CTAs run, read the plan and
    wait (griddepcontrol.wait) for the partials, instead of paying a launch after the decode kernel ends."""
    return (gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def mla_merge(out: torch.Tensor, meta, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Merge the partials of ``meta``'s split requests into ``out`` [T, H, kv_lora_rank] in place.

    ``tiles`` = (BLOCK_R, BLOCK_D, BLOCK_S) overrides ``merge_tiles``."""
    if out.dim() != 3 or out.shape[1] != meta.num_heads or out.shape[2] != meta.kv_lora_rank:
        raise ValueError(f"out must be [T, {meta.num_heads}, {meta.kv_lora_rank}], got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in the last dim")
    if meta.max_merges == 0:
        return out
    H, dv = meta.num_heads, meta.kv_lora_rank
    block_r, block_d, block_s = tiles or merge_tiles(meta.batch_size, meta.num_parts, dv)
    jobs = min(meta.max_merges, meta.batch_size)  # a job is a split request
    pdl = dependent_launch(out.device)
    launch = {"launch_pdl": True} if pdl else {}
    grid = (jobs, triton.cdiv(meta.max_q_len * H, block_r), triton.cdiv(dv, block_d))
    _mla_merge_kernel[grid](
        out, meta.o_partial, meta.lse_partial, meta.qo_indptr, meta.num_splits, meta.split_indptr,
        meta.merge_reqs, meta.num_merge,
        out.stride(0), out.stride(1), meta.o_partial.stride(0), meta.o_partial.stride(1),
        meta.lse_partial.stride(0), H,
        DV=dv, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_S=block_s, PDL=pdl, num_warps=4, **launch)
    return out
