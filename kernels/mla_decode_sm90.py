"""Hopper MLA decode in Gluon: the same plan and outputs as ``kernels.mla_decode``, with explicit warpgroups.

Why a second kernel: Triton (3.6) lays the 64 x 64 score tile of the generic kernel over both warpgroups
with warps stacked along rows, so each warpgroup computes the whole QK^T (576-deep) for the same 64 rows:
the largest matmul of the block runs twice, in 64 x 32 instructions. Gluon lets us pick the layouts and
the schedule: FlashMLA's "seesaw" (its deep-dive write-up, 2025-04) in two warp-specialized partitions of
one warpgroup each, over tiles of 64 rows (row = (query token, head)):

- warpgroup 0 computes the full S = Q K^T [64 rows, 64 tokens] of even KV blocks, warpgroup 1 of odd blocks,
  so one warpgroup's softmax runs while the other's matmuls do;
- the running max, the rescale factors and P (bf16) pass through shared memory (P over the block's rope
  part, which S no longer needs); warpgroup g owns value columns 256g .. 256g + 255 of O (fp32, 128
  registers a thread) and its share of the row sum;
- Q (64 x 576) stays in shared memory for a request; KV blocks (64 tokens = one page) arrive by TMA in three
  parts with their own barriers into two stages (one a warpgroup), and S starts on the first part to land;
- a request that is not cut leaves through shared memory by TMA; a cut one as fp32 partials +
  log2-sum-exp, which ``kernels.mla_merge`` combines (a programmatic dependent launch: CTAs let it launch
  once their first request's loads are issued, unless that request is cut more than
  ``EARLY_LAUNCH_SPLITS`` ways);
- at a CTA's first request (every CTA loads at once) stage B's loads wait for Q and A's first part, so the
  first scores start sooner;
- a row's running max moves only when a block's max is more than ``RESCALE_TAU`` = 8 (log2) above it, so P
  stays <= 2^8 and, after the first blocks, O is rarely rescaled: a warp whose 16 rows all kept their max
  votes to jump over the 128 multiplies a thread (FlashAttention-4's conditional rescaling: 2.5-3.3% at H = 128
  in graphs of 8-16 layers, where the H100 runs at its power cap);
- only a block that reaches past a row's last visible token (a request's last block, or causal within its new
  tokens) is masked, and S's scale rides in the exponent's FMA (0.1-0.4 us at short calls).

Rows of a request's last page past its length may hold anything (NaN included): they are zeroed in shared memory
before they are used as values. The design, the measurements behind it and the schedules measured and rejected
(among them "lockstep", both warpgroups on the same block): docs/mla_decode.md#8-the-gluon-sm90-kernel.

Supported: sm90, bf16, 576 = 512 + 64, page size 64, plan block 64, contiguous q, cache and output; any head
count. A request's q_len x H rows are cut into 64-row tiles; with H not a multiple of 64 its last tile is partial:
the rows past the request's (the next request's, read by the Q TMA, or zeros past the last) are computed and
never stored, and that tile's output leaves by masked stores (``FULL`` = False; whole tiles compile to the same
code as without the masks). 8 to 32 heads (DeepSeek-V3 and Kimi-K2 at TP 4-8) run at the 64-head kernel's time:
the KV read, not the wasted tensor rows, bounds them. ``supported`` says why not otherwise; ``kernels.mla_decode``
falls back to the generic kernel then. Gluon kernels do not run under the interpreter: tested on the GPU. Written
for Triton 3.6's Gluon; the few names newer Gluon renamed are looked up once below.
"""
from __future__ import annotations

from typing import Optional

import torch

from mla_runner.kernels.mla_merge import EARLY_LAUNCH_SPLITS
from mla_runner.kernels.plan_kernels import part_range, request_span

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    _GLUON_ERROR = None
    # Triton 3.6 names (the GPU image) and their newer spellings
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except (ImportError, AttributeError) as e:  # an older Triton: the generic kernel serves
    _GLUON_ERROR = f"this Triton has no Gluon for Hopper ({e})"

