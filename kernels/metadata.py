"""Per-step MLA decode metadata: one ``MLAMetadata`` per step, shared by every layer.

The work plan splits the step's KV work over a grid of ``num_parts`` programs (times row tiles). Each
request b costs ``ceil(L_b / plan_block) + overhead`` plan units (0 for padding slots with q_len 0 or
seq_len 0), laid end to end in request order; part p takes units [part_bounds[p], part_bounds[p+1])
and runs, for requests part_reqs[2p] .. part_reqs[2p+1]-1, the KV blocks whose units fall in its range.
A request inside one part is written to the output; one cut over ``num_splits[b] > 1`` parts writes
partial slots split_indptr[b] + (p - first_part[b]) that the merge kernel combines (jobs merge_reqs[:num_merge]).

Strategies:
- ``persistent``: every buffer allocated once at construction for the largest batch / q_len; ``build``
  refills them on the GPU with one Triton kernel (no host sync, no allocation, graph-capturable);
  parts = the SM count over the row tiles. Of three plans it takes the first two's when their largest part
  is within ``split_cost`` units (what a cut request pays for its partial traffic and merge) of an equal
  slice, tried in order, else the third:
  - per request (no more active requests than parts): request b cut into k_b = ceil(kv_b / w) equal parts
    of its own, w the smallest width >= w_lo with sum k_b <= parts, so equal requests that fit one a
    part are not cut at all, and B requests over 2B parts are cut in two, not three. w_lo is min_chunk (4),
    or less for a step with little KV: a part's time grows by a block per block of width and every cut row
    tile adds about 1 / cut_ratio of a block (its fp32 partial written and merged), so of the widths
    1..min_chunk that fit, w_lo is the one with the least cut_ratio * (longest piece) + tiles * (pieces of cut
    requests): one 1k request runs over 16 parts of one block, a 4k one over 32 of two, a 16k one over 64 of
    four (H = 64). With a DRAM floor (``dram_ratio``: by default ``device_dram_ratio`` for a multiple of 64
    heads, else 0) no part is counted faster than the DRAM streams the step's KV (its blocks /
    dram_ratio), wider widths are weighed too and a per-request plan up to the floor counts as balanced:
    64 x 1k at H = 64 then runs whole on 64 parts instead of cut in two (H100: 56 -> 50 us), 128 x 16k whole
    on 128 parts instead of slices (879 -> 819 us); and a per-request plan up to 1 / ``slack_div`` of a slice
    longer counts as balanced too (64 x 16k at H = 128: whole requests on 64 parts, not 66 slices that cut
    every one of them);
  - packed (many short requests of similar length): no request cut, each whole in the part whose equal
    slice of the total holds its middle unit (128 requests of 1k over 66 parts: two a part, no merge);
  - slices: each part an equal slice of the total cost, except that a boundary falling inside a request
    no longer than a slice moves to that request's nearer edge when within min(chunk // snap_div,
    snap_max) units: a cut costs a merge and about 4 units of partial traffic, so moving a boundary by
    fewer units than that is a win (fewer merges, little imbalance). One long request among short ones,
    or lengths too uneven to pack, take this plan.
  ``max_kv_splits`` caps the parts any one request is cut into (the slices grow to fit), not the grid.
  Out-of-bounds requests (q_len > max_q_len, seq_len > block-table width * page_size) are found on the GPU:
  planned as padding slots and flagged for ``check``, which raises (every build copies the flag to the host
  asynchronously: call it where the caller synchronizes anyway).
- ``per_step``: the baseline: the plan computed on the host from host lists with a fixed split count per
  request, fresh tensors copied to the device every step. Eager only. Out-of-bounds requests raise in ``build``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mla_runner.kernels import mla_decode_sm90 as sm90
from mla_runner.kernels import reference as ref

PLAN_BLOCK = 64  # KV tokens per plan unit
OVERHEAD = 2  # plan units charged per request on top of its KV blocks (q load, output write)
ROWS_PER_TILE = 64  # rows (q_len * H) per program the plan assumes when sizing the grid
SPLIT_COST = 4  # plan units a cut request costs a part (partial write, merge read), when choosing the plan
# a KV block in a part costs about 16 times what one cut row tile adds (H100:
# docs/mla_decode.md#33-the-per-request-width)
CUT_RATIO = 16
# KV blocks the whole GPU reads from DRAM while a part computes one 64-row block on the sm90 kernel: H100, ~2.07 us
# a block (the steady pair at H = 128) over 73.7 KB at 3.0 TB/s; 0 drops the DRAM floor. Builders default to it for
# whole 64-row tiles (a multiple of 64 heads) and leave it off otherwise: a cut costs partials of the request's own
# rows only, so cuts are cheap below 64 heads, on the generic kernel's small tiles (H = 16, 64 x 1k: 49 us without the
# floor, 61 with it) and on the sm90 kernel's partial tiles (H = 8-16, 8-32 requests of 1-4k: 1.2-2.0 us a layer faster
# without it). Other GPUs get it scaled by their DRAM bandwidth and SM clock against the H100 SXM it was measured on
# (``device_dram_ratio``). docs/mla_decode.md#4-the-dram-floor
DRAM_RATIO = 84
DRAM_RATIO_BW, DRAM_RATIO_CLOCK = 3.352e12, 1.98e9  # H100 SXM: HBM3 2 x 2619 MHz x 5120 bits; SM clock 1980 MHz
# The per-request plan counts as balanced up to this fraction (1 / SLACK_DIV) of a slice beyond the slice + overhead +
# split_cost: where the slices would cut every one of many long requests once, whole pieces ~3% longer win (H100,
# H = 128 and q_len 2 x 64 heads, 32-64 requests of 16k, 4-round A/B: 1-5% per call, 4-5% per layer). Builders default
# to it for 64-row tiles (a multiple of 64 heads, or any head count on an sm90 GPU with page 64, whose kernel pads the
# rows: H = 16, 128 x 16k 809 us a layer with it, 825 without), else 0 (no slack).
# docs/mla_decode.md#5-the-slack-for-long-cut-requests
SLACK_DIV = 64


@dataclass
class MLAMetadata:
    qo_indptr: torch.Tensor  # [B+1] int32: query-token offsets of each request in the step's T tokens
    seq_lens: torch.Tensor  # [B] int32: KV length of each request including this step's tokens
    block_table: torch.Tensor  # [B, max_pages] int32: page ids of each request
    kv_indptr: torch.Tensor  # [B+1] int32: cumsum of seq_lens
    max_qo_len: torch.Tensor  # [1] int32 on the device: max q_len over all requests
    cu_cost: torch.Tensor  # [B+1] int32: plan units before each request
    part_bounds: torch.Tensor  # [num_parts+1] int32: unit range of each part
    part_reqs: torch.Tensor  # [num_parts, 2] int32: request range each part walks
    first_part: torch.Tensor  # [B] int32: first part that runs KV of the request
    num_splits: torch.Tensor  # [B] int32: number of parts the request is cut over (0 = padding)
    split_indptr: torch.Tensor  # [B] int32: first partial slot of a split request
    merge_reqs: torch.Tensor  # [max_merges] int32: split requests, the first num_merge valid
    num_merge: torch.Tensor  # [1] int32
    o_partial: torch.Tensor  # [slots, max_q_len * H, kv_lora_rank] fp32
    lse_partial: torch.Tensor  # [slots, max_q_len * H] fp32 (log2 domain)
    num_parts: int  # grid size (host)
    max_merges: int  # merge grid size (host)
    max_q_len: int  # host bound on q_len (sizes the row-tile grid)
    num_heads: int
    kv_lora_rank: int
    page_size: int
    plan_block: int = PLAN_BLOCK
    overhead: int = OVERHEAD
    dropped: torch.Tensor | None = None  # [1] int32 (persistent): requests dropped as out of bounds, see check()

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]


def _device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep CPU tests fast


def device_dram_ratio(device) -> int:
    """``DRAM_RATIO`` for ``device``: the blocks streamed while a part computes one grow with the DRAM bandwidth
    and shrink with the SM clock (a block's compute time, at the Hopper SM's rate a clock), both from the
    driver's spec values; DRAM_RATIO itself off CUDA (the interpreter's plans match the H100's)."""
    device = _device(device)
    if device.type != "cuda":
        return DRAM_RATIO
    from triton.runtime import driver

    return scaled_dram_ratio(driver.active.utils.get_device_properties(device.index))


