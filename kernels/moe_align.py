"""Sorting (token, slot) pairs by expert on the GPU, without a host sync: the "align" step of the fused MoE.

The grouped GEMMs in ``kernels.fused_moe`` give each program one tile of ``block_m`` rows that all belong to one
expert. This module builds that layout from ``topk_ids`` [T, k]; every output shape depends on (T, k, E,
block_m) alone, so the step can be captured in a CUDA graph and replayed with new routing:

- pair ``p = t * k + j`` is token t's j-th choice, expert ``topk_ids[t, j]``;
- each expert's pairs form one segment of ``sorted_ids``, in pair order, padded to a multiple of ``block_m``
  with the sentinel ``T * k``; segments follow in expert order; the tail past the last segment is sentinel too;
- ``block_expert[b]`` is the expert of rows ``b*block_m .. (b+1)*block_m``, or -1 for a block past the end.

Sizes: at most ``min(E, T*k)`` experts are non-empty, each wastes at most ``block_m - 1`` rows, so
``max_rows = T*k + min(E, T*k) * (block_m - 1)`` rows (rounded up to whole blocks) always suffice (tighter than
``E * (block_m - 1)``: at T=1, k=8, E=256 it gives 8 blocks instead of 256, and the GEMM grids are sized from it).
Expert ids outside [0, E) (e.g. -1 for an expert owned by another rank) get no row: such pairs are dropped.

Three implementations build the same (deterministic) layout; ``moe_align(impl=None)`` picks one by size
(``align_impl``):

- ``impl="triton"``: one Triton program (``_moe_align_kernel``): one launch, which matters inside a decode graph
  where every tiny kernel costs a few microseconds. It does O(T*k*E) comparisons on one SM, so it is chosen only
  while ``T*k * next_pow2(E) <= TRITON_ALIGN_MAX_WORK`` (every decode batch; docs/fused_moe.md#3-the-align-step);
- ``impl="sort"``: a stable sort of the expert ids and ~15 sync-free torch ops, O(T*k log(T*k) + E) on the whole
  GPU: the prefill path. Pair p's row is its expert's padded segment start plus its rank in the sorted order
  minus its expert's unpadded start (found by ``searchsorted`` in the sorted ids: no atomics, no host sync);
- ``impl="torch"``: about 25 small sync-free torch ops, the readable statement of the layout: the rank of a pair
  inside its expert is a cumulative sum over a [T*k, E+1] one-hot comparison (O(T*k*E) memory: small T only).

None of them uses ``torch.bincount`` (CUDA reads the input's max on the host even with ``minlength``) or
``F.one_hot`` (validates on the host), so all three run inside CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class MoEAlignment:
    sorted_ids: torch.Tensor  # [max_rows] int32: pair ids grouped by expert, sentinel num_pairs in padding
    block_expert: torch.Tensor  # [max_rows // block_m] int32: expert of each row block, -1 past the end
    num_pairs: int  # T * k (the sentinel value)
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.numel()


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of ``sorted_ids``, rounded up to a multiple of ``block_m`` (whole row blocks)."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


# The one-program align does 2 * T*k * next_pow2(E) comparisons in tiles of 8 K on one SM. It is used while
# T*k * next_pow2(E) is at most this (T*k <= 4096 at E = 256, <= 2048 at E = 384: every decode batch); past it the
# sort path, spread over the GPU (docs/fused_moe.md#3-the-align-step).
TRITON_ALIGN_MAX_WORK = 1 << 20

_IMPLS = ("triton", "sort", "torch")


def align_impl(num_pairs: int, num_experts: int) -> str:
    """The implementation ``moe_align(impl=None)`` uses for ``num_pairs`` pairs over ``num_experts`` experts."""
    return "triton" if num_pairs * triton.next_power_of_2(num_experts) <= TRITON_ALIGN_MAX_WORK else "sort"


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, impl: str | None = None) -> MoEAlignment:
    """Group the pairs of ``topk_ids`` [T, k] (any shape: pairs in flattened order) by expert (module doc).
    ``impl``: "triton", "sort" or "torch" (same layout); None chooses by size (``align_impl``)."""
    if impl is None:
        impl = align_impl(topk_ids.numel(), num_experts)
    if impl == "triton":
        return _align_triton(topk_ids, num_experts, block_m)
    if impl == "sort":
        return _align_sort(topk_ids, num_experts, block_m)
    if impl == "torch":
        return _align_torch(topk_ids, num_experts, block_m)
    raise ValueError(f"moe_align impl must be one of {_IMPLS} or None, got {impl!r}")


def _segments(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert pair counts [E] -> (start, end) of each expert's block_m-padded segment of sorted_ids."""
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = padded.cumsum(0)  # no host scalar anywhere: graph-safe
    return seg_end - padded, seg_end