BLOCK_H, BLOCK_N, DV, DPE, HALF = 64, 64, 512, 64, 256
# registers of the seesaw's second warpgroup: 256 leaves both warpgroups without spills (232: 48 B of stack)
WORKER_REGS = 256
# a row's running max (the exponent base of its P and O) moves only when a block's max is this far above it (log2
# units): P <= 2^8, and a warp whose rows all kept theirs skips the 128 multiplies a thread of rescaling O
RESCALE_TAU = 8.0


def device_reason(device: torch.device, page_size: int, plan_block: int) -> Optional[str]:
    """None when the Gluon kernel serves bf16 calls on ``device`` with this paging, else the reason (one line)."""
    if _GLUON_ERROR is not None:
        return _GLUON_ERROR
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "the Gluon kernel needs an sm90 GPU"
    if page_size != BLOCK_N or plan_block != BLOCK_N:
        return f"the Gluon kernel needs page size and plan block {BLOCK_N}"
    return None


def supported(q: torch.Tensor, kv_cache: torch.Tensor, meta, kv_lora_rank: int,
              out: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the Gluon kernel can run this call, else the reason (one line)."""
    reason = device_reason(q.device, meta.page_size, meta.plan_block)
    if reason is not None:
        return reason
    if q.dtype != torch.bfloat16:
        return f"the Gluon kernel needs bf16, got {q.dtype}"
    if q.shape[-1] != DV + DPE or kv_lora_rank != DV:
        return f"the Gluon kernel needs 576 = 512 + 64 wide vectors, got {q.shape[-1]} with rank {kv_lora_rank}"
    if not (q.is_contiguous() and kv_cache.is_contiguous() and (out is None or out.is_contiguous())):
        return "the Gluon kernel needs contiguous q, cache and output"
    return None


if _GLUON_ERROR is None:
    # O * sc over a thread's 128 accumulator registers in one asm block, jumped over by a warp that voted "no
    # rescale": Gluon branches only on values uniform over the warpgroup, and a reduction over its rows to get
    # one spilled the kernel (248 B of stack); a warp vote costs nothing. Registers are tied (in = out).
    _NACC = gl.constexpr(128)  # accumulator registers a thread: O's 64 x 256 fp32 over 128 threads
    _RESCALE_ASM = gl.constexpr(
        "{ .reg .pred p; setp.eq.s32 p, $" + str(3 * _NACC.value) + ", 0; @p bra.uni SKIP; "
        + "".join(f"mul.f32 ${j}, ${_NACC.value + j}, ${2 * _NACC.value + j}; " for j in range(_NACC.value))
        + "SKIP: }")
    _RESCALE_CONSTRAINTS = gl.constexpr(",".join(["=r"] * _NACC.value + [str(j) for j in range(_NACC.value)]
                                                 + ["r"] * (2 * _NACC.value)))

    @gluon.jit
    def _rescale(acc, sc, ROW_O: gl.constexpr):
        """acc * sc (sc per row), skipped by the warps none of whose rows has sc < 1 (sc is exactly 1 for a row
        whose max stayed: an exact no-op). sc comes in the score rows' layout, two rows a thread."""
        gl.static_assert(acc.type.shape[0] * acc.type.shape[1] == _NACC * 4 * 32)
        rescale = gl.inline_asm_elementwise(  # 1 on every lane of a warp where some lane's row has sc < 1
            "{ .reg .pred p, q; setp.lt.f32 p, $2, 0f3F800000; setp.lt.f32 q, $3, 0f3F800000; or.pred p, p, q; "
            "vote.sync.any.pred p, p, 0xffffffff; selp.u32 $0, 1, 0, p; selp.u32 $1, 1, 0, p; }",
            "=r,=r,r,r", [sc], dtype=gl.int32, is_pure=False, pack=2)
        scb, _ = gl.broadcast(gl.expand_dims(gl.convert_layout(sc, ROW_O), 1), acc)
        flag, _ = gl.broadcast(gl.expand_dims(gl.convert_layout(rescale, ROW_O), 1), acc)
        return gl.inline_asm_elementwise(_RESCALE_ASM, _RESCALE_CONSTRAINTS, [acc, scb, flag], dtype=gl.float32,
                                         is_pure=True, pack=_NACC)

    @gluon.jit
    def _load_rows(LAT_DESC, PE_DESC, bar, lat, pe, row, HALF: gl.constexpr):
        """TMA of a Q tile's 64 rows of [*, 576] into shared memory on one barrier: latent columns [0, 512) as
        two [64, 256] boxes into ``lat``, the rope part into ``pe``."""
        mbarrier.expect(bar, (lat.type.shape[0] * lat.type.shape[1] + pe.type.shape[0] * pe.type.shape[1]) * 2)
        _tma_load(LAT_DESC, [row, 0], bar, lat.slice(0, HALF, dim=1))
        _tma_load(LAT_DESC, [row, HALF], bar, lat.slice(HALF, HALF, dim=1))
        _tma_load(PE_DESC, [row, 2 * HALF], bar, pe)

    @gluon.jit
    def _store_result(acc, l_i, m_i, o_smem, O_DESC, O, O_PART, LSE_PART, FIRST_PART, SPLIT_INDPTR, n_split, b,
                      p, tile, q_start, n_rows, H, rows_max, stride_ls, COL0: gl.constexpr, BLOCK_H: gl.constexpr,
                      HALF: gl.constexpr, DV: gl.constexpr, O_L: gl.constexpr, FULL: gl.constexpr):
        """Normalize the tile's output columns [COL0, COL0 + acc's width) and write them. A request that is not
        split goes to the output by TMA from shared memory ``o_smem`` (a KV stage, free once the request's blocks
        are done; the caller waits for the store before refilling it); a split one to the part's fp32 partial
        slot with the rows' log2-sum-exp, by plain stores (through TMA they cost 3-4% at batches 1-8, where every
        part writes a partial: docs/mla_decode.md#83-start-up-request-boundaries-and-outputs). ``FULL``: every tile
        is whole (H is a multiple of 64); otherwise a request's last tile has rows past its own (``n_rows``), which
        are not stored, and an output leaves by masked plain stores (a TMA box would write over the next request's
        rows)."""
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        W: gl.constexpr = acc.type.shape[1]
        l_o = gl.convert_layout(l_i, ROW_O)
        has = l_o > 0.0
        out = acc * gl.expand_dims(1.0 / gl.where(has, l_o, 1.0), 1)
        rows_o = tile * BLOCK_H + gl.arange(0, BLOCK_H, layout=ROW_O)
        cols_o = COL0 + gl.arange(0, W, layout=gl.SliceLayout(0, O_L))
        in_req = gl.expand_dims(rows_o < n_rows, 1) & gl.expand_dims(cols_o < DV, 0)  # (unused with FULL)
        if n_split == 1:
            if FULL:
                tma.store_wait(0)  # (a no-op after the stage's refill, which waited already)
                o_smem.store(out.to(gl.bfloat16))
                fence_async_shared()
                _cta_barrier()
                for c in gl.static_range(0, W, HALF):
                    _tma_store(O_DESC, [q_start * H + tile * BLOCK_H, COL0 + c], o_smem.slice(c, HALF, dim=1))
            else:
                po_out = O + (q_start * H + rows_o).to(gl.int64) * DV
                gl.store(gl.expand_dims(po_out, 1) + gl.expand_dims(cols_o, 0), out.to(gl.bfloat16), mask=in_req)
        else:
            slot = (gl.load(SPLIT_INDPTR + b) + p - gl.load(FIRST_PART + b)).to(gl.int64)
            po = O_PART + (slot * rows_max + rows_o) * DV
            gl.store(gl.expand_dims(po, 1) + gl.expand_dims(cols_o, 0), out, mask=None if FULL else in_req)
            m_o = gl.convert_layout(m_i, ROW_O)
            lse = gl.where(has, m_o + gl.log2(gl.where(has, l_o, 1.0)), gl.full_like(m_o, float("-inf")))
            gl.store(LSE_PART + slot * stride_ls + rows_o, lse, mask=None if FULL else rows_o < n_rows)

    @gluon.jit
    def _load_part(KV_DESC, KV_PE_DESC, bars, stage, lat, pe, row_kv, part: gl.constexpr, HALF: gl.constexpr):
        """TMA of one part of a block into its stage: 0 = latent columns [0, 256), 1 = [256, 512), 2 = rope.
        Each part completes its own barrier (bars[3 * stage + part]), so scores start on the first to land."""
        bar = bars.index(3 * stage + part)
        if part == 2:
            mbarrier.expect(bar, pe.type.shape[0] * pe.type.shape[1] * 2)
            _tma_load(KV_PE_DESC, [row_kv, 2 * HALF], bar, pe)
        else:
            mbarrier.expect(bar, lat.type.shape[0] * HALF * 2)
            _tma_load(KV_DESC, [row_kv, part * HALF], bar, lat.slice(part * HALF, HALF, dim=1))

    @gluon.jit
    def _block_scores(q_lat_ring, q_pe_ring, zero, bars, stage, phase, k_lat, k_pe, n0, L, end_n, full_n, pos,
                      FIRST: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr,
                      HALF: gl.constexpr, S_L: gl.constexpr):
        """S = Q K^T [BLOCK_H, BLOCK_N] of one block (fp32, unscaled), latent half FIRST first, each part consumed
        as its TMA lands; -inf where a row may not see a token, computed only for a block that reaches past
        ``full_n`` (every row of the tile sees every token before it). Rows of the block past L (a last page's
        unwritten rows) are zeroed first: both warpgroups use them as values."""
        SECOND: gl.constexpr = 1 - FIRST
        if n0 + BLOCK_N > L:
            mbarrier.wait(bars.index(3 * stage + 0), phase)
            mbarrier.wait(bars.index(3 * stage + 1), phase)
            Z_L: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            zrows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Z_L))
            for c in gl.static_range(0, DV, 128):
                part = k_lat.slice(c, 128, dim=1)
                x = part.load(Z_L)
                part.store(gl.where(gl.expand_dims(zrows < L, 1), x, gl.zeros_like(x)))
            fence_async_shared()
            _cta_barrier()
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=S_L)
        q_lat = q_lat_ring.index(zero)
        mbarrier.wait(bars.index(3 * stage + FIRST), phase)
        s = warpgroup_mma(q_lat.slice(FIRST * HALF, HALF, dim=1),
                          k_lat.slice(FIRST * HALF, HALF, dim=1).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(bars.index(3 * stage + SECOND), phase)
        s = warpgroup_mma(q_lat.slice(SECOND * HALF, HALF, dim=1),
                          k_lat.slice(SECOND * HALF, HALF, dim=1).permute((1, 0)), s, is_async=True)
        mbarrier.wait(bars.index(3 * stage + 2), phase)
        s = warpgroup_mma(q_pe_ring.index(zero), k_pe.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
        if n0 + BLOCK_N > full_n:
            toks = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
            ok = (gl.expand_dims(toks, 0) < end_n) & (gl.expand_dims(toks, 0) <= gl.expand_dims(pos, 1))
            s = gl.where(ok, s, gl.full_like(s, float("-inf")))
        return s

    @gluon.jit
    def _seesaw_partition(
        Q_DESC, Q_PE_DESC, KV_DESC, KV_PE_DESC, O_DESC, O, O_PART, LSE_PART, BLOCK_TABLE,
        QO_INDPTR, SEQ_LENS, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART, NUM_SPLITS, SPLIT_INDPTR,
        stride_bt, stride_ls, rows_max, scale_log2, H, overhead,
        q_lat_ring, q_pe_ring, kv_lat, kv_pe, xch, bars,
        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, DPE: gl.constexpr, HALF: gl.constexpr,
        ROLE: gl.constexpr, EARLY_SPLITS: gl.constexpr, TAU: gl.constexpr, FULL: gl.constexpr,
    ):
        """One warpgroup of the seesaw (FlashMLA's schedule, see the module doc). Blocks 2i ("A", stage 0) are
        scored by warpgroup 0, blocks 2i + 1 ("B", stage 1) by warpgroup 1; warpgroup g owns value columns
        [256g, 256g + 256) of O and its share of the row sum. Per pair of blocks, with m the running max:
          wg0: S_A; m0 = max(m, rowmax S_A) (per row, only if above m + TAU); P_A = exp2(S_A - m0) -> smem
               (over A's rope part), m0, sc0 -> wg1;
               O_L = O_L sc0 + P_A V_A,L; then (P_B, sc1 from wg1) O_L = O_L sc1 + P_B V_B,L
          wg1: S_B; (P_A, m0, sc0 from wg0) O_R = O_R sc0 + P_A V_A,R, overlapped with its softmax:
               m1 = max(m0, rowmax S_B), sc1 = exp2(m0 - m1), P_B -> smem, sc1 -> wg0; O_R = O_R sc1 + P_B V_B,R
        The owner refills its stage in parts: the latent half only it reads as soon as its own P V is done, the
        other half and the rope part once the other warpgroup says it is done with them (bars free0 / free1).
        Warp-specialized partitions hold their arguments in registers: every register counts (an in-kernel merge
        spilled the loop here, 336 B of stack, 1.3x slower)."""
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HALF, 16])
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        OTHER: gl.constexpr = 1 - ROLE
        # bars 0..5: TMA landed, [3 * stage + part] (parts: latent [0, 256), [256, 512), rope)
        free0 = bars.index(6)  # wg1 is done with stage 0's part 1 and P_A (arrives once per A block)
        free1 = bars.index(7)  # wg0 is done with stage 1's part 0 and P_B (once per B block)
        q_full = bars.index(8)
        q_empty = bars.index(9)  # count 2: both warpgroups are done with Q (once per request)
        p0_bar = bars.index(10)  # P_A, m0, sc0 written (once per A block)
        p1_bar = bars.index(11)  # P_B, sc1, m1 written (once per B block)
        # bars 12..15: row-sum exchange, [12 + 2 * role + (request parity)]
        v_col = ROLE * HALF

        p = gl.program_id(1)  # row tiles are the fast grid axis (see kernels.mla_decode.MAX_PARTS)
        tile = gl.program_id(0)
        begin, end, b_lo, b_hi = part_range(p, PART_BOUNDS, PART_REQS)
        na = 0  # A blocks (stage 0 fills) before this request, B blocks (stage 1), requests with KV work
        nb = 0
        nq = 0
        for b in range(b_lo, b_hi):
            active, q_start, q_len, n_rows, L, start_n, end_n, full_n = request_span(
                b, tile, begin, end, CU_COST, QO_INDPTR, SEQ_LENS, H, overhead, BLOCK_H, BLOCK_N)
            if active:
                n_blocks = gl.maximum(end_n - start_n + BLOCK_N - 1, 0) // BLOCK_N
                n_pairs = (n_blocks + 1) // 2
                bt_row = BLOCK_TABLE + b * stride_bt + start_n // BLOCK_N
                rows_s = tile * BLOCK_H + gl.arange(0, BLOCK_H, layout=ROW_S)
                pos = L - q_len + rows_s // H
                m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, layout=ROW_S)
                l_i = gl.zeros([BLOCK_H], gl.float32, layout=ROW_S)
                acc = gl.zeros([BLOCK_H, HALF], gl.float32, layout=O_L)
                if n_blocks > 0:
                    if ROLE == 0:
                        if nq > 0:
                            mbarrier.wait(q_empty, (nq - 1) & 1)
                        _load_rows(Q_DESC, Q_PE_DESC, q_full, q_lat_ring.index(0), q_pe_ring.index(0),
                                   q_start * H + tile * BLOCK_H, HALF)
                        tma.store_wait(0)  # this warpgroup's previous output left through its stage
                        if na > 0:
                            mbarrier.wait(free0, (na - 1) & 1)
                        row_kv = gl.load(bt_row) * BLOCK_N
                        for part in gl.static_range(3):
                            _load_part(KV_DESC, KV_PE_DESC, bars, 0, kv_lat.index(0), kv_pe.index(0), row_kv, part,
                                       HALF)
                    else:
                        tma.store_wait(0)
                        if n_blocks > 1:
                            if nq == 0:  # the start-up burst: B's loads wait for Q and A's first part
                                mbarrier.wait(q_full, 0)
                                mbarrier.wait(bars.index(0), 0)
                            if nb > 0:
                                mbarrier.wait(free1, (nb - 1) & 1)
                            row_kv = gl.load(bt_row + 1) * BLOCK_N
                            for part in gl.static_range(3):
                                _load_part(KV_DESC, KV_PE_DESC, bars, 1, kv_lat.index(1), kv_pe.index(1), row_kv,
                                           (1 - part) if part < 2 else 2, HALF)  # wg1 scores part 1 first
                    if nq == 0:  # the merge kernel may launch now, unless its programs would be heavy
                        if gl.load(NUM_SPLITS + b) <= EARLY_SPLITS:  # (kernels.mla_merge.EARLY_LAUNCH_SPLITS)
                            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                                      dtype=gl.int32, is_pure=False, pack=1)
                    mbarrier.wait(q_full, nq & 1)
                    for i in range(n_pairs):
                        ga = na + i
                        gb = nb + i
                        has_b = 2 * i + 1 < n_blocks
                        zero = i >> 30  # a loop-variant 0: keeps Q's wgmma descriptors from being hoisted
                        if ROLE == 0:
                            n0 = start_n + 2 * i * BLOCK_N
                            s = _block_scores(q_lat_ring, q_pe_ring, zero, bars, 0, ga & 1, kv_lat.index(0),
                                              kv_pe.index(0), n0, L, end_n, full_n, pos, 0, BLOCK_H, BLOCK_N, DV,
                                              HALF, S_L)
                            if i == n_pairs - 1:
                                mbarrier.arrive(q_empty, count=1)
                            # a row keeps its (stale) max unless this block's is TAU above it; S is scaled
                            # inside the exponent's FMA
                            mx = gl.max(s, 1) * scale_log2
                            m0 = gl.where(mx > m_i + TAU, gl.maximum(m_i, mx), m_i)
                            sc0 = gl.exp2(m_i - m0)
                            pr = gl.exp2(gl.fma(s, scale_log2, -gl.expand_dims(m0, 1)))
                            l_i = l_i * sc0 + gl.sum(pr, 1)
                            kv_pe.index(0).store(pr.to(gl.bfloat16))  # P_A over A's rope part (scores are done)
                            xch.index(0).store(m0)
                            xch.index(1).store(sc0)
                            fence_async_shared()
                            _cta_barrier()
                            mbarrier.arrive(p0_bar, count=1)
                            acc = _rescale(acc, sc0, ROW_O)
                            acc = warpgroup_mma(kv_pe.index(0), kv_lat.index(0).slice(0, HALF, dim=1), acc)
                            if 2 * i + 2 < n_blocks:  # refill stage 0: part 0 now (only wg0 reads it), the rest
                                row_kv = gl.load(bt_row + 2 * i + 2) * BLOCK_N  # once wg1 is done with it
                                _load_part(KV_DESC, KV_PE_DESC, bars, 0, kv_lat.index(0), kv_pe.index(0), row_kv, 0,
                                           HALF)
                                mbarrier.wait(free0, ga & 1)
                                _load_part(KV_DESC, KV_PE_DESC, bars, 0, kv_lat.index(0), kv_pe.index(0), row_kv, 1,
                                           HALF)
                                _load_part(KV_DESC, KV_PE_DESC, bars, 0, kv_lat.index(0), kv_pe.index(0), row_kv, 2,
                                           HALF)
                            if has_b:
                                mbarrier.wait(p1_bar, gb & 1)
                                m_i = xch.index(2).load(ROW_S)
                                sc1 = xch.index(3).load(ROW_S)
                                mbarrier.wait(bars.index(3), gb & 1)  # stage 1, part 0
                                l_i = l_i * sc1
                                acc = _rescale(acc, sc1, ROW_O)
                                acc = warpgroup_mma(kv_pe.index(1), kv_lat.index(1).slice(0, HALF, dim=1), acc)
                                _cta_barrier()
                                mbarrier.arrive(free1, count=1)
                            else:
                                m_i = m0
                        else:
                            n1 = start_n + (2 * i + 1) * BLOCK_N
                            s = gl.full([BLOCK_H, BLOCK_N], float("-inf"), gl.float32, layout=S_L)
                            sc1 = gl.full([BLOCK_H], 1.0, gl.float32, layout=ROW_S)
                            if has_b:
                                s = _block_scores(q_lat_ring, q_pe_ring, zero, bars, 1, gb & 1, kv_lat.index(1),
                                                  kv_pe.index(1), n1, L, end_n, full_n, pos, 1, BLOCK_H, BLOCK_N,
                                                  DV, HALF, S_L)
                            if i == n_pairs - 1:
                                mbarrier.arrive(q_empty, count=1)
                            mbarrier.wait(p0_bar, ga & 1)
                            m0 = xch.index(0).load(ROW_S)
                            sc0 = xch.index(1).load(ROW_S)
                            mbarrier.wait(bars.index(1), ga & 1)  # stage 0, part 1
                            l_i = l_i * sc0
                            acc = _rescale(acc, sc0, ROW_O)
                            acc = warpgroup_mma(kv_pe.index(0), kv_lat.index(0).slice(HALF, HALF, dim=1), acc,
                                                is_async=True)
                            m_i = m0
                            if has_b:  # softmax of B while P_A V_A,R runs
                                mx = gl.max(s, 1) * scale_log2
                                m1 = gl.where(mx > m0 + TAU, gl.maximum(m0, mx), m0)
                                sc1 = gl.exp2(m0 - m1)
                                pr = gl.exp2(gl.fma(s, scale_log2, -gl.expand_dims(m1, 1)))
                                kv_pe.index(1).store(pr.to(gl.bfloat16))
                                xch.index(2).store(m1)
                                xch.index(3).store(sc1)
                                fence_async_shared()
                                _cta_barrier()
                                mbarrier.arrive(p1_bar, count=1)
                                l_i = l_i * sc1 + gl.sum(pr, 1)
                                m_i = m1
                            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                            _cta_barrier()
                            mbarrier.arrive(free0, count=1)
                            if has_b:
                                acc = _rescale(acc, sc1, ROW_O)
                                acc = warpgroup_mma(kv_pe.index(1), kv_lat.index(1).slice(HALF, HALF, dim=1), acc)
                                if 2 * i + 3 < n_blocks:  # refill stage 1: part 1 now, the rest once wg0 is done
                                    row_kv = gl.load(bt_row + 2 * i + 3) * BLOCK_N
                                    _load_part(KV_DESC, KV_PE_DESC, bars, 1, kv_lat.index(1), kv_pe.index(1), row_kv,
                                               1, HALF)
                                    mbarrier.wait(free1, gb & 1)
                                    _load_part(KV_DESC, KV_PE_DESC, bars, 1, kv_lat.index(1), kv_pe.index(1), row_kv,
                                               0, HALF)
                                    _load_part(KV_DESC, KV_PE_DESC, bars, 1, kv_lat.index(1), kv_pe.index(1), row_kv,
                                               2, HALF)
                    # the row sum is split over the warpgroups: exchange (double-buffered by request parity)
                    xch.index(4 + 2 * ROLE + (nq & 1)).store(l_i)
                    _cta_barrier()
                    mbarrier.arrive(bars.index(12 + 2 * ROLE + (nq & 1)), count=1)
                    mbarrier.wait(bars.index(12 + 2 * OTHER + (nq & 1)), (nq >> 1) & 1)
                    l_other = xch.index(4 + 2 * OTHER + (nq & 1)).load(ROW_S)
                    if ROLE == 0:
                        l_i = l_i + l_other
                    else:
                        l_i = l_other + l_i
                    na += n_pairs
                    nb += n_blocks // 2
                    nq += 1

                # each warpgroup writes its columns through its own stage (both are past their last block: the
                # row-sum exchange above); both write the (identical) log-sum-exp of a split request
                _store_result(acc, l_i, m_i, kv_lat.index(ROLE).slice(0, HALF, dim=1), O_DESC, O, O_PART,
                              LSE_PART, FIRST_PART, SPLIT_INDPTR, gl.load(NUM_SPLITS + b), b, p, tile, q_start,
                              n_rows, H, rows_max, stride_ls, v_col, BLOCK_H, HALF, DV, O_L, FULL)
        tma.store_wait(0)

    @gluon.jit
    def _mla_decode_sm90_seesaw(
        Q_DESC, Q_PE_DESC, KV_DESC, KV_PE_DESC, O_DESC, O, O_PART, LSE_PART, BLOCK_TABLE,
        QO_INDPTR, SEQ_LENS, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART, NUM_SPLITS, SPLIT_INDPTR,
        stride_bt, stride_ls, rows_max, scale_log2, H, overhead,
        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, DPE: gl.constexpr, HALF: gl.constexpr,
        WORKER_REGS: gl.constexpr, EARLY_SPLITS: gl.constexpr, TAU: gl.constexpr, FULL: gl.constexpr,
    ):
        gl.static_assert(BLOCK_H == 64 and BLOCK_N == 64 and DV == 2 * HALF and DPE == BLOCK_N)
        LAT_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DV], gl.bfloat16)
        PE_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DPE], gl.bfloat16)
        X_SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_lat_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, DV], LAT_SL)
        q_pe_ring = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, DPE], PE_SL)
        kv_lat = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, DV], LAT_SL)
        kv_pe = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, DPE], PE_SL)  # rope part, then P
        # m0, sc0 (from wg0), m1, sc1 (from wg1), row sums [4 + 2 * role + parity]
        xch = gl.allocate_shared_memory(gl.float32, [8, BLOCK_H], X_SL)
        bars = gl.allocate_shared_memory(gl.int64, [16, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(16):
            mbarrier.init(bars.index(k), count=2 if k == 9 else 1)
        fence_async_shared()
        gl.warp_specialize([
            (_seesaw_partition, (Q_DESC, Q_PE_DESC, KV_DESC, KV_PE_DESC, O_DESC, O, O_PART, LSE_PART,
                                 BLOCK_TABLE, QO_INDPTR, SEQ_LENS, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART,
                                 NUM_SPLITS, SPLIT_INDPTR, stride_bt, stride_ls, rows_max, scale_log2, H, overhead,
                                 q_lat_ring, q_pe_ring, kv_lat, kv_pe, xch, bars, BLOCK_H, BLOCK_N, DV, DPE, HALF, 0,
                                 EARLY_SPLITS, TAU, FULL)),
            (_seesaw_partition, (Q_DESC, Q_PE_DESC, KV_DESC, KV_PE_DESC, O_DESC, O, O_PART, LSE_PART,
                                 BLOCK_TABLE, QO_INDPTR, SEQ_LENS, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART,
                                 NUM_SPLITS, SPLIT_INDPTR, stride_bt, stride_ls, rows_max, scale_log2, H, overhead,
                                 q_lat_ring, q_pe_ring, kv_lat, kv_pe, xch, bars, BLOCK_H, BLOCK_N, DV, DPE, HALF, 1,
                                 EARLY_SPLITS, TAU, FULL)),
        ], [4], [WORKER_REGS])


def descriptor_layouts():
    """Shared-memory layouts of the TMA boxes: [64, 256] latent halves (Q, KV, output) and [64, 64] rope parts."""
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, DPE], gl.bfloat16))


