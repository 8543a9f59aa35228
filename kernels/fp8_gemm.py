"""Block-scaled FP8 GEMM for the linear layers: ``fp8_linear`` (wrapper), its kernels, a torch reference.

y[M, N] = x[M, K] @ W^T with W stored as float8_e4m3fn [N, K] and ``scale_inv`` [ceil(N/128), ceil(K/128)] f32
(DeepSeek-V3 / Kimi-K2 checkpoints; edge blocks partial). Modes:

- ``act_quant`` (W8A8, DeepSeek's scheme; what models/fp8_linear.py uses for 16-bit runs): x quantized per row
  per 128 channels (s = max(amax, 1e-4) / 448, e4m3), fp8 x fp8 dots, each 128-wide K tile's product scaled by
  s_x[m] * s_w. Three implementations (``impl``), chosen by M (docs/fp8.md, section 4):
  ``small`` (M < 32): every program quantizes its [16 or 32, 128] x tile in registers, no extra launch;
  ``scaled_mm`` (M >= 32 where N % 128 == 0, K % 512 == 0, Hopper): ``quantize_act`` once, then
  torch._scaled_mm's cuBLASLt block-scaled GEMM; ``large`` (M >= 32 otherwise): ``quantize_act`` once, then
  64/128-row tiles whose two fp8 operands come from shared memory (wgmma).
- ``weight_only`` (W8A16): x stays in its dtype; each [128, BLOCK_N<=128] weight tile lies in one scale block,
  so it is converted to x's dtype in registers, multiplied, and the fp32 product scaled once. 3-18% slower
  than act_quant at M <= 16 on an H100; exact for fp32 runs (no activation rounding).

Decode (M <= 64) is bound by streaming weight bytes: with N/128 column tiles alone (kv_a: 5) the GPU would be
nearly idle, so the K loop is split over ``split_k`` programs writing fp32 partials [split, M, N] summed by
one small kernel (deterministic; no atomics). Every buffer is sized from the shapes: capturable in a CUDA graph.
``UPCAST`` (set off the GPU) computes the dots in fp32: the Triton interpreter gets bf16 / fp8 dots
(and float -> e4m3 casts) wrong. Benchmark: ``python -m kernels.fp8_gemm``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mla_runner.kernels.fp8_block import FP8_MAX

SCALE_BLOCK = 128
MODES = ("weight_only", "act_quant")


@triton.jit
def _round_e4m3(v):
    """fp32 values (|v| <= 448) rounded to the e4m3 grid, nearest-even, as fp32: the interpreter's own cast to
    e4m3 loses the carry when rounding up crosses a power of two (-124 -> -64), so UPCAST rounds by hand."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # 3 mantissa bits kept of fp32's 23
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = tl.floor(v * 512.0 + 0.5) / 512.0  # below 2^-6: a fixed step of 2^-9
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _round_bf16(v):
    """fp32 -> its nearest-even bf16 value, as fp32: the interpreter's fp32 -> bf16 store truncates, so UPCAST
    kernels round by hand before storing bf16 (the store of an exact bf16 value is then exact)."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _quant_rows(x, UPCAST: tl.constexpr):
    """[BLOCK_M, 128] tile -> (e4m3 tile, f32 scale per row): DeepSeek's per-token per-128-channel scheme,
    s = max(amax, 1e-4) / 448. UPCAST: the e4m3 values as fp32 (rounded by hand, see _round_e4m3)."""
    xf = x.to(tl.float32)
    # '/' is approximate on the GPU (div.full.f32, <= 2 ulp): a code can differ from torch's IEEE division where
    # x / s lies within 2 ulp of a rounding boundary. Not tl.math.div_rn: it does not broadcast (Triton 3.6
    # builds the op on the raw [M, 128] and [M, 1] operands: wrong codes) and it made M = 1 2x slower
    # (docs/fp8.md#3-numerics-w8a8-and-w8a16).
    xs = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4) / 448.0
    v = xf / xs[:, None]
    if UPCAST:
        return _round_e4m3(v), xs
    return v.to(tl.float8e4nv), xs


@triton.jit
def _act_quant_kernel(X, Q, S, M, ROWS, K, stride_xm, stride_qm, stride_sm, stride_sk,
                      BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """Q[m, k] e4m3, S[m, k // 128] f32 for m < ROWS; rows M..ROWS (padding of a larger buffer) get zeros."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * 128 + tl.arange(0, 128)
    k_ok = offs_k < K
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
    q, xs = _quant_rows(x, UPCAST)
    rows_ok = offs_m < ROWS
    tl.store(Q + offs_m.to(tl.int64)[:, None] * stride_qm + offs_k[None, :], q.to(Q.dtype.element_ty),
             mask=rows_ok[:, None] & k_ok[None, :])
    tl.store(S + offs_m * stride_sm + tl.program_id(1) * stride_sk, xs, mask=rows_ok)


@triton.jit
def _fp8_gemm_kernel(
    X, XS, W, WS, OUT,
    M, N, K, k_blocks_per_split,
    stride_xm, stride_xsm, stride_xsk, stride_wn, stride_wsn, stride_os, stride_om,
    ACT_QUANT: tl.constexpr, X_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = W + offs_n.to(tl.int64)[None, :] * stride_wn
    ws_row = WS + (pid_n * BLOCK_N // 128) * stride_wsn  # BLOCK_N divides 128: one scale row per tile
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_start = pid_s * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, num_kb)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        ws = tl.load(ws_row + kb * BLOCK_K // 128)
        if X_FP8:
            # Large M: x was quantized once by _act_quant_kernel (e4m3 + XS [M, K/128]); both operands come
            # from shared memory, so the dot can be a wgmma.
            xs = tl.load(XS + offs_m * stride_xsm + kb * stride_xsk, mask=m_ok, other=0.0)
            if UPCAST:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, w)
            acc += part * (xs[:, None] * ws)
        elif ACT_QUANT:
            # DeepSeek's activation quantization, per row per 128 channels (= this K tile), in registers:
            # the few activation rows of a decode step are re-quantized by every N tile, which costs nothing.
            q, xs = _quant_rows(x, UPCAST)
            if UPCAST:
                part = tl.dot(q, w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(q, w)
            acc += part * (xs[:, None] * ws)
        else:
            if UPCAST:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
            acc += part * ws
    out = OUT + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(P, OUT, numel, split, BLOCK: tl.constexpr):
    """OUT[i] = sum over splits of P[s, i] (fp32, in split order), cast to OUT's dtype: one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(split):
        acc += tl.load(P + s * numel + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def act_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], f32 scales [M, ceil(K/128)]): DeepSeek's per-token per-128-channel scheme."""
    M, K = x.shape
    nb = triton.cdiv(K, SCALE_BLOCK)
    padded = x.float().new_zeros(M, nb * SCALE_BLOCK)
    padded[:, :K] = x.float()
    s = padded.view(M, nb, SCALE_BLOCK).abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    q = (padded.view(M, nb, SCALE_BLOCK) / s[..., None]).view(M, -1)[:, :K].to(torch.float8_e4m3fn)
    return q, s


def _check(x, w, scale_inv, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if w.dim() != 2 or w.dtype != torch.float8_e4m3fn or w.stride(-1) != 1:
        raise ValueError(f"w must be a contiguous float8_e4m3fn [N, K], got {w.dtype} {tuple(w.shape)}")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match w [{N}, {K}]")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x dtype must be bfloat16, float16 or float32, got {x.dtype}")
    grid = (triton.cdiv(N, SCALE_BLOCK), triton.cdiv(K, SCALE_BLOCK))
    if tuple(scale_inv.shape) != grid or scale_inv.dtype != torch.float32:
        raise ValueError(f"scale_inv must be float32 {grid} (128x128 blocks of w), got "
                         f"{scale_inv.dtype} {tuple(scale_inv.shape)}")
    if x.device != w.device or scale_inv.device != w.device:
        raise ValueError("x, w and scale_inv must be on one device")


# From this many rows on, act_quant quantizes x once in its own kernel and runs 64/128-row tiles whose two fp8
# operands both come from shared memory (wgmma); below it, each program quantizes its few rows in registers.
LARGE_M = 32
# From this M on, torch._scaled_mm (cuBLASLt's block-scaled FP8 GEMM) where scaled_mm_ok: 1.1-1.7x faster than
# the large Triton path at M = 32..128 on an H100, slower or equal below 32
# (docs/fp8.md#4-the-dense-gemm-three-implementations-chosen-by-m).
SCALED_MM_M = 32
IMPLS = ("small", "large", "scaled_mm")


def _launch_params(M: int, N: int, K: int, device: torch.device, large: bool) -> tuple[int, int, int, int]:
    """(block_m, block_n, split_k, k_blocks_per_split): M-sized tiles, split-K until ~2 programs per SM."""
    if large:
        block_m = 64 if M <= 64 else 128
    else:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    num_kb = triton.cdiv(K, SCALE_BLOCK)
    target = 2 * _num_sms(device.index or 0) if device.type == "cuda" else 1
    split = max(1, min(num_kb, triton.cdiv(target, tiles)))
    per_split = triton.cdiv(num_kb, split)
    return block_m, block_n, triton.cdiv(num_kb, per_split), per_split


def quantize_act(x2: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [rows, K], f32 scales [rows, ceil(K/128)] stored column-major, as cuBLASLt wants);
    rows >= M (default M): the extra rows are zeros. One launch; same numbers as act_quant_reference."""
    M, K = x2.shape
    rows = M if rows is None else rows
    nb = triton.cdiv(K, SCALE_BLOCK)
    q = torch.empty(rows, K, dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty(nb, rows, dtype=torch.float32, device=x2.device).t()
    block_m = 16
    grid = (triton.cdiv(rows, block_m), nb)
    _act_quant_kernel[grid](x2, q, s, M, rows, K, x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
                            BLOCK_M=block_m, UPCAST=not x2.is_cuda, num_warps=4)
    return q, s


def scaled_mm_ok(N: int, K: int, device: torch.device) -> bool:
    """torch._scaled_mm's DeepSeek recipe (1x128 activations x 128x128 weights): cuBLASLt, Hopper only, whole
    128-blocks with ceil(K/128) a multiple of 4 (its scale layout), float32 scales."""
    return (device.type == "cuda" and N % 128 == 0 and K % 512 == 0 and _scaled_mm_available(device.index or 0))


@functools.cache
def _scaled_mm_available(device_index: int) -> bool:
    """The recipe came with torch 2.9 on cuBLAS 12.9 (pytorch#158037) and exists for sm_90 only."""
    from torch.torch_version import TorchVersion

    cuda = torch.version.cuda or "0"
    return (torch.cuda.get_device_capability(device_index) == (9, 0) and TorchVersion(torch.__version__) >= "2.9"
            and TorchVersion(cuda) >= "12.9")


def _scaled_mm_linear(x2: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    M = x2.shape[0]
    rows = -(-M // 4) * 4  # cuBLASLt: M a multiple of 4
    q, s = quantize_act(x2, rows)
    out = torch._scaled_mm(q, w.t(), scale_a=s, scale_b=scale_inv.t(), out_dtype=x2.dtype)
    return out[:M]


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, mode: str = "act_quant",
               split_k: int | None = None, impl: str | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(w, scale_inv)^T -> [..., N] in x.dtype; w e4m3 [N, K], 128x128 block scales.

    ``mode``: ``weight_only`` (W8A16) or ``act_quant`` (W8A8, x quantized per token per 128 channels).
    ``impl`` (act_quant only; None: by M, see LARGE_M / SCALED_MM_M): ``small`` (x quantized in registers by
    every program), ``large`` (x quantized once, then 64/128-row tiles), ``scaled_mm`` (x quantized once,
    then torch._scaled_mm's cuBLASLt block-scaled GEMM; Hopper). ``split_k`` overrides the K-loop split.
    """
    _check(x, w, scale_inv, mode)
    if impl is not None and (impl not in IMPLS or (impl != "small" and mode != "act_quant")):
        raise ValueError(f"impl must be one of {IMPLS} (large / scaled_mm: act_quant only), got {impl!r}")
    N, K = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if impl is None:
        impl = "small"
        if mode == "act_quant" and M >= LARGE_M:
            impl = "scaled_mm" if M >= SCALED_MM_M and scaled_mm_ok(N, K, x.device) else "large"
    if impl == "scaled_mm":
        return _scaled_mm_linear(x2, w, scale_inv).view(*lead, N)
    large = impl == "large"
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n, split, per_split = _launch_params(M, N, K, x.device, large)
    if split_k is not None:
        per_split = triton.cdiv(triton.cdiv(K, SCALE_BLOCK), split_k)
        split = triton.cdiv(triton.cdiv(K, SCALE_BLOCK), per_split)
    upcast = not x.is_cuda  # the Triton interpreter
    # The interpreter truncates fp32 -> bf16 stores (no round to nearest): there the kernel writes fp32 and
    # torch rounds.
    direct = split == 1 and not (upcast and x.dtype != torch.float32)
    dest = out if direct else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    stride_os = 0 if direct else dest.stride(0)
    a, a_scale = quantize_act(x2) if large else (x2, x2)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split)
    _fp8_gemm_kernel[grid](
        a, a_scale, w, scale_inv, dest, M, N, K, per_split,
        a.stride(0), a_scale.stride(0), a_scale.stride(-1), w.stride(0), scale_inv.stride(0), stride_os,
        dest.stride(-2),
        ACT_QUANT=mode == "act_quant", X_FP8=large, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=SCALE_BLOCK,
        UPCAST=upcast, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=8 if block_m >= 128 else 4, num_stages=(3 if large else 4) if x.is_cuda else 1)
    if upcast and not direct:
        out = dest.sum(0).to(x.dtype)
    elif not direct:
        _split_sum_kernel[(triton.cdiv(M * N, 1024),)](dest, out, M * N, split, BLOCK=1024, num_warps=4)
    return out.view(*lead, N)


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                         mode: str = "weight_only") -> torch.Tensor:
    """Dequantize, then matmul in fp32 (act_quant: x quantized and dequantized first): [..., N] fp32."""
    from mla_runner.kernels.fp8_block import dequantize_fp8_block

    wd = dequantize_fp8_block(w, scale_inv)
    xf = x.reshape(-1, x.shape[-1]).float()
    if mode == "act_quant":
        q, s = act_quant_reference(xf)
        xf = q.float() * s.repeat_interleave(SCALE_BLOCK, 1)[:, : xf.shape[1]]
    return (xf @ wd.t()).view(*x.shape[:-1], w.shape[0])