def _layout(dest: torch.Tensor, pair_ids: torch.Tensor, seg_end: torch.Tensor, num_pairs: int, block_m: int,
            max_rows: int) -> MoEAlignment:
    """Scatter ``pair_ids`` to rows ``dest`` (``max_rows``: dropped) of a sentinel-filled sorted_ids; block_expert
    from the segment ends."""
    dev, E = dest.device, seg_end.numel()
    # Dropped pairs land in one extra sink row at index max_rows, cut off below.
    sorted_ids = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, pair_ids.to(torch.int32))
    block_start = torch.arange(0, max_rows, block_m, device=dev, dtype=seg_end.dtype)
    # The block's expert is the first one whose segment ends after the block starts (empty experts skipped).
    block_expert = torch.searchsorted(seg_end.contiguous(), block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return MoEAlignment(sorted_ids[:max_rows], block_expert, num_pairs, block_m)


def _align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    n = topk_ids.numel()
    E, dev = num_experts, topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < E), ids, E)  # out-of-range ids -> spill bucket E
    buckets = torch.arange(E + 1, device=dev)
    # rank_in[p, e] = number of pairs q <= p with expert e; its last row is the per-expert count.
    rank_in = (ids[:, None] == buckets[None, :]).to(torch.int32).cumsum(0, dtype=torch.int32)
    counts = rank_in[-1, :E].to(torch.int64)
    rank = rank_in.gather(1, ids[:, None]).squeeze(1) - 1  # position of each pair inside its expert
    seg_start, seg_end = _segments(counts, block_m)
    max_rows = max_sorted_rows(n, E, block_m)
    dest = torch.where(ids < E, seg_start[ids.clamp(max=E - 1)] + rank, max_rows)
    return _layout(dest, torch.arange(n, device=dev), seg_end, n, block_m, max_rows)


def _align_sort(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    n = topk_ids.numel()
    E, dev = num_experts, topk_ids.device
    ids = topk_ids.reshape(-1)
    key = torch.where((ids >= 0) & (ids < E), ids, E).to(torch.int32)  # dropped pairs sort past every expert
    sorted_key, order = torch.sort(key, stable=True)  # order[i]: the pair at sorted position i (pair order kept)
    # first[e]: sorted position of expert e's first pair (first[E]: of the first dropped pair); no atomics.
    first = torch.searchsorted(sorted_key, torch.arange(E + 1, dtype=torch.int32, device=dev))
    seg_start, seg_end = _segments(first[1:] - first[:-1], block_m)
    max_rows = max_sorted_rows(n, E, block_m)
    # Sorted position i of expert e -> row seg_start[e] + (i - first[e]).
    shift = seg_start - first[:-1]
    pos = torch.arange(n, device=dev)
    dest = torch.where(sorted_key < E, pos + shift[sorted_key.clamp(max=E - 1).long()], max_rows)
    return _layout(dest, order, seg_end, n, block_m, max_rows)


@triton.jit
def _moe_align_kernel(
    IDS, SORTED_IDS, BLOCK_EXPERT, num_pairs, num_experts, max_rows,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program. Per-expert vectors (counts, segment starts) live in registers; pairs are read in chunks of
    CHUNK and compared against all experts at once ([CHUNK, E_POW2]), so ranks come from a column cumsum."""
    experts = tl.arange(0, E_POW2)
    e_ok = experts < num_experts
    # Pass 1: pairs per expert (ids outside [0, E) match no valid column).
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        e = tl.load(IDS + p, mask=p < num_pairs, other=-1)
        hit = (e[:, None] == experts[None, :]) & e_ok[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    seg_end = tl.cumsum(padded, axis=0)
    seg_start = seg_end - padded
    # Pass 2: each pair goes to its expert's next free row (next_row[e] starts at the segment start).
    next_row = seg_start
    for p0 in range(0, num_pairs, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        e = tl.load(IDS + p, mask=p < num_pairs, other=-1)
        hit = ((e[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)
        row = tl.cumsum(hit, axis=0) - hit + next_row[None, :]  # row of the pair at (p, e), where hit
        dest = tl.sum(hit * row, axis=1)
        tl.store(SORTED_IDS + dest, p, mask=tl.sum(hit, axis=1) > 0)
        next_row += tl.sum(hit, axis=0)
    # Padding: rows next_row[e] .. seg_end[e] of each expert (< BLOCK_M of them), then the tail. No row is
    # written twice, so no barrier is needed between the passes.
    pad = tl.full([E_POW2], 0, dtype=tl.int32) + num_pairs
    for j in range(BLOCK_M - 1):
        tl.store(SORTED_IDS + next_row + j, pad, mask=next_row + j < seg_end)
    total = tl.sum(padded, axis=0)
    for r0 in range(total, max_rows, E_POW2):
        tl.store(SORTED_IDS + r0 + experts, pad, mask=r0 + experts < max_rows)
    # Block -> expert: expert e owns blocks seg_start[e] / BLOCK_M ..; blocks past the end get -1.
    n_blocks = padded // BLOCK_M
    for j in range(0, tl.max(n_blocks, axis=0)):
        tl.store(BLOCK_EXPERT + seg_start // BLOCK_M + j, experts, mask=j < n_blocks)
    none = tl.full([E_POW2], -1, dtype=tl.int32)
    for b0 in range(total // BLOCK_M, max_rows // BLOCK_M, E_POW2):
        tl.store(BLOCK_EXPERT + b0 + experts, none, mask=b0 + experts < max_rows // BLOCK_M)


def _align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    n = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    max_rows = max_sorted_rows(n, num_experts, block_m)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=ids.device)
    e_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, min(triton.next_power_of_2(n), 8192 // e_pow2))  # [chunk, E_POW2]: <= 8 K elements
    _moe_align_kernel[(1,)](ids, sorted_ids, block_expert, n, num_experts, max_rows,
                            BLOCK_M=block_m, E_POW2=e_pow2, CHUNK=chunk, num_warps=8)
    return MoEAlignment(sorted_ids, block_expert, n, block_m)


def moe_align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[list[int]], int]:
    """Host-side expectation for tests: per expert, its pair ids in order (valid ids only), and max_rows."""
    flat = topk_ids.reshape(-1).tolist()
    groups = [[p for p, e in enumerate(flat) if e == x] for x in range(num_experts)]
    return groups, max_sorted_rows(len(flat), num_experts, block_m)