def mla_decode_sm90(q: torch.Tensor, kv_cache: torch.Tensor, meta, sm_scale: float, out: torch.Tensor,
                    log2e: float) -> None:
    """Launch the decode kernel on inputs ``supported`` accepted. Requests that are not cut are written to
    ``out``; cut ones are left as partials for ``kernels.mla_merge``."""
    T, H, D = q.shape
    lat_l, pe_l = descriptor_layouts()
    q2, kv2 = q.view(T * H, D), kv_cache.view(-1, D)
    o_part, lse_part = meta.o_partial, meta.lse_partial
    descs = (GluonDescriptor.from_tensor(q2, [BLOCK_H, HALF], lat_l),
             GluonDescriptor.from_tensor(q2, [BLOCK_H, DPE], pe_l),
             GluonDescriptor.from_tensor(kv2, [BLOCK_N, HALF], lat_l),
             GluonDescriptor.from_tensor(kv2, [BLOCK_N, DPE], pe_l),
             GluonDescriptor.from_tensor(out.view(T * H, DV), [BLOCK_H, HALF], lat_l))
    n_tiles = -(-meta.max_q_len * H // BLOCK_H)
    _mla_decode_sm90_seesaw[(n_tiles, meta.num_parts)](
        *descs, out, o_part, lse_part, meta.block_table,
        meta.qo_indptr, meta.seq_lens, meta.cu_cost, meta.part_bounds, meta.part_reqs, meta.first_part,
        meta.num_splits, meta.split_indptr,
        meta.block_table.stride(0), lse_part.stride(0), o_part.shape[1], sm_scale * log2e, H, meta.overhead,
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, DV=DV, DPE=DPE, HALF=HALF, WORKER_REGS=WORKER_REGS,
        EARLY_SPLITS=EARLY_LAUNCH_SPLITS, TAU=RESCALE_TAU, FULL=H % BLOCK_H == 0, num_warps=4)
