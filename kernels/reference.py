"""Plain-PyTorch MLA attention over a paged latent cache: the reference every kernel is checked against.

The math of absorbed MLA (DeepSeek-V3 ``inference/model.py`` absorb mode): scores are q . kv over the
whole 576-vector (latent + rope), the values are the first ``kv_lora_rank`` entries of the same vectors.
Softmax in fp32. Requests with q_len 0 or seq_len 0 (padding slots) are skipped and their rows untouched.
Queries are taken in chunks so the fp32 score tensor stays under ``MAX_SCORES`` elements: the runner's
prefill goes through this function, and a 16k-token prompt at 128 heads would otherwise need 128 GiB.
"""
from __future__ import annotations

import torch

from mla_runner.kernels.kv_cache import dequantize_reference

MAX_SCORES = 1 << 28  # fp32 score elements per chunk of queries (1 GiB)


def gather_kv(kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` latent vectors of one request, [seq_len, D], in cache order."""
    page_size = kv_cache.shape[1]
    n_pages = -(-seq_len // page_size)
    return kv_cache[block_table_row[:n_pages].long()].reshape(-1, kv_cache.shape[-1])[:seq_len]


def mla_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    sm_scale: float,
    kv_lora_rank: int,
    out: torch.Tensor | None = None,
    *,
    kv_layout=None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D], kv_cache [P, page, D] -> out [T, H, kv_lora_rank] (q's dtype).

    Query token i of request b sits at position seq_len_b - q_len_b + i and attends to KV 0..position.
    ``kv_layout`` (a ``kernels.kv_cache.KVCacheLayout``) with an FP8 kind: kv_cache [P, page, width] holds that
    layout and each request's tokens are dequantized (``dequantize_reference``, ``kv_scale`` for ``fp8``) as gathered.
    """
    T, H, D = q.shape
    if out is None:
        out = q.new_zeros(T, H, kv_lora_rank)
    qo = qo_indptr.tolist()
    lens = seq_lens.tolist()
    for b, L in enumerate(lens):
        qs, qe = qo[b], qo[b + 1]
        n = qe - qs
        if n <= 0 or L <= 0:
            continue
        kv = gather_kv(kv_cache, block_table[b], L)
        if kv_layout is not None and kv_layout.is_fp8:
            kv = dequantize_reference(kv, kv_layout, kv_scale)  # [L, D] fp32
        kv = kv.float()  # [L, D]
        chunk = max(1, MAX_SCORES // (H * L))
        for c in range(0, n, chunk):
            rows = slice(qs + c, qs + min(c + chunk, n))
            s = torch.einsum("qhd,kd->qhk", q[rows].float(), kv) * sm_scale  # [rows, H, L]
            q_pos = torch.arange(L - n + c, L - n + c + s.shape[0], device=q.device)
            mask = torch.arange(L, device=q.device)[None, :] > q_pos[:, None]  # [rows, L]
            s.masked_fill_(mask[:, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[rows] = torch.einsum("qhk,kd->qhd", p, kv[:, :kv_lora_rank]).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# References for the metadata (kernels.metadata): kv index generation and the work plan of the persistent grid.


def kv_indptr_reference(seq_lens: list[int]) -> list[int]:
    """Offsets of each request's tokens in a flat token list: [0, L0, L0 + L1, ...]."""
    out = [0]
    for L in seq_lens:
        out.append(out[-1] + max(int(L), 0))
    return out


def kv_indices_reference(seq_lens: torch.Tensor, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat cache slot (page * page_size + offset) of every KV token of every request, concatenated."""
    parts = []
    for b, L in enumerate(seq_lens.tolist()):
        j = torch.arange(L, device=block_table.device)
        parts.append(block_table[b, j // page_size].long() * page_size + j % page_size)
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat(parts).to(torch.int32)


def plan_from_bounds(costs: list[int], overhead: int, bounds: list[int]) -> dict[str, list]:
    """The work plan for parts that cover plan units [bounds[p], bounds[p + 1]).

    Request b owns units [cu[b], cu[b + 1]) of the line (cu = exclusive cumsum of ``costs``): first
    ``overhead`` units standing for its fixed cost, then one unit per KV block. Part p runs the KV blocks
    of every request whose block units intersect its range. Derived by enumerating the intersections.
    """
    B, P = len(costs), len(bounds) - 1
    cu = [0]
    for c in costs:
        cu.append(cu[-1] + c)
    first_part, num_splits = [0] * B, [0] * B
    for b in range(B):
        if costs[b] == 0:
            continue
        kv0, ce = cu[b] + overhead, cu[b + 1]
        hits = [p for p in range(P) if max(bounds[p], kv0) < min(bounds[p + 1], ce)]
        assert hits == list(range(hits[0], hits[-1] + 1)), "parts of a request must be consecutive"
        first_part[b], num_splits[b] = hits[0], len(hits)
    split_indptr, acc = [], 0
    for n in num_splits:
        split_indptr.append(acc)
        acc += n if n > 1 else 0
    part_reqs = []
    for p in range(P):
        part_reqs.append(sum(1 for b in range(B) if cu[b + 1] <= bounds[p]))
        part_reqs.append(sum(1 for b in range(B) if cu[b] + overhead < bounds[p + 1]))
    merge_reqs = [b for b in range(B) if num_splits[b] > 1]
    return dict(cu_cost=cu, part_bounds=list(bounds), part_reqs=part_reqs, first_part=first_part,
                num_splits=num_splits, split_indptr=split_indptr, merge_reqs=merge_reqs,
                num_merge=len(merge_reqs), num_slots=acc)


def request_costs(seq_lens: list[int], q_lens: list[int], plan_block: int, overhead: int) -> list[int]:
    """Plan units of each request: its KV blocks plus a fixed overhead; 0 for padding slots."""
    return [(-(-L // plan_block) + overhead) if (L > 0 and n > 0) else 0 for L, n in zip(seq_lens, q_lens)]


def persistent_plan_reference(seq_lens: list[int], q_lens: list[int], num_parts: int, plan_block: int,
                              overhead: int, min_chunk: int, snap_div: int = 2,
                              snap_max: int = 4, max_splits: int = 0, split_cost: int = 4, tiles: int = 1,
                              cut_ratio: int = 0, dram_ratio: int = 0, slack_div: int = 0) -> dict[str, list]:
    """What the persistent plan kernel must write: the first of three plans that applies.

    - **per request** (at most ``num_parts`` active requests): request b is cut into
      k_b = ceil(kv_b / c) equal parts of its own, c the smallest width >= ``narrowest_width`` (``min_chunk``,
      or less for a step with little KV, or more for a step whose KV the DRAM cannot stream in fewer blocks
      of a part's time, when ``cut_ratio`` > 0) with sum k_b <= parts; no part runs two requests, and equal
      requests are not cut when they fit one a part. Taken when its largest part (KV units + ``overhead``)
      is at most a slice (or the DRAM floor, ``dram_floor``, if longer) + ``overhead`` + ``split_cost``
      (what a part of a cut request pays in partial traffic and merging) + that slice // ``slack_div`` (when
      > 0: long requests that the slices would each cut once run faster whole, in parts a few % longer).
    - **packed**: no request is cut; request b goes whole to the part p whose slice [p * chunk, (p + 1) *
      chunk) holds its middle unit (``chunk`` = ceil(total / parts)). Taken when its largest part is at most
      ``chunk`` + ``split_cost`` units: many short requests of similar length.
    - **slices** otherwise: each part a slice of ``chunk`` units; a boundary inside a request of at
      most ``chunk`` units moves to its edge when that is closer than min(chunk // snap_div, snap_max) units.

    ``max_splits`` > 0 caps the parts of any one request (the packed plan cuts none)."""
    costs = request_costs(seq_lens, q_lens, plan_block, overhead)
    total = sum(costs)
    chunk = max(-(-total // num_parts), min_chunk, 1)
    kv = [c - overhead for c in costs if c > 0]
    if max_splits > 0:  # a slice of at least kv_max / (max_splits - 1) units cuts no request more than that
        chunk = max(chunk, -(-max(kv, default=0) // (max_splits - 1)) if max_splits > 1 else total)
    if 0 < len(kv) <= num_parts:
        width = max(narrowest_width(kv, tiles, min_chunk, cut_ratio, num_parts, dram_ratio),
                    -(-max(kv) // max_splits) if max_splits > 0 else 1, narrowest_fit(kv, num_parts))
        span = max(-(-n // -(-n // width)) for n in kv) + overhead
        bound = max(chunk, dram_floor(kv, dram_ratio))
        if span <= bound + overhead + split_cost + (bound // slack_div if slack_div > 0 else 0):
            ks = [-(-(c - overhead) // width) if c > 0 else 0 for c in costs]
            return _with_request_facts(per_request_plan(costs, overhead, ks, num_parts), seq_lens, q_lens)
    edges = [0]
    for c in costs:
        edges.append(edges[-1] + c)
    packed = [min([edges[b] for b, c in enumerate(costs) if c > 0 and edges[b] + edges[b + 1] >= 2 * p * chunk]
                  + [total]) for p in range(num_parts + 1)]
    if kv and max(hi - lo for lo, hi in zip(packed, packed[1:])) <= chunk + split_cost:
        return _with_request_facts(plan_from_bounds(costs, overhead, packed), seq_lens, q_lens)
    snap = min(chunk // snap_div, snap_max) if snap_div > 0 else 0

    def bound(p):  # p * chunk; inside a request of at most a chunk, moved to an edge closer than ``snap``
        raw = min(p * chunk, total)
        lo = max(e for e in edges if e <= raw)
        hi = min([e for e in edges if e > raw] + [total])
        if hi - lo > chunk:
            return raw
        return lo if raw - lo < snap else (hi if hi - raw < snap else raw)

    return _with_request_facts(plan_from_bounds(costs, overhead, [bound(p) for p in range(num_parts + 1)]),
                               seq_lens, q_lens)


def dram_floor(kv: list[int], dram_ratio: int) -> int:
    """The fewest blocks of a part's time in which the DRAM streams the step's ``kv`` blocks: ceil(sum / ratio),
    ``dram_ratio`` the blocks the whole GPU reads in the time a part computes one (0: no floor)."""
    return -(-sum(kv) // dram_ratio) if dram_ratio > 0 else 0


def narrowest_fit(kv: list[int], num_parts: int) -> int:
    """The narrowest width w with sum ceil(kv_b / w) <= num_parts (any wider one fits too; needs len(kv) <=
    num_parts)."""
    w = 1
    while sum(-(-n // w) for n in kv) > num_parts:
        w += 1
    return w


def width_candidates(kv: list[int], min_chunk: int, dram_ratio: int, num_parts: int) -> list[int]:
    """The per-request widths the cost model weighs: 1..min_chunk, and with a DRAM floor 1..2 min_chunk, the
    narrowest width that fits the parts if wider, that doubled while under the longest request, then the longest
    request (no cut)."""
    mc, top, fit = max(min_chunk, 1), max(kv), narrowest_fit(kv, num_parts)
    ws, w = [], 1
    while w > 0:
        ws.append(w)
        if w < mc or (dram_ratio > 0 and w < 2 * mc):
            w += 1
        elif dram_ratio <= 0:
            w = 0
        elif w < fit:
            w = fit
        else:
            w = 2 * w if 2 * w < top else (top if w < top else 0)
    return ws


def narrowest_width(kv: list[int], tiles: int, min_chunk: int, cut_ratio: int, num_parts: int,
                    dram_ratio: int = 0) -> int:
    """The per-request plan's narrowest width for requests of ``kv`` blocks: ``min_chunk``, or with ``cut_ratio``
    > 0 the width w of ``width_candidates`` that fits the parts (sum ceil(kv_b / w) <= num_parts) with the least
    cut_ratio * max(longest piece, DRAM floor) + tiles * (pieces of the requests it cuts), the smaller w on a
    tie: a part pays a block per block of width but no part ends before the DRAM has streamed the step's KV
    (``dram_floor``), and each cut row tile costs about 1 / cut_ratio of a block. min_chunk when none fits."""
    best, best_f = max(min_chunk, 1), None
    if cut_ratio <= 0:
        return best
    floor = dram_floor(kv, dram_ratio)
    for w in width_candidates(kv, min_chunk, dram_ratio, num_parts):
        ks = [-(-n // w) for n in kv]
        if sum(ks) > num_parts:
            continue
        f = cut_ratio * max(max(-(-n // k) for n, k in zip(kv, ks)), floor) + tiles * sum(k for k in ks if k > 1)
        if best_f is None or f < best_f:
            best, best_f = w, f
    return best


def _with_request_facts(plan: dict, seq_lens: list[int], q_lens: list[int]) -> dict:
    plan["kv_indptr"] = kv_indptr_reference(seq_lens)
    plan["max_qo_len"] = max(q_lens) if q_lens else 0
    return plan


def per_request_plan(costs: list[int], overhead: int, ks: list[int], num_parts: int) -> dict[str, list]:
    """The plan that cuts request b's KV blocks into ks[b] near-equal consecutive parts of its own (block
    (j * kv) // k starts part j), parts in request order, then empty parts up to ``num_parts``."""
    total = sum(costs)
    bounds, acc = [0], 0
    for c, k in zip(costs, ks):
        if c > 0:
            bounds += [acc + overhead + (j * (c - overhead)) // k for j in range(1, k)] + [acc + c]
        acc += c
    bounds += [total] * (num_parts + 1 - len(bounds))
    return plan_from_bounds(costs, overhead, bounds)
