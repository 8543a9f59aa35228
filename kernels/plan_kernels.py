"""GPU-side metadata kernels (Triton): the persistent work plan and per-token KV indices.

Both write into preallocated buffers, read only device tensors and launch a fixed grid, so they can be
captured in a CUDA graph and replayed with new lengths. References: ``kernels.reference``
(``persistent_plan_reference``, ``kv_indices_reference``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# parts a program of the plan kernel fills: every program recomputes the per-request scans, so many small
# programs beat a few large ones (H100, B = 256 over 66 parts: 9.6 us with 32 a program, 5.0 us with 2)
PLAN_PARTS = 2


@triton.jit
def _part_bound(pp, chunk, total, snap, ce_m):
    """Start unit of parts ``pp``: p * chunk clipped to the total; when it falls inside a request no longer
    than a chunk [lo, hi), moved to the nearer edge if that is within ``snap`` units (a short request is
    then not cut in two; long requests are cut wherever the slices fall, keeping the balance)."""
    raw = tl.minimum(pp * chunk, total)
    lo = tl.max(tl.where(ce_m[None, :] <= raw[:, None], ce_m[None, :], 0), 1)
    hi = tl.min(tl.where(ce_m[None, :] > raw[:, None], ce_m[None, :], total), 1)
    short = hi - lo <= chunk
    return tl.where(short & (raw - lo < snap), lo, tl.where(short & (hi - raw < snap), hi, raw))


@triton.jit
def _packed_part_bound(pp, chunk, total, mid2_m, cs):
    """Start unit of parts ``pp`` in the packed plan: the first unit of the first request whose middle
    (mid2_m = 2 x middle unit, -1 for inactive requests) lies at or past p * chunk, else ``total``."""
    return tl.min(tl.where(mid2_m[None, :] >= 2 * pp[:, None] * chunk, cs[None, :], total), 1)


@triton.jit
def _segment_min(k1, v1, k2, v2):
    """Scan operator: running minimum of v within runs of equal keys k (associative on sorted keys)."""
    return k2, tl.where(k1 == k2, tl.minimum(v1, v2), v2)


@triton.jit
def _request_part_bound(pp, k_m, k_req, cs, kv, overhead, total):
    """Start unit of parts ``pp`` in the per-request plan: part j of request b (parts k_incl[b] - k_b ..
    k_incl[b] - 1) starts at its block (j * kv_b) // k_b, part 0 at the request's first unit; parts past the
    last request's start at ``total``."""
    b = tl.sum((k_m[None, :] <= pp[:, None]).to(tl.int32), 1)  # the request of each part
    sel = tl.arange(0, k_m.shape[0])[None, :] == b[:, None]
    k = tl.sum(tl.where(sel, k_req[None, :], 0), 1)
    j = pp - (tl.sum(tl.where(sel, k_m[None, :], 0), 1) - k)
    start = tl.sum(tl.where(sel, cs[None, :], 0), 1)
    inner = start + overhead + (j * tl.sum(tl.where(sel, kv[None, :], 0), 1)) // tl.maximum(k, 1)
    return tl.where(k == 0, total, tl.where(j == 0, start, inner))


