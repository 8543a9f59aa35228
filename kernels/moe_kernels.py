"""The Triton kernels of the fused MoE: two grouped GEMMs (gate/up + SwiGLU; down_proj times the routing weight)
and the sum over each token's k slots.

Both run over the expert-sorted layout of ``kernels.moe_align``: program (b, n) takes row block b, reads its
expert from ``block_expert[b]`` (-1: nothing to do, the program exits) and the ``BLOCK_M`` pair ids of the
block from ``sorted_ids`` (the sentinel ``num_pairs`` marks padding rows: masked loads, no stores). Every
program of a block multiplies the same few gathered activation rows by one ``BLOCK_N`` slice of its expert's
weights, so each weight byte of a used expert is read once per row block: for decode (a few rows per expert)
the kernels are bound by streaming weights, and the grid is sized for that (many N tiles, pipelined K loop).

- ``gate_up``: h[p] = silu(x[p // k] @ Wg[e]^T) * (x[p // k] @ Wu[e]^T), with Wg/Wu the two halves of
  ``w13[e]`` [2*inter, hidden]; both halves of one N tile are accumulated in the same program, so the SwiGLU is
  fused and h is written once, in the activation dtype (like the eager bf16 MLP), indexed by pair id.
- ``down``: y[p] = topk_weight[p] * (h[p] @ W2[e]^T), fp32, indexed by pair id.
- ``sum_slots``: out[t] = sum_j y[t*k + j] in slot order, fp32, cast to the output dtype; slots whose expert id
  is out of range were dropped by the align step (their y rows are never written) and are skipped here, so y
  needs no zero fill. It writes every element of ``out``.

No atomics: every output element is written by exactly one program, so results are deterministic. Expert
offsets are int64 (E * 2 * inter * hidden is past 2^31 for the real shapes). fp32 inputs use IEEE dots (no
TF32) so that fp32 results match the fp32 reference to ~1e-6. ``UPCAST`` (set off the GPU) casts the dot inputs
to fp32: the Triton 3.9 interpreter computes bf16 dots on the raw bits.

``FP8_W``: the expert weights are float8_e4m3fn with 128x128 block scales (S13 [E, 2*ceil(inter/128),
ceil(hidden/128)]: gate's grid, then up's; S2 [E, ceil(hidden/128), ceil(inter/128)]); each tile is converted to
the activation dtype in registers and its fp32 product scaled by its block's scale (weight-only dequantization,
docs/fused_moe.md#6-fp8-experts). Off, the scale pointers are unused. ``ACT_QUANT`` (with FP8_W, BLOCK_K = 128): W8A8,
DeepSeek's scheme and that of models/fp8_linear.py for 16-bit runs: each [BLOCK_M, 128] activation tile (x in
gate_up, h in down) is quantized per row in registers (s = max(amax, 1e-4) / 448, e4m3, as kernels/fp8_gemm.py),
the dots are fp8 x fp8, and each product is scaled by s_row * s_block.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mla_runner.kernels.fp8_gemm import _quant_rows, _round_bf16


@triton.jit
def _gate_up_kernel(
    X, W13, H, SORTED_IDS, BLOCK_EXPERT, S13,
    num_pairs, inter, hidden, up_scale_row,
    stride_xt, stride_we, stride_wn, stride_ht, stride_se, stride_sn,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8_W: tl.constexpr, ACT_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert >= 0:
        rows = tl.load(SORTED_IDS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < num_pairs
        tok = (rows // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        w_gate = W13 + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        w_up = w_gate + inter * stride_wn
        x_rows = X + tok[:, None] * stride_xt
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # FP8 weights: gate and up have their own 128x128 scale grids (rows 0.. and up_scale_row.. of S13[e]);
        # BLOCK_N and BLOCK_K divide 128, so each weight tile has one scale.
        s_gate = S13 + expert.to(tl.int64) * stride_se + (pid_n * BLOCK_N // 128) * stride_sn
        s_up = s_gate + up_scale_row * stride_sn
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden
            a = tl.load(x_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(w_gate + offs_k[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
            wu = tl.load(w_up + offs_k[:, None], mask=w_mask, other=0.0)
            if ACT_QUANT:  # W8A8: this [BLOCK_M, 128] x tile quantized per row (one 128-channel group)
                q, xs = _quant_rows(a, UPCAST)
                sg = tl.load(s_gate + k0 // 128) * xs[:, None]
                su = tl.load(s_up + k0 // 128) * xs[:, None]
                if UPCAST:
                    acc_gate += tl.dot(q, wg.to(tl.float32), input_precision="ieee") * sg
                    acc_up += tl.dot(q, wu.to(tl.float32), input_precision="ieee") * su
                else:  # fp8 x fp8 tensor-core dots
                    acc_gate += tl.dot(q, wg) * sg
                    acc_up += tl.dot(q, wu) * su
            elif FP8_W:  # W8A16: e4m3 -> activation dtype in registers (fp32 off the GPU)
                if UPCAST:
                    a = a.to(tl.float32)
                wg, wu = wg.to(a.dtype), wu.to(a.dtype)
                sg = tl.load(s_gate + k0 // 128)
                su = tl.load(s_up + k0 // 128)
                acc_gate += tl.dot(a, wg, input_precision=PRECISION) * sg
                acc_up += tl.dot(a, wu, input_precision=PRECISION) * su
            else:
                if UPCAST:  # Triton 3.9's interpreter gets bf16 dots wrong: fp32 there
                    a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_gate = tl.dot(a, wg, acc_gate, input_precision=PRECISION)
                acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up, in fp32
        if ROUND_BF16:  # the interpreter truncates bf16 stores
            h = _round_bf16(h)
        h_ptr = H + rows.to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
        tl.store(h_ptr, h.to(H.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    H, W2, Y, TOPK_W, SORTED_IDS, BLOCK_EXPERT, S2,
    num_pairs, hidden, inter,
    stride_ht, stride_we, stride_wn, stride_yt, stride_se, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FP8_W: tl.constexpr, ACT_QUANT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert >= 0:
        rows = tl.load(SORTED_IDS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < num_pairs
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        w_rows = W2 + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        h_rows = H + rows64[:, None] * stride_ht
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s_row = S2 + expert.to(tl.int64) * stride_se + (pid_n * BLOCK_N // 128) * stride_sn
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < inter
            a = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if ACT_QUANT:  # W8A8: h quantized per row per 128 channels, as DeepSeek does before down_proj
                q, hs = _quant_rows(a, UPCAST)
                scale = tl.load(s_row + k0 // 128) * hs[:, None]
                if UPCAST:
                    acc += tl.dot(q, w.to(tl.float32), input_precision="ieee") * scale
                else:
                    acc += tl.dot(q, w) * scale
            elif FP8_W:
                if UPCAST:
                    a = a.to(tl.float32)
                acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION) * tl.load(s_row + k0 // 128)
            else:
                if UPCAST:
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
        weight = tl.load(TOPK_W + rows, mask=row_ok, other=0.0)
        y_ptr = Y + rows64[:, None] * stride_yt + offs_n[None, :]
        tl.store(y_ptr, acc * weight[:, None], mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots_kernel(
    Y, OUT, TOPK_IDS, num_experts, hidden, stride_yt, stride_ot,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(TOPK_IDS + t * TOP_K + j)
        if (expert >= 0) & (expert < num_experts):
            acc += tl.load(Y + (t * TOP_K + j) * stride_yt + offs_n, mask=n_ok, other=0.0)
    if ROUND_BF16:
        acc = _round_bf16(acc)
    tl.store(OUT + t * stride_ot + offs_n, acc.to(OUT.dtype.element_ty), mask=n_ok)
