"""Persistent split-KV MLA decode over a paged latent cache (Triton), and its checking wrapper.

One program = (part p of the work plan, row tile t). A row is one (query token, head) pair of a request:
row r = i * H + h for query token i and head h, so a request with q_len n has n * H rows, cut into
tiles of BLOCK_H rows. Part p walks the requests of its slice of the plan (``kernels.metadata``) and, for
each, runs the KV blocks of that request that fall in its slice: every KV vector (576 = latent + rope)
is loaded once per row tile (two value halves + the rope part; through TMA tensor descriptors when a
block lies in one page) and used both for the scores (q . kv over all 576) and as the value (first
``kv_lora_rank`` entries). Online softmax in fp32, base 2. A request handled by one part is written
straight to the output; a request cut over several parts writes normalized fp32 partials and their
log2-sum-exp, merged by ``kernels.mla_merge``. Design and measurements: docs/mla_decode.md#7-the-triton-kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_runner.kernels import mla_decode_sm90 as sm90
from mla_runner.kernels.kv_cache import GROUP, KVCacheLayout, layout_of
from mla_runner.kernels.mla_merge import EARLY_LAUNCH_SPLITS, dependent_launch, gdc_launch_dependents, mla_merge
from mla_runner.kernels.plan_kernels import part_range, request_span

LOG2E = 1.4426950408889634
# Grid = (row tiles, parts): the row tiles of a part are launched next to each other, so the CTAs that read the
# same KV (H = 128 has two 64-row tiles) start together and share it through L2: 3-5% faster at H = 128 on an H100
# than (parts, row tiles). Parts are on the second axis, at most 65535.
MAX_PARTS = 65535
KV_GROUP = tl.constexpr(GROUP)  # fp8_ds_mla: latent values per scale


@triton.jit
def _attend(acc_a, acc_b, m_i, l_i, q_a, q_b, q_pe, KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, BLOCK_TABLE, bt_row,
            n0, end_n, pos, scale_log2, stride_kvp, stride_kvs,
            DV: tl.constexpr, HALF: tl.constexpr, DPE: tl.constexpr, BLOCK_DPE: tl.constexpr,
            BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PLAN_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
            UPCAST: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr, KV_FMT: tl.constexpr,
            NG: tl.constexpr, GH: tl.constexpr, PE_COL: tl.constexpr):
    """One block of BLOCK_N KV tokens starting at n0: scores, online softmax, value accumulation.

    The value columns are handled as two halves (a: [0, HALF), b: [HALF, 2 HALF)). MASKED=False is the
    steady state (every token exists and every row sees it): no masks, and with USE_TMA the block
    (which lies in one page) is fetched by the tensor-memory accelerator. KV_FMT (``kernels.kv_cache``): 0 the
    model dtype, 1 and 2 FP8 caches, dequantized in registers by ``_load_kv_fp8``.
    """
    offs = n0 + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_dpe = tl.arange(0, BLOCK_DPE)
    a_ok = offs_h < DV
    b_ok = HALF + offs_h < DV
    dpe_ok = offs_dpe < DPE
    kv_ok = offs < end_n
    if (PAGE_SIZE % BLOCK_N == 0) and (PLAN_BLOCK % BLOCK_N == 0):  # the block lies in one page
        page = tl.load(BLOCK_TABLE + bt_row + n0 // PAGE_SIZE)
    elif MASKED:
        page = tl.load(BLOCK_TABLE + bt_row + offs // PAGE_SIZE, mask=kv_ok, other=0)
    else:
        page = tl.load(BLOCK_TABLE + bt_row + offs // PAGE_SIZE)
    if KV_FMT != 0:
        kv_a, kv_b, k_pe = _load_kv_fp8(KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, page, offs, n0, kv_ok, stride_kvp,
                                        stride_kvs, DV, HALF, DPE, BLOCK_DPE, BLOCK_N, PAGE_SIZE, USE_TMA, MASKED,
                                        KV_FMT, NG, GH, PE_COL)
        kv_a = kv_a.to(q_a.dtype)
        kv_b = kv_b.to(q_a.dtype)
        k_pe = k_pe.to(q_a.dtype)
    elif USE_TMA and not MASKED:
        row0 = page * PAGE_SIZE + n0 % PAGE_SIZE
        kv_a = KV_DESC.load([row0, 0])
        kv_b = KV_DESC.load([row0, HALF])
        k_pe = KV_DESC_PE.load([row0, DV])
    else:
        kv_row = KV + page.to(tl.int64) * stride_kvp + (offs % PAGE_SIZE) * stride_kvs
        if MASKED:
            kv_a = tl.load(kv_row[:, None] + offs_h[None, :], mask=kv_ok[:, None] & a_ok[None, :], other=0.0)
            kv_b = tl.load(kv_row[:, None] + HALF + offs_h[None, :], mask=kv_ok[:, None] & b_ok[None, :],
                           other=0.0)
            k_pe = tl.load(kv_row[:, None] + DV + offs_dpe[None, :], mask=kv_ok[:, None] & dpe_ok[None, :],
                           other=0.0)
        else:
            kv_a = tl.load(kv_row[:, None] + offs_h[None, :], mask=a_ok[None, :], other=0.0)
            kv_b = tl.load(kv_row[:, None] + HALF + offs_h[None, :], mask=b_ok[None, :], other=0.0)
            k_pe = tl.load(kv_row[:, None] + DV + offs_dpe[None, :], mask=dpe_ok[None, :], other=0.0)
    if UPCAST and KV_FMT == 0:  # Triton 3.9's interpreter computes bf16 dots wrongly: do them in fp32 there
        kv_a = kv_a.to(tl.float32)
        kv_b = kv_b.to(tl.float32)
        k_pe = k_pe.to(tl.float32)
    qk = tl.dot(q_a, tl.trans(kv_a), input_precision=DOT_PREC)
    qk = tl.dot(q_b, tl.trans(kv_b), acc=qk, input_precision=DOT_PREC)
    qk = tl.dot(q_pe, tl.trans(k_pe), acc=qk, input_precision=DOT_PREC)
    qk = qk * scale_log2
    if MASKED:
        qk = tl.where(kv_ok[None, :] & (offs[None, :] <= pos[:, None]), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    pr = pr.to(kv_a.dtype)
    acc_a = tl.dot(pr, kv_a, acc=acc_a * alpha[:, None], input_precision=DOT_PREC)
    acc_b = tl.dot(pr, kv_b, acc=acc_b * alpha[:, None], input_precision=DOT_PREC)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _load_kv_fp8(KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, page, offs, n0, kv_ok, stride_kvp, stride_kvs,
                 DV: tl.constexpr, HALF: tl.constexpr, DPE: tl.constexpr, BLOCK_DPE: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr,
                 KV_FMT: tl.constexpr, NG: tl.constexpr, GH: tl.constexpr, PE_COL: tl.constexpr):
    """A block's (kv_a, kv_b, k_pe) from an FP8 cache, to be cast to the query's dtype by the caller.

    KV_FMT 1 (``fp8``, per tensor): the e4m3 values as stored (exact in bf16); the kernel applies the scale to the
    scores and the output. KV_FMT 2 (``fp8_ds_mla``): KV holds the bytes as e4m3, KV_SC as fp32 and KV_PE as bf16
    (views of one cache, strides in bytes); latent values come back in fp32, each multiplied by its token's
    power-of-two scale of its 128-value group (exact), the rope part in bf16 from PE_COL (bf16 elements). A half
    is HALF // GH groups of GH columns: half a's groups are 0, 1, ..., half b's from HALF // 128 on (a half of
    fewer than 128 columns is one group, the token's only one: DV <= 2 HALF <= 128)."""
    offs_h = tl.arange(0, HALF)
    offs_dpe = tl.arange(0, BLOCK_DPE)
    a_ok = offs_h < DV
    b_ok = HALF + offs_h < DV
    dpe_ok = offs_dpe < DPE
    tok = page.to(tl.int64) * stride_kvp + (offs % PAGE_SIZE) * stride_kvs  # bytes
    if USE_TMA and not MASKED:
        row0 = page * PAGE_SIZE + n0 % PAGE_SIZE
        kv_a = KV_DESC.load([row0, 0])
        kv_b = KV_DESC.load([row0, HALF])
        k_pe = KV_DESC_PE.load([row0, PE_COL])
    else:
        if MASKED:
            m_a = kv_ok[:, None] & a_ok[None, :]
            m_b = kv_ok[:, None] & b_ok[None, :]
            m_pe = kv_ok[:, None] & dpe_ok[None, :]
        else:
            m_a = a_ok[None, :]
            m_b = b_ok[None, :]
            m_pe = dpe_ok[None, :]
        kv_a = tl.load(KV + tok[:, None] + offs_h[None, :], mask=m_a, other=0.0)
        kv_b = tl.load(KV + tok[:, None] + HALF + offs_h[None, :], mask=m_b, other=0.0)
        if KV_FMT == 1:
            k_pe = tl.load(KV + tok[:, None] + PE_COL + offs_dpe[None, :], mask=m_pe, other=0.0)
        else:
            k_pe = tl.load(KV_PE + tok[:, None] // 2 + PE_COL + offs_dpe[None, :], mask=m_pe, other=0.0)
    if KV_FMT == 2:
        g = tl.arange(0, HALF // GH)
        g_b = HALF // KV_GROUP + g
        sc_row = KV_SC + (tok + DV) // 4
        if MASKED:
            m_sa = kv_ok[:, None] & (g < NG)[None, :]
            m_sb = kv_ok[:, None] & (g_b < NG)[None, :]
        else:
            m_sa = (g < NG)[None, :]
            m_sb = (g_b < NG)[None, :]
        sc_a = tl.load(sc_row[:, None] + g[None, :], mask=m_sa, other=0.0)
        sc_b = tl.load(sc_row[:, None] + g_b[None, :], mask=m_sb, other=0.0)
        kv_a = tl.reshape(kv_a.to(tl.float32), [BLOCK_N, HALF // GH, GH]) * sc_a[:, :, None]
        kv_b = tl.reshape(kv_b.to(tl.float32), [BLOCK_N, HALF // GH, GH]) * sc_b[:, :, None]
        kv_a = tl.reshape(kv_a, [BLOCK_N, HALF])
        kv_b = tl.reshape(kv_b, [BLOCK_N, HALF])
    return kv_a, kv_b, k_pe


@triton.jit
def _mla_decode_kernel(
    Q, KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, O, O_PART, LSE_PART, BLOCK_TABLE,
    QO_INDPTR, SEQ_LENS, CU_COST, PART_BOUNDS, PART_REQS, FIRST_PART, NUM_SPLITS, SPLIT_INDPTR,
    stride_qt, stride_qh, stride_kvp, stride_kvs, stride_ot, stride_oh, stride_bt,
    stride_ps, stride_pr, stride_ls,
    scale_log2, H, overhead,
    DV: tl.constexpr, DPE: tl.constexpr, HALF: tl.constexpr, BLOCK_DPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PLAN_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr,
    EARLY_SPLITS: tl.constexpr, KV_FMT: tl.constexpr = 0, NG: tl.constexpr = 0, GH: tl.constexpr = 1,
    PE_COL: tl.constexpr = 0,
):
    p = tl.program_id(1)  # row tiles are the fast grid axis (see MAX_PARTS)
    tile = tl.program_id(0)
    begin, end, b_lo, b_hi = part_range(p, PART_BOUNDS, PART_REQS)
    if PDL:  # the merge kernel may launch now, unless its programs would be heavy (kernels.mla_merge)
        if b_lo < b_hi:
            if tl.load(NUM_SPLITS + b_lo) <= EARLY_SPLITS:
                gdc_launch_dependents()

    offs_r = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    tok = offs_r // H
    head = offs_r % H
    offs_h = tl.arange(0, HALF)
    offs_dpe = tl.arange(0, BLOCK_DPE)
    a_ok = offs_h < DV
    b_ok = HALF + offs_h < DV
    dpe_ok = offs_dpe < DPE
    if KV_FMT == 1:  # the fp8 layout's per-tensor scale: on the scores here, on the output below
        kv_scale = tl.load(KV_SC)
        scale_log2 = scale_log2 * kv_scale

    for b in range(b_lo, b_hi):
        active, q_start, q_len, n_rows, L, start_n, end_n, full_n = request_span(
            b, tile, begin, end, CU_COST, QO_INDPTR, SEQ_LENS, H, overhead, BLOCK_H, PLAN_BLOCK)
        if active:
            row_ok = offs_r < n_rows
            pos = L - q_len + tok  # KV position of each row's query token
            q_row = Q + (q_start + tok) * stride_qt + head * stride_qh
            q_a = tl.load(q_row[:, None] + offs_h[None, :], mask=row_ok[:, None] & a_ok[None, :], other=0.0)
            q_b = tl.load(q_row[:, None] + HALF + offs_h[None, :], mask=row_ok[:, None] & b_ok[None, :], other=0.0)
            q_pe = tl.load(q_row[:, None] + DV + offs_dpe[None, :], mask=row_ok[:, None] & dpe_ok[None, :],
                           other=0.0)
            if UPCAST:
                q_a = q_a.to(tl.float32)
                q_b = q_b.to(tl.float32)
                q_pe = q_pe.to(tl.float32)
            n_full = tl.maximum(full_n - start_n, 0) // BLOCK_N  # whole blocks every row sees: no mask
            bt_row = b * stride_bt

            m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
            acc_a = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
            for i in range(0, n_full):
                acc_a, acc_b, m_i, l_i = _attend(
                    acc_a, acc_b, m_i, l_i, q_a, q_b, q_pe, KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, BLOCK_TABLE,
                    bt_row, start_n + i * BLOCK_N, end_n, pos, scale_log2, stride_kvp, stride_kvs, DV, HALF, DPE,
                    BLOCK_DPE, BLOCK_N, PAGE_SIZE, PLAN_BLOCK, DOT_PREC, UPCAST, USE_TMA, False, KV_FMT, NG, GH,
                    PE_COL)
            for n0 in range(start_n + n_full * BLOCK_N, end_n, BLOCK_N):
                acc_a, acc_b, m_i, l_i = _attend(
                    acc_a, acc_b, m_i, l_i, q_a, q_b, q_pe, KV, KV_DESC, KV_DESC_PE, KV_SC, KV_PE, BLOCK_TABLE,
                    bt_row, n0, end_n, pos, scale_log2, stride_kvp, stride_kvs, DV, HALF, DPE,
                    BLOCK_DPE, BLOCK_N, PAGE_SIZE, PLAN_BLOCK, DOT_PREC, UPCAST, USE_TMA, True, KV_FMT, NG, GH,
                    PE_COL)

            has = l_i > 0.0
            inv = 1.0 / tl.where(has, l_i, 1.0)
            if KV_FMT == 1:
                inv = inv * kv_scale
            out_a = acc_a * inv[:, None]
            out_b = acc_b * inv[:, None]
            n_split = tl.load(NUM_SPLITS + b)
            if n_split == 1:
                o_ptr = O + (q_start + tok) * stride_ot + head * stride_oh
                tl.store(o_ptr[:, None] + offs_h[None, :], out_a.to(O.dtype.element_ty),
                         mask=row_ok[:, None] & a_ok[None, :])
                tl.store(o_ptr[:, None] + HALF + offs_h[None, :], out_b.to(O.dtype.element_ty),
                         mask=row_ok[:, None] & b_ok[None, :])
            else:
                slot = tl.load(SPLIT_INDPTR + b) + p - tl.load(FIRST_PART + b)
                po = O_PART + slot.to(tl.int64) * stride_ps + offs_r * stride_pr
                tl.store(po[:, None] + offs_h[None, :], out_a, mask=row_ok[:, None] & a_ok[None, :])
                tl.store(po[:, None] + HALF + offs_h[None, :], out_b, mask=row_ok[:, None] & b_ok[None, :])
                lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
                tl.store(LSE_PART + slot.to(tl.int64) * stride_ls + offs_r, lse, mask=row_ok)


@dataclass(frozen=True)
class DecodeConfig:
    block_h: int  # rows (query token x head) per program
    block_n: int  # KV tokens per step of the inner loop
    num_warps: int
    num_stages: int
    use_tma: bool = True  # whole in-page blocks through tensor descriptors (when the layout allows)
    gluon: bool = True  # on sm90, the Gluon kernel (kernels.mla_decode_sm90) where it supports the call


# Chosen by measurement on H100: docs/mla_decode.md#7-the-triton-kernel, `python benchmarks/bench_mla_decode.py --sweep`
def default_config(rows: int, elem_size: int, kv_lora_rank: int = 512, on_gpu: bool = True) -> DecodeConfig:
    """Tile sizes for ``rows`` = max q_len * H rows per request (the interpreter gets small, quick ones)."""
    big = kv_lora_rank > 128
    if elem_size >= 4:  # fp32: keep the tile small enough for shared memory
        return DecodeConfig(block_h=16, block_n=16 if big else 32, num_warps=4, num_stages=1)
    block_h = min(64, max(16, triton.next_power_of_2(rows)))
    if not on_gpu:
        return DecodeConfig(block_h=block_h, block_n=32, num_warps=4, num_stages=1)
    if block_h == 64:
        return DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=2)
    return DecodeConfig(block_h=block_h, block_n=64, num_warps=8, num_stages=3)


def _check(q: torch.Tensor, kv_cache: torch.Tensor, meta, kv_lora_rank: int, out: torch.Tensor | None,
           kv_scale: torch.Tensor | None = None) -> KVCacheLayout:
    """Raises ValueError on a bad call; returns the cache's layout (``kernels.kv_cache``, from its dtype)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be [num_pages, page_size, D], got shape {tuple(kv_cache.shape)}")
    T, H, D = q.shape
    if not 0 < kv_lora_rank <= D:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must be in (0, D={D}]")
    layout = layout_of(kv_cache, kv_lora_rank, D - kv_lora_rank)
    if kv_cache.shape[-1] != layout.width:
        what = f"q's last dim {D}" if not layout.is_fp8 else f"the {layout.kind} layout's width {layout.width}"
        raise ValueError(f"{what} != kv_cache's last dim {kv_cache.shape[-1]}")
    if not layout.is_fp8 and q.dtype != kv_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} != kv_cache dtype {kv_cache.dtype}")
    if layout.is_fp8 and q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype {q.dtype} with an FP8 ({layout.kind}) cache: use bfloat16 or float32")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}: use bfloat16, float16 or float32")
    if q.device != kv_cache.device or meta.seq_lens.device != q.device:
        raise ValueError(f"q, kv_cache and the metadata must be on one device: {q.device}, {kv_cache.device}, "
                         f"{meta.seq_lens.device}")
    layout.check_scale(kv_scale, kv_cache.device)
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or kv_cache.stride(1) != layout.width:
        raise ValueError("q and kv_cache must be contiguous in the last dim, kv_cache contiguous per page")
    if layout.kind == "fp8_ds_mla" and kv_cache.stride(0) % 4:
        raise ValueError(f"an fp8_ds_mla cache's page stride must be a multiple of 4 bytes, got {kv_cache.stride(0)}")
    if kv_cache.shape[1] != meta.page_size:
        raise ValueError(f"kv_cache page size {kv_cache.shape[1]} != metadata page size {meta.page_size}")
    if H != meta.num_heads:
        raise ValueError(f"q has {H} heads but the metadata was built for {meta.num_heads}")
    if meta.kv_lora_rank != kv_lora_rank:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} != the metadata's {meta.kv_lora_rank}")
    if T > meta.batch_size * meta.max_q_len:
        # (the host's bound; a single request over max_q_len inside it is dropped by the plan on the GPU and
        # reported by the builder's check())
        raise ValueError(f"{T} query tokens for {meta.batch_size} requests exceed the metadata's max_q_len "
                         f"{meta.max_q_len}: build the metadata with a larger max_q_len")
    if meta.num_parts > MAX_PARTS:
        raise ValueError(f"the plan has {meta.num_parts} parts, over the {MAX_PARTS} a launch takes (a grid's second "
                         f"axis): use fewer KV splits per request or a smaller batch")
    if out is not None:
        if out.shape != (T, H, kv_lora_rank) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be [{T}, {H}, {kv_lora_rank}] {q.dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must be contiguous in the last dim")
    return layout


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta,
    sm_scale: float,
    kv_lora_rank: int = 512,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention: q [T, H, D] against kv_cache [P, page, W] -> [T, H, kv_lora_rank] (q's dtype).

    The cache's layout (``kernels.kv_cache``) is read from its dtype: q's dtype (W = D), float8_e4m3fn (``fp8``,
    W = D; ``kv_scale`` is its [1] float32 per-tensor scale) or uint8 (``fp8_ds_mla``, W bytes a token); FP8
    caches are dequantized in registers (q bf16 or fp32). ``meta`` is the step's ``MLAMetadata``. Rows of padding
    slots (q_len 0 or seq_len 0) are not written. Launches the decode kernel (on sm90 the Gluon kernel of
    ``kernels.mla_decode_sm90`` where it applies, else the Triton kernel above) and, when the plan cut a request over
    several parts, the merge kernel; no allocation when ``out`` is given, no host synchronization.
    """
    layout = _check(q, kv_cache, meta, kv_lora_rank, out, kv_scale)
    T, H, D = q.shape
    if out is None:
        out = torch.empty(T, H, kv_lora_rank, dtype=q.dtype, device=q.device)
    if meta.num_parts == 0 or T == 0:
        return out
    cfg = config or default_config(meta.max_q_len * H, q.element_size(), kv_lora_rank, q.is_cuda)
    if decode_impl(q, kv_cache, meta, kv_lora_rank, out, cfg) == "gluon":
        sm90.mla_decode_sm90(q, kv_cache, meta, sm_scale, out, LOG2E)
    else:
        _launch_triton(q, kv_cache, meta, sm_scale, kv_lora_rank, out, cfg, layout, kv_scale)
    if meta.max_merges > 0:
        mla_merge(out, meta)
    return out


def decode_impl(q: torch.Tensor, kv_cache: torch.Tensor, meta, kv_lora_rank: int = 512,
                out: torch.Tensor | None = None, config: DecodeConfig | None = None) -> str:
    """Which kernel ``mla_decode`` runs for this call: "gluon" (sm90, ``kernels.mla_decode_sm90``) or "triton"."""
    cfg = config or default_config(meta.max_q_len * q.shape[1], q.element_size(), kv_lora_rank, q.is_cuda)
    if (cfg.gluon and q.is_cuda and kv_cache.dtype == q.dtype  # the Gluon kernel reads model-dtype caches only
            and sm90.supported(q, kv_cache, meta, kv_lora_rank, out) is None):
        return "gluon"
    return "triton"


def uses_tma(q: torch.Tensor, kv_cache: torch.Tensor, meta, kv_lora_rank: int, cfg: DecodeConfig) -> bool:
    """Whether the Triton kernel fetches whole in-page KV blocks through tensor descriptors for this call."""
    rope_dim = q.shape[-1] - kv_lora_rank
    half = max(32, triton.next_power_of_2(kv_lora_rank)) // 2
    block_dpe = max(16, triton.next_power_of_2(max(rope_dim, 1)))
    return (cfg.use_tma and kv_cache.is_contiguous() and kv_lora_rank == 2 * half and rope_dim == block_dpe
            and half <= 256 and meta.page_size % cfg.block_n == 0 and meta.plan_block % cfg.block_n == 0
            and (not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 9))


def _fp8_views(kv_cache: torch.Tensor, layout: KVCacheLayout, kv_scale: torch.Tensor | None):
    """(values, scales, rope) as the kernel reads an FP8 cache: ``fp8``: the cache, its scale tensor, the cache;
    ``fp8_ds_mla``: the cache's bytes as e4m3, fp32 and bf16 (same strides in bytes as the uint8 cache)."""
    if layout.kind == "fp8":
        return kv_cache, kv_scale, kv_cache
    return kv_cache.view(torch.float8_e4m3fn), kv_cache.view(torch.float32), kv_cache.view(torch.bfloat16)


def _launch_triton(q, kv_cache, meta, sm_scale, kv_lora_rank, out, cfg, layout: KVCacheLayout | None = None,
                   kv_scale: torch.Tensor | None = None) -> None:
    T, H, D = q.shape
    rope_dim = D - kv_lora_rank
    half = max(32, triton.next_power_of_2(kv_lora_rank)) // 2
    block_dpe = max(16, triton.next_power_of_2(max(rope_dim, 1)))
    use_tma = uses_tma(q, kv_cache, meta, kv_lora_rank, cfg)
    layout = layout or layout_of(kv_cache, kv_lora_rank, rope_dim)
    kv, kv_sc, kv_pe = (kv_cache,) * 3 if not layout.is_fp8 else _fp8_views(kv_cache, layout, kv_scale)
    # fp8_ds_mla: the rope part's first bf16 element in a token; fp8: its first e4m3 one
    pe_col = (kv_lora_rank + 4 * layout.num_groups) // 2 if layout.kind == "fp8_ds_mla" else kv_lora_rank
    kv_desc = kv_desc_pe = kv
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kv2d = kv.view(-1, layout.width)
        kv_desc = TensorDescriptor.from_tensor(kv2d, [cfg.block_n, half])
        pe2d = kv_pe.view(-1, layout.width // 2) if layout.kind == "fp8_ds_mla" else kv2d
        kv_desc_pe = TensorDescriptor.from_tensor(pe2d, [cfg.block_n, block_dpe])
    n_tiles = triton.cdiv(meta.max_q_len * H, cfg.block_h)
    o_part, lse_part = meta.o_partial, meta.lse_partial
    _mla_decode_kernel[(n_tiles, meta.num_parts)](
        q, kv, kv_desc, kv_desc_pe, kv_sc, kv_pe, out, o_part, lse_part, meta.block_table,
        meta.qo_indptr, meta.seq_lens, meta.cu_cost, meta.part_bounds, meta.part_reqs, meta.first_part,
        meta.num_splits, meta.split_indptr,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), out.stride(0), out.stride(1),
        meta.block_table.stride(0), o_part.stride(0), o_part.stride(1), lse_part.stride(0),
        sm_scale * LOG2E, H, meta.overhead,
        DV=kv_lora_rank, DPE=rope_dim, HALF=half, BLOCK_DPE=block_dpe,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, PLAN_BLOCK=meta.plan_block, PAGE_SIZE=meta.page_size,
        DOT_PREC="ieee" if (q.dtype == torch.float32 or not q.is_cuda) else "tf32",
        UPCAST=not q.is_cuda, USE_TMA=use_tma, PDL=dependent_launch(q.device), EARLY_SPLITS=EARLY_LAUNCH_SPLITS,
        KV_FMT=layout.code, NG=layout.num_groups, GH=min(half, GROUP), PE_COL=pe_col,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