@triton.jit
def _persistent_plan_kernel(
    SEQ_LENS, QO_INDPTR, B,
    KV_INDPTR, MAX_QO_LEN, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART, NUM_SPLITS, SPLIT_INDPTR,
    MERGE_REQS, NUM_MERGE, DROPPED,
    num_parts, overhead, min_chunk, snap_div, snap_max, max_splits, split_cost, tiles, cut_ratio, dram_ratio,
    slack_div, max_q, max_kv, PLAN_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_B)
    ok = offs < B
    L = tl.maximum(tl.load(SEQ_LENS + offs, mask=ok, other=0), 0)
    q_lo = tl.load(QO_INDPTR + offs, mask=ok, other=0)
    q_len = tl.load(QO_INDPTR + offs + 1, mask=ok, other=0) - q_lo
    # a request past the buffers' bounds (more query tokens than the row tiles hold, more KV than its block-table
    # row maps) is dropped from the plan like a padding slot: nothing reads past its row, nothing is written for
    # it, and DROPPED (sticky: 1 q_len, 2 seq_len) says so to the host that checks it
    over_q = ok & (q_len > max_q)
    over_kv = ok & (L > max_kv)
    L = tl.where(over_q | over_kv, 0, L)
    active = ok & (L > 0) & (q_len > 0)

    cost = tl.where(active, (L + PLAN_BLOCK - 1) // PLAN_BLOCK + overhead, 0)
    ce = tl.cumsum(cost, 0)
    cs = ce - cost
    total = tl.sum(cost, 0)
    chunk = tl.maximum(tl.maximum((total + num_parts - 1) // num_parts, min_chunk), 1)
    kv = tl.where(active, cost - overhead, 0)  # KV blocks of each request
    kv_top = tl.max(kv, 0)
    if max_splits > 0:  # cap the parts of any one request: a slice of at least its KV units / (cap - 1)
        cap = tl.where(max_splits > 1, (kv_top + max_splits - 2) // tl.maximum(max_splits - 1, 1), total)
        chunk = tl.maximum(chunk, cap)

    # the per-request plan: request b cut into k_b = ceil(kv_b / width) parts of its own, width the smallest
    # >= the narrowest width below with sum k_b <= parts (binary search); taken when its largest part is within
    # split_cost units of a slice (which pays for cut requests with partial traffic and merges)
    n_active = tl.sum(active.to(tl.int32), 0)
    # its narrowest width: min_chunk, or less for a step with little KV, or more for a step the DRAM cannot
    # stream faster. A part's time grows by a block per block of width, but no part ends before the DRAM has
    # streamed the step's KV (dram_floor: its blocks / dram_ratio, in blocks of a part's time); every cut row
    # tile adds about 1 / cut_ratio of a block (its fp32 partial written, then merged). Of the candidate widths
    # that fit the parts (kernels.reference.width_candidates), the one with the least
    # cut_ratio * max(longest piece, dram_floor) + tiles * (pieces of cut requests) (the smaller on a tie;
    # docs/mla_decode.md#33-the-per-request-width, #4-the-dram-floor)
    dram_floor = tl.where(dram_ratio > 0, (tl.sum(kv, 0) + dram_ratio - 1) // tl.maximum(dram_ratio, 1), 0)
    # the narrowest width that fits the parts (binary search; any wider one fits too)
    fit = n_active * 0 + 1
    f_hi = tl.where(n_active <= num_parts, tl.maximum(kv_top, 1), 1)  # (no search when it cannot apply)
    while fit < f_hi:
        mid = (fit + f_hi) // 2
        fits = tl.sum(tl.where(active, (kv + mid - 1) // mid, 0), 0) <= num_parts
        f_hi = tl.where(fits, mid, f_hi)
        fit = tl.where(fits, fit, mid + 1)
    lo = tl.maximum(min_chunk, 1) + n_active * 0  # (a tensor: min_chunk may arrive as the constant 1)
    if cut_ratio > 0:
        if n_active <= num_parts:
            # the candidates of kernels.reference.width_candidates from the narrowest fit up (narrower ones do
            # not fit); the walk stops once cut_ratio * piece alone reaches the best cost (pieces only grow)
            mc = tl.where(dram_ratio > 0, 2 * lo, lo)
            best_f = n_active * 0 + 2147483647
            w = tl.where(fit <= mc, fit, tl.where(dram_ratio > 0, fit, 0))
            while w > 0:
                k_w = tl.where(active, (kv + w - 1) // w, 0)
                piece = tl.max(tl.where(active, (kv + k_w - 1) // tl.maximum(k_w, 1), 0), 0)
                f = cut_ratio * tl.maximum(piece, dram_floor) + tiles * tl.sum(tl.where(k_w > 1, k_w, 0), 0)
                better = f < best_f
                best_f = tl.where(better, f, best_f)
                lo = tl.where(better, w, lo)
                # next: w + 1 up to min_chunk (2 min_chunk with a DRAM floor), then with a floor 2 w under the
                # longest request, then the longest request; 0 ends the walk
                wider = tl.where(2 * w < kv_top, 2 * w, tl.where(w < kv_top, kv_top, 0))
                w = tl.where(w < mc, w + 1, tl.where(dram_ratio > 0, wider, 0))
                w = tl.where(cut_ratio * piece >= best_f, 0, w)
    if max_splits > 0:
        lo = tl.maximum(lo, (kv_top + max_splits - 1) // max_splits)
    lo = tl.where(n_active <= num_parts, tl.maximum(lo, fit), lo)  # the narrowest fitting width >= lo
    k_req = tl.where(active, (kv + lo - 1) // lo, 0)
    span = tl.max(tl.where(active, (kv + k_req - 1) // tl.maximum(k_req, 1), 0), 0) + overhead
    # (a slice shorter than the DRAM floor is no faster than the floor; with slack_div, a part may also be longer
    # by that bound // slack_div: long requests each cut once by the slices run slower than whole ones 3% longer)
    bound = tl.maximum(chunk, dram_floor)
    slack = tl.where(slack_div > 0, bound // tl.maximum(slack_div, 1), 0)
    per_req = (n_active > 0) & (n_active <= num_parts) & (span <= bound + overhead + split_cost + slack)
    k_incl = tl.cumsum(k_req, 0)

    # the packed plan: no request cut, request b whole in the part (cs + ce) // (2 chunk) whose slice holds
    # its middle unit; taken (when the per-request plan is not) if its largest part is within split_cost
    # units of a slice. A part runs from its first request's start to its last request's end: a running
    # minimum of the starts within runs of equal parts gives every request its part's start.
    packed_part = (cs + ce) // (2 * chunk)  # non-decreasing in b (inactive requests: where they sit)
    _, part_start = tl.associative_scan((packed_part, tl.where(active, cs, total)), 0, _segment_min)
    widest = tl.max(tl.where(active, ce - part_start, 0), 0)
    packed = (per_req == 0) & (n_active > 0) & (widest <= chunk + split_cost)
    mid2_m = tl.where(active, cs + ce, -1)

    kv0 = cs + overhead
    snap = tl.where(snap_div > 0, tl.minimum(chunk // tl.maximum(snap_div, 1), snap_max), 0)
    ce_m = tl.where(ok, ce, 2147483647)
    kv0_m = tl.where(ok, kv0, 2147483647)
    if tl.program_id(0) == 0:  # per-request arrays
        tl.store(KV_INDPTR + offs + 1, tl.cumsum(L, 0), mask=ok)
        tl.store(KV_INDPTR + offs, 0, mask=offs == 0)
        tl.store(MAX_QO_LEN + offs, tl.max(tl.where(ok, q_len, 0), 0), mask=offs == 0)
        tl.store(CU_COST + offs + 1, ce, mask=ok)
        tl.store(CU_COST + offs, 0, mask=offs == 0)
        # first / last part of each request. Snapping moves a boundary only inside a short request, to
        # one of its edges, so a request's parts are the unsnapped ones (unit // chunk) unless the raw
        # boundary r inside it snapped: to its start (whole request in part r / chunk) or to its end
        # (whole request in the part before).
        r_idx = (cs + chunk - 1) // chunk
        r = r_idx * chunk
        snappable = (r > cs) & (r < ce) & (ce - cs <= chunk)
        to_lo = snappable & (r - cs < snap)
        to_hi = snappable & (r - cs >= snap) & (ce - r < snap)
        first = tl.where(to_lo, r_idx, tl.where(to_hi, r_idx - 1, kv0 // chunk))
        last = tl.where(to_lo, r_idx, tl.where(to_hi, r_idx - 1, (ce - 1) // chunk))
        n_split = tl.where(active, last - first + 1, 0)
        first = tl.where(per_req, k_incl - k_req, tl.where(packed, packed_part, first))
        n_split = tl.where(per_req, k_req, tl.where(packed & active, 1, n_split))
        tl.store(FIRST_PART + offs, tl.where(active, first, 0), mask=ok)
        tl.store(NUM_SPLITS + offs, n_split, mask=ok)
        is_split = (n_split > 1).to(tl.int32)
        slots = tl.where(is_split != 0, n_split, 0)
        tl.store(SPLIT_INDPTR + offs, tl.cumsum(slots, 0) - slots, mask=ok)
        rank = tl.cumsum(is_split, 0) - is_split
        tl.store(MERGE_REQS + rank, offs, mask=ok & (is_split != 0))
        tl.store(NUM_MERGE + offs, tl.sum(is_split, 0), mask=offs == 0)
        tl.store(PART_BOUNDS + num_parts + offs, total, mask=offs == 0)
        dropped = tl.max(over_q.to(tl.int32), 0) | (2 * tl.max(over_kv.to(tl.int32), 0))
        if dropped != 0:  # (or-ed in: the flag stays until the host's check clears it)
            tl.atomic_or(DROPPED, dropped)

    # this program's parts: part p covers units [bound(p), bound(p + 1)); its requests are
    # [#(ce <= begin), #(kv0 < end)) (ce and kv0 are non-decreasing in b)
    pp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pp < num_parts
    if per_req:
        k_m = tl.where(ok, k_incl, 2147483647)
        beg = _request_part_bound(pp, k_m, k_req, cs, kv, overhead, total)
        fin = _request_part_bound(pp + 1, k_m, k_req, cs, kv, overhead, total)
    elif packed:
        beg = _packed_part_bound(pp, chunk, total, mid2_m, cs)
        fin = _packed_part_bound(pp + 1, chunk, total, mid2_m, cs)
    else:
        beg = _part_bound(pp, chunk, total, snap, ce_m)
        fin = _part_bound(pp + 1, chunk, total, snap, ce_m)
    start = tl.sum((ce_m[None, :] <= beg[:, None]).to(tl.int32), 1)
    stop = tl.sum((kv0_m[None, :] < fin[:, None]).to(tl.int32), 1)
    tl.store(PART_BOUNDS + pp, beg, mask=pm)
    tl.store(PART_REQS + 2 * pp, start, mask=pm)
    tl.store(PART_REQS + 2 * pp + 1, stop, mask=pm)


def build_persistent_plan(seq_lens: torch.Tensor, qo_indptr: torch.Tensor, bufs: dict[str, torch.Tensor],
                          num_parts: int, plan_block: int, overhead: int, min_chunk: int, max_batch: int,
                          snap_div: int = 2, snap_max: int = 4, max_splits: int = 0, split_cost: int = 4,
                          tiles: int = 1, cut_ratio: int = 0, dram_ratio: int = 0, slack_div: int = 0,
                          max_q_len: int = 1 << 30, max_kv_len: int = 1 << 30) -> None:
    """Fill the plan buffers ``bufs`` in place for the B = len(seq_lens) requests.

    Every program recomputes the per-request prefix sums (cheap) and fills PLAN_PARTS parts; program 0 also
    writes the per-request arrays. One launch, no host sync. A request with q_len > ``max_q_len`` or seq_len >
    ``max_kv_len`` is planned as a padding slot and flagged in ``bufs["dropped"]`` (1 | 2, or-ed in)."""
    B = seq_lens.shape[0]
    if not 0 < B <= max_batch:
        raise ValueError(f"batch {B} must be in [1, max_batch={max_batch}]")
    if qo_indptr.shape[0] != B + 1:
        raise ValueError(f"qo_indptr has {qo_indptr.shape[0]} entries, expected B + 1 = {B + 1}")
    if seq_lens.dtype != torch.int32 or qo_indptr.dtype != torch.int32:
        raise ValueError(f"seq_lens and qo_indptr must be int32, got {seq_lens.dtype}, {qo_indptr.dtype}")
    if not (seq_lens.is_contiguous() and qo_indptr.is_contiguous()):
        raise ValueError("seq_lens and qo_indptr must be contiguous")
    block_b = max(16, triton.next_power_of_2(max_batch))
    _persistent_plan_kernel[(triton.cdiv(num_parts, PLAN_PARTS),)](
        seq_lens, qo_indptr, B,
        bufs["kv_indptr"], bufs["max_qo_len"], bufs["cu_cost"], bufs["part_bounds"], bufs["part_reqs"],
        bufs["first_part"], bufs["num_splits"], bufs["split_indptr"], bufs["merge_reqs"], bufs["num_merge"],
        bufs["dropped"],
        num_parts, overhead, min_chunk, snap_div, snap_max, max_splits, split_cost, tiles, cut_ratio, dram_ratio,
        slack_div, max_q_len, max_kv_len,
        PLAN_BLOCK=plan_block, BLOCK_B=block_b, BLOCK_P=PLAN_PARTS, num_warps=4,
    )


@triton.jit
def _kv_indices_kernel(KV_INDPTR, BLOCK_TABLE, OUT, stride_bt, PAGE_SIZE: tl.constexpr,
                       BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = tl.load(KV_INDPTR + b)
    L = tl.load(KV_INDPTR + b + 1) - base  # (a request the plan dropped has none)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < L
        page = tl.load(BLOCK_TABLE + b * stride_bt + j // PAGE_SIZE, mask=ok, other=0)
        tl.store(OUT + base + j, page * PAGE_SIZE + j % PAGE_SIZE, mask=ok)


def build_kv_indices(seq_lens: torch.Tensor, kv_indptr: torch.Tensor, block_table: torch.Tensor, page_size: int,
                     out: torch.Tensor) -> torch.Tensor:
    """out[kv_indptr[b] + j] = block_table[b, j // page] * page + j % page for j < kv_indptr[b + 1] - kv_indptr[b]
    (seq_lens[b], or 0 for a request the plan dropped; int32)."""
    B = seq_lens.shape[0]
    if kv_indptr.shape[0] < B + 1 or block_table.shape[0] < B:
        raise ValueError(f"kv_indptr needs B + 1 = {B + 1} entries and block_table B rows")
    if out.dtype != torch.int32 or block_table.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError("out and block_table must be int32, block_table contiguous in its last dim")
    if B:
        _kv_indices_kernel[(B,)](kv_indptr, block_table, out, block_table.stride(0),
                                 PAGE_SIZE=page_size, BLOCK=1024, num_warps=4)
    return out


@triton.jit
def part_range(p, PART_BOUNDS, PART_REQS):
    """Plan units [begin, end) and requests [b_lo, b_hi) of part ``p``, for both decode kernels."""
    begin = tl.load(PART_BOUNDS + p)
    end = tl.load(PART_BOUNDS + p + 1)
    b_lo = tl.load(PART_REQS + 2 * p)
    b_hi = tl.load(PART_REQS + 2 * p + 1)
    return begin, end, b_lo, b_hi


@triton.jit
def request_span(b, tile, begin, end, CU_COST, QO_INDPTR, SEQ_LENS, H, overhead,
                 BLOCK_H: tl.constexpr, PLAN_BLOCK: tl.constexpr):
    """The share of request ``b`` that part [begin, end) of the plan runs for row tile ``tile``, for both
    decode kernels: (active, q_start, q_len, n_rows, L, start_n, end_n, full_n). KV positions [start_n, end_n);
    end_n stops at the last position any row of the tile may see (causal within the new tokens), full_n at the
    last one every row sees (its first token's), so blocks ending at or before full_n need no mask."""
    cs = tl.load(CU_COST + b)
    ce = tl.load(CU_COST + b + 1)
    kv0 = cs + overhead  # the request's KV blocks occupy plan units [kv0, ce)
    lo = tl.maximum(begin, kv0) - kv0
    hi = tl.minimum(end, ce) - kv0
    q_start = tl.load(QO_INDPTR + b)
    q_len = tl.load(QO_INDPTR + b + 1) - q_start
    n_rows = q_len * H
    L = tl.load(SEQ_LENS + b)
    last_tok = tl.minimum((tile * BLOCK_H + BLOCK_H - 1) // H, q_len - 1)
    end_n = tl.minimum(tl.minimum(hi * PLAN_BLOCK, L), L - q_len + last_tok + 1)
    full_n = tl.minimum(end_n, L - q_len + (tile * BLOCK_H) // H + 1)
    active = (lo < hi) & (tile * BLOCK_H < n_rows)
    return active, q_start, q_len, n_rows, L, lo * PLAN_BLOCK, end_n, full_n