def scaled_dram_ratio(props: dict) -> int:
    """DRAM_RATIO scaled from the H100 SXM to a GPU given by the driver's ``mem_clock_rate`` and ``sm_clock_rate``
    (kHz) and ``mem_bus_width`` (bits)."""
    bw = 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8  # two transfers a memory clock
    clock = props["sm_clock_rate"] * 1e3
    return max(1, round(DRAM_RATIO * bw / DRAM_RATIO_BW * DRAM_RATIO_CLOCK / clock))


def _check_common(num_heads, max_batch, max_q_len, max_pages_per_seq, page_size, kv_lora_rank):
    for name, v in dict(num_heads=num_heads, max_batch=max_batch, max_q_len=max_q_len,
                        max_pages_per_seq=max_pages_per_seq, page_size=page_size, kv_lora_rank=kv_lora_rank).items():
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")


def _check_inputs(seq_lens, qo_indptr, block_table, max_batch, max_pages):
    B = seq_lens.shape[0]
    if seq_lens.dim() != 1 or not 0 < B <= max_batch:
        raise ValueError(f"seq_lens must be [B] with 1 <= B <= max_batch={max_batch}, got {tuple(seq_lens.shape)}")
    if qo_indptr.shape != (B + 1,):
        raise ValueError(f"qo_indptr must be [B + 1] = [{B + 1}], got {tuple(qo_indptr.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] > max_pages:
        raise ValueError(f"block_table must be [B={B}, <= {max_pages}], got {tuple(block_table.shape)}")
    for name, t in (("seq_lens", seq_lens), ("qo_indptr", qo_indptr), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if not (seq_lens.device == qo_indptr.device == block_table.device):
        raise ValueError("seq_lens, qo_indptr and block_table must be on one device")


def per_step_plan(seq_lens: list[int], q_lens: list[int], num_kv_splits: int, plan_block: int = PLAN_BLOCK,
                  overhead: int = OVERHEAD) -> dict[str, list]:
    """Host plan of the per_step strategy in O(B + parts): each request's KV cut into
    min(num_kv_splits, blocks) consecutive parts of its own (same fields as reference.plan_from_bounds)."""
    B = len(seq_lens)
    costs = ref.request_costs(seq_lens, q_lens, plan_block, overhead)
    cu, bounds, part_reqs = [0], [0], []
    first_part, num_splits, split_indptr, merge_reqs = [0] * B, [0] * B, [0] * B, []
    slots = 0
    for b, c in enumerate(costs):
        acc = cu[-1]
        cu.append(acc + c)
        split_indptr[b] = slots
        if c == 0:
            continue
        nb = c - overhead
        k = min(num_kv_splits, nb)
        first_part[b], num_splits[b] = len(bounds) - 1, k
        bounds += [acc + overhead + (j * nb) // k for j in range(1, k)] + [acc + c]
        part_reqs += [b, b + 1] * k
        if k > 1:
            slots += k
            merge_reqs.append(b)
    return dict(cu_cost=cu, part_bounds=bounds, part_reqs=part_reqs, first_part=first_part,
                num_splits=num_splits, split_indptr=split_indptr, merge_reqs=merge_reqs,
                num_merge=len(merge_reqs), num_slots=slots)


class PersistentMetadataBuilder:
    """Fixed buffers sized once; ``build`` refills them on the GPU (one Triton launch, graph-capturable)."""

    def __init__(self, *, num_heads: int, max_batch: int, max_q_len: int, max_pages_per_seq: int, page_size: int,
                 device, kv_lora_rank: int = 512, max_kv_splits: int | None = None, num_parts: int | None = None,
                 min_chunk: int = 4, plan_block: int = PLAN_BLOCK, overhead: int = OVERHEAD, snap_div: int = 2,
                 snap_max: int = 4, split_cost: int = SPLIT_COST, cut_ratio: int = CUT_RATIO,
                 dram_ratio: int | None = None, slack_div: int | None = None):
        _check_common(num_heads, max_batch, max_q_len, max_pages_per_seq, page_size, kv_lora_rank)
        self.device = _device(device)
        self.num_heads, self.max_batch, self.max_q_len = num_heads, max_batch, max_q_len
        self.max_pages, self.page_size, self.kv_lora_rank = max_pages_per_seq, page_size, kv_lora_rank
        self.plan_block, self.overhead, self.min_chunk = plan_block, overhead, max(1, min_chunk)
        # a boundary inside a request shorter than a slice moves to an edge closer than
        # min(chunk // snap_div, snap_max) units: a cut request costs about 4 units of partial traffic
        self.snap_div, self.snap_max = snap_div, snap_max
        self.split_cost, self.cut_ratio = split_cost, cut_ratio
        # the measured defaults: the DRAM floor for whole 64-row tiles, the slack for any 64-row tiles (the sm90
        # kernel pads partial ones); the interpreter's plans at 64 or 128 heads match the H100's
        whole_tiles = num_heads % ROWS_PER_TILE == 0
        tiles64 = whole_tiles or sm90.device_reason(self.device, page_size, plan_block) is None
        if dram_ratio is None:
            dram_ratio = device_dram_ratio(self.device) if whole_tiles else 0
        if dram_ratio < 0:
            raise ValueError(f"dram_ratio must be >= 0 (0: no DRAM floor), got {dram_ratio}")
        self.dram_ratio = dram_ratio
        if slack_div is None:
            slack_div = SLACK_DIV if tiles64 else 0
        if slack_div < 0:
            raise ValueError(f"slack_div must be >= 0 (0: no slack), got {slack_div}")
        self.slack_div = slack_div
        self.tiles = -(-(max_q_len * num_heads) // ROWS_PER_TILE)  # row tiles of a request (as the plan counts)
        if num_parts is None:
            num_parts = max(_sm_count(self.device) // self.tiles, 1)
        if num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {num_parts}")
        self.num_parts = num_parts
        # a cap on the parts any one request is cut into (the slice grows for that), not on the grid
        self.max_kv_splits = max_kv_splits or 0
        i32 = dict(dtype=torch.int32, device=self.device)
        P, Bm = num_parts, max_batch
        self.bufs = dict(
            kv_indptr=torch.zeros(Bm + 1, **i32), max_qo_len=torch.zeros(1, **i32),
            cu_cost=torch.zeros(Bm + 1, **i32), part_bounds=torch.zeros(P + 1, **i32),
            part_reqs=torch.zeros(P, 2, **i32), first_part=torch.zeros(Bm, **i32),
            num_splits=torch.zeros(Bm, **i32), split_indptr=torch.zeros(Bm, **i32),
            merge_reqs=torch.zeros(P, **i32), num_merge=torch.zeros(1, **i32), dropped=torch.zeros(1, **i32),
        )
        # a request cut n > 1 ways holds n - 1 of the P - 1 inner part boundaries: slots <= 2 (P - 1)
        slots = max(2 * (P - 1), 1)
        rows = max_q_len * num_heads
        self.o_partial = torch.empty(slots, rows, kv_lora_rank, dtype=torch.float32, device=self.device)
        self.lse_partial = torch.empty(slots, rows, dtype=torch.float32, device=self.device)
        # a host copy of the dropped-requests flag, refreshed by every build without a sync (check() reads it)
        dropped = self.bufs["dropped"]
        self._dropped_host = dropped.cpu().pin_memory() if dropped.is_cuda else dropped

    def build(self, seq_lens: torch.Tensor, qo_indptr: torch.Tensor, block_table: torch.Tensor) -> MLAMetadata:
        """Refill the plan for this step from device tensors only.

        Bounds the host cannot check without a sync are checked on the GPU: a request with q_len > max_q_len
        or seq_len > the block table's width * page_size is planned as a padding slot (its output rows are
        not written, nothing past its row is read) and recorded for ``check``."""
        from mla_runner.kernels.plan_kernels import build_persistent_plan

        _check_inputs(seq_lens, qo_indptr, block_table, self.max_batch, self.max_pages)
        if seq_lens.device != self.device:
            raise ValueError(f"inputs on {seq_lens.device}, builder buffers on {self.device}")
        B = seq_lens.shape[0]
        b = self.bufs
        build_persistent_plan(seq_lens, qo_indptr, b, self.num_parts, self.plan_block, self.overhead,
                              self.min_chunk, self.max_batch, self.snap_div, self.snap_max,
                              self.max_kv_splits, self.split_cost, self.tiles, self.cut_ratio, self.dram_ratio,
                              self.slack_div, self.max_q_len,
                              block_table.shape[1] * self.page_size)
        if b["dropped"].is_cuda:
            self._dropped_host.copy_(b["dropped"], non_blocking=True)
        return MLAMetadata(
            qo_indptr=qo_indptr, seq_lens=seq_lens, block_table=block_table,
            kv_indptr=b["kv_indptr"][: B + 1], max_qo_len=b["max_qo_len"], cu_cost=b["cu_cost"][: B + 1],
            part_bounds=b["part_bounds"], part_reqs=b["part_reqs"], first_part=b["first_part"][:B],
            num_splits=b["num_splits"][:B], split_indptr=b["split_indptr"][:B], merge_reqs=b["merge_reqs"],
            num_merge=b["num_merge"], o_partial=self.o_partial, lse_partial=self.lse_partial,
            num_parts=self.num_parts, max_merges=self.num_parts, max_q_len=self.max_q_len,
            num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank, page_size=self.page_size,
            plan_block=self.plan_block, overhead=self.overhead, dropped=b["dropped"],
        )

    def check(self) -> None:
        """Raise ValueError if a build since the last check dropped a request as out of bounds (see ``build``).
        Reads the flag's host copy, which every build refreshes asynchronously: call it once the stream has
        passed the builds to check (where the caller synchronizes anyway, e.g. after sampling)."""
        code = int(self._dropped_host.item())
        if code:
            self.bufs["dropped"].zero_()
            self._dropped_host.zero_()
            why = [w for bit, w in ((1, f"a q_len over max_q_len={self.max_q_len}"),
                                    (2, "a seq_len over its block-table row's capacity")) if code & bit]
            raise ValueError(f"MLA metadata dropped requests (outputs not written): {' and '.join(why)}")


class PerStepMetadataBuilder:
    """The baseline: plan computed on the host from host lists, ``num_kv_splits`` parts per request."""

    def __init__(self, *, num_heads: int, max_batch: int, max_q_len: int, max_pages_per_seq: int, page_size: int,
                 device, kv_lora_rank: int = 512, num_kv_splits: int = 4, plan_block: int = PLAN_BLOCK,
                 overhead: int = OVERHEAD):
        _check_common(num_heads, max_batch, max_q_len, max_pages_per_seq, page_size, kv_lora_rank)
        if num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
        self.device = _device(device)
        self.num_heads, self.max_batch, self.max_q_len = num_heads, max_batch, max_q_len
        self.max_pages, self.page_size, self.kv_lora_rank = max_pages_per_seq, page_size, kv_lora_rank
        self.num_kv_splits, self.plan_block, self.overhead = num_kv_splits, plan_block, overhead

    def build(self, seq_lens: torch.Tensor, qo_indptr: torch.Tensor, block_table: torch.Tensor,
              seq_lens_host: list[int], q_lens_host: list[int]) -> MLAMetadata:
        """The plan of this step from the host lists (the same lengths as the device tensors); raises ValueError on
        an out-of-bounds request."""
        _check_inputs(seq_lens, qo_indptr, block_table, self.max_batch, self.max_pages)
        B = seq_lens.shape[0]
        if seq_lens_host is None or q_lens_host is None or len(seq_lens_host) != B or len(q_lens_host) != B:
            raise ValueError(f"per_step metadata needs seq_lens_host and q_lens_host lists of length B={B}")
        if max(q_lens_host) > self.max_q_len:
            raise ValueError(f"a q_len of {max(q_lens_host)} exceeds max_q_len={self.max_q_len}")
        cap = block_table.shape[1] * self.page_size
        if max(seq_lens_host) > cap:
            raise ValueError(f"a seq_len of {max(seq_lens_host)} exceeds the {cap} tokens a block-table row maps")
        plan = per_step_plan(seq_lens_host, q_lens_host, self.num_kv_splits, self.plan_block, self.overhead)
        bounds = plan["part_bounds"]
        dev = self.device

        def t(x):
            return torch.tensor(x, dtype=torch.int32).to(dev)

        P = len(bounds) - 1
        max_q = max(max(q_lens_host), 1)
        rows = max_q * self.num_heads
        slots = max(plan["num_slots"], 1)
        kv_indptr = t(ref.kv_indptr_reference(seq_lens_host))
        return MLAMetadata(
            qo_indptr=qo_indptr, seq_lens=seq_lens, block_table=block_table, kv_indptr=kv_indptr,
            max_qo_len=t([max(q_lens_host)]), cu_cost=t(plan["cu_cost"]), part_bounds=t(plan["part_bounds"]),
            part_reqs=t(plan["part_reqs"] or [0, 0]).view(-1, 2), first_part=t(plan["first_part"]),
            num_splits=t(plan["num_splits"]), split_indptr=t(plan["split_indptr"]),
            merge_reqs=t(plan["merge_reqs"] or [0]), num_merge=t([plan["num_merge"]]),
            o_partial=torch.empty(slots, rows, self.kv_lora_rank, dtype=torch.float32, device=dev),
            lse_partial=torch.empty(slots, rows, dtype=torch.float32, device=dev),
            num_parts=P, max_merges=plan["num_merge"], max_q_len=max_q, num_heads=self.num_heads,
            kv_lora_rank=self.kv_lora_rank, page_size=self.page_size, plan_block=self.plan_block,
            overhead=self.overhead,
        )

