"""Fused, CUDA-graph-capturable routed-expert MoE: ``fused_moe`` (wrapper), its config, and a torch reference.

out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]: the routed part
of models/moe.py. The eager version loops over experts in Python and reads the expert counts on the host,
so it cannot be captured in a CUDA graph. Here the whole call is four steps on the device, every buffer sized
from (T, k, E) and the block sizes alone, no host sync:

1. ``kernels.moe_align``: the (token, slot) pairs sorted by expert into ``block_m``-padded segments;
2. grouped GEMM gate/up + SwiGLU -> h [T*k, inter] (activation dtype);
3. grouped GEMM down_proj times the routing weight -> y [T*k, hidden] (fp32);
4. sum over the k slots of each token -> out [T, hidden] (accumulated in fp32, stored in x.dtype).

Any T: a batch of more than ``MoEConfig.chunk_tokens`` tokens runs as a host loop of such calls over equal token
chunks (no sync), so h and y stay bounded (docs/fused_moe.md#10-prefill).

Weights are stacked once at load: ``w13[e] = cat(gate_proj[e], up_proj[e])`` [E, 2*inter, hidden] and
``w2[e] = down_proj[e]`` [E, hidden, inter]. Expert ids outside [0, E) are dropped (contribute zero).
Benchmark: ``python benchmarks/bench_fused_moe.py``; design and measurements: docs/fused_moe.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from mla_runner.kernels.fp8_block import quantize_fp8_block, scale_grid
from mla_runner.kernels.moe_align import align_impl, moe_align
from mla_runner.kernels.moe_kernels import _down_kernel, _gate_up_kernel, _sum_slots_kernel

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The most tokens one fused pass takes. y is chunk * k * hidden * 4 bytes: 1.9 GB at DeepSeek-V3 shapes (k 8,
# hidden 7168), plus 0.27 GB of bf16 h; 256 rows per expert (E 256), about the H100's bf16 FLOP/byte ridge, so
# re-reading the experts' weights once per chunk can hide under the chunk's GEMMs (docs/fused_moe.md#10-prefill).
CHUNK_TOKENS = 8192
# Of an H100 block's 227 KB of shared memory, what the pipelined tiles of the large-M configs may take: the rest is
# for the epilogue's layout conversions.
SMEM_BUDGET = 200 * 1024


@dataclass(frozen=True)
class MoEConfig:
    """Launch parameters of the two grouped GEMMs (the reduction uses ``block_n_down``), the align step and the
    token chunk of one pass."""

    block_m: int = 16  # rows (token, slot pairs) per tile; tl.dot needs >= 16
    block_n_gate_up: int = 64  # columns of gate (and of up) per program: 2x this many weight rows
    block_n_down: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    align: str | None = None  # kernels.moe_align impl: "triton" (one launch), "sort", "torch"; None: by size
    chunk_tokens: int = CHUNK_TOKENS  # larger batches run in passes of at most this many tokens

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n_gate_up", "block_n_down", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MoEConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"MoEConfig: bad num_warps={self.num_warps} or num_stages={self.num_stages}")
        if self.align not in (None, "triton", "sort", "torch"):
            raise ValueError(f"MoEConfig.align must be 'triton', 'sort', 'torch' or None, got {self.align!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"MoEConfig.chunk_tokens must be >= 1, got {self.chunk_tokens}")


def default_config(num_pairs: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                   act_quant: bool = False) -> MoEConfig:
    """Tiles for ``num_pairs`` (token, slot) pairs in one pass (``fused_moe`` passes a chunk's count).

    Decode-sized (at most 48 rows per expert on average): small-M tiles, bound by streaming the weights; fp32
    halves block_k and the pipeline depth so that the shared-memory stages fit on an H100 (227 KB per block).
    Larger (prefill): 64-row tiles, 128 from 512 rows per expert (padding each expert to 128 rows then wastes
    <= 1/8 of the MMAs; fp32 stays at 64: at 128 its FMA dots use all 255 registers), 8 warps, as many pipeline
    stages (<= 4) as fit ``SMEM_BUDGET``. ``act_quant`` (W8A8): block_k is the 128-channel quantization group,
    whatever the dims. The align step: ``moe_align.align_impl`` of the pair count. docs/fused_moe.md#5-configuration.
    """
    per_expert = num_pairs / num_experts
    wide = dtype == torch.float32
    block_k = 128 if act_quant else _fit(64 if wide else 128, min(hidden, inter))
    bn_up, bn_down = _fit(64, inter), _fit(128, hidden)
    align = align_impl(num_pairs, num_experts)
    if per_expert <= 48:
        block_m = 16 if per_expert <= 16 else 32
        return MoEConfig(block_m=block_m, block_n_gate_up=bn_up, block_n_down=bn_down, block_k=block_k,
                         num_warps=4, num_stages=3 if wide or block_m > 16 else 4, align=align)
    block_m = 128 if per_expert >= 512 and not wide else 64
    # Shared memory per pipeline stage: the activation tile and the widest weight tile (gate_up's 2 * bn_up rows or
    # down's bn_down; e4m3 with W8A8, else counted at the activation width). bf16: 48 KB at 64 rows (4 stages),
    # 64 KB at 128 (3); the sm_90 compiles behind docs/fused_moe.md#5-configuration match this count.
    w_bytes = 1 if act_quant else dtype.itemsize
    stage = block_m * block_k * dtype.itemsize + block_k * max(2 * bn_up, bn_down) * w_bytes
    stages = max(2, min(4, SMEM_BUDGET // stage))
    return MoEConfig(block_m=block_m, block_n_gate_up=bn_up, block_n_down=bn_down, block_k=block_k, num_warps=8,
                     num_stages=stages, align=align)


def _fit(block: int, dim: int) -> int:
    """Do not tile a small dim with a block much larger than it (tiny test shapes); tl.dot needs >= 16."""
    return max(16, min(block, triton.next_power_of_2(dim)))


def _check_fp8(w13, w2, w13_scale, w2_scale, cfg: MoEConfig | None, act_quant: bool) -> None:
    E, inter2, hidden = w13.shape
    inter = inter2 // 2
    nb = lambda d: -(-d // 128)
    if w13_scale is None or w2_scale is None:
        raise ValueError("float8_e4m3fn expert weights need w13_scale and w2_scale")
    if tuple(w13_scale.shape) != (E, 2 * nb(inter), nb(hidden)) or w13_scale.dtype != torch.float32:
        raise ValueError(f"w13_scale must be float32 [E, 2*ceil(inter/128), ceil(hidden/128)] = "
                         f"{[E, 2 * nb(inter), nb(hidden)]} (gate's grid, then up's), got "
                         f"{w13_scale.dtype} {tuple(w13_scale.shape)}")
    if tuple(w2_scale.shape) != (E, nb(hidden), nb(inter)) or w2_scale.dtype != torch.float32:
        raise ValueError(f"w2_scale must be float32 {[E, nb(hidden), nb(inter)]}, got "
                         f"{w2_scale.dtype} {tuple(w2_scale.shape)}")
    if w13_scale.stride(-1) != 1 or w2_scale.stride(-1) != 1:
        raise ValueError("w13_scale and w2_scale must be contiguous in the last dim")
    if cfg is not None and max(cfg.block_n_gate_up, cfg.block_n_down, cfg.block_k) > 128:
        raise ValueError("FP8 weights need MoEConfig blocks <= 128 (one scale per tile)")
    if cfg is not None and act_quant and cfg.block_k != 128:
        raise ValueError(f"act_quant needs MoEConfig.block_k = 128 (the quantization group), got {cfg.block_k}")


def _check(x, w13, w2, topk_weights, topk_ids, out) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    T, hidden = x.shape
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden or w13.shape[1] == 0:
        raise ValueError(f"w13 must be [E, 2*inter, hidden={hidden}], got shape {tuple(w13.shape)}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if w2.dim() != 3 or tuple(w2.shape) != (E, hidden, inter):
        raise ValueError(f"w2 must be [E={E}, hidden={hidden}, inter={inter}], got shape {tuple(w2.shape)}")
    fp8 = w13.dtype == torch.float8_e4m3fn and w2.dtype == torch.float8_e4m3fn
    if not fp8 and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"w13 and w2 must have x's dtype {x.dtype} (or both be float8_e4m3fn), "
                         f"got {w13.dtype} and {w2.dtype}")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("w13 and w2 must be contiguous in the last dim (stack them once at load)")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] == 0:
        raise ValueError(f"topk_ids must be [T={T}, k>=1], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32 of shape {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    tensors = {"w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    if out is not None:
        if tuple(out.shape) != (T, hidden) or out.dtype != x.dtype:
            raise ValueError(f"out must be {x.dtype} [{T}, {hidden}], got {out.dtype} {tuple(out.shape)}")
        if out.stride(-1) != 1:
            raise ValueError("out must be contiguous in the last dim")
        tensors["out"] = out
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all inputs must be on one device")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, out: torch.Tensor | None = None,
              config: MoEConfig | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, act_quant: bool | None = None) -> torch.Tensor:
    """Routed experts of [T, hidden] tokens -> [T, hidden] in x.dtype (written into ``out`` if given).

    x [T, hidden]; w13 [E, 2*inter, hidden] (gate rows, then up rows); w2 [E, hidden, inter];
    topk_weights [T, k] fp32; topk_ids [T, k] int32/int64 (ids outside [0, E) are dropped).
    FP8 experts: w13 / w2 float8_e4m3fn with 128x128 block scales w13_scale [E, 2*ceil(inter/128),
    ceil(hidden/128)] (gate's grid, then up's: partial edge blocks stay per matrix) and w2_scale
    [E, ceil(hidden/128), ceil(inter/128)]. ``act_quant`` (FP8 only; None: True for 16-bit x, False for fp32,
    as models/fp8_linear.py chooses): W8A8, x and h quantized per token per 128 channels in registers, fp8 x fp8
    dots; False: W8A16, weight tiles dequantized in registers. Capturable in a CUDA graph: refill x / topk_* in
    place and replay (run once before capturing: Triton compiles on the first call).
    More than ``chunk_tokens`` tokens (the config's; default ``CHUNK_TOKENS``) run as equal chunks of at most that
    many, one pass each, with h and y sized for one chunk (tokens are independent: with the same config the result
    equals one pass's bit for bit); ``config=None`` picks the tiles for the chunk.
    """
    _check(x, w13, w2, topk_weights, topk_ids, out)
    T, hidden = x.shape
    E, inter, k = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    if out is None:
        out = torch.empty(T, hidden, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    fp8 = w13.dtype == torch.float8_e4m3fn
    if act_quant is None:
        act_quant = fp8 and x.dtype != torch.float32
    if act_quant and not fp8:
        raise ValueError("act_quant (W8A8) needs float8_e4m3fn expert weights")
    chunks = -(-T // (config.chunk_tokens if config is not None else CHUNK_TOKENS))
    chunk = -(-T // chunks)  # tokens per pass (the last may have fewer)
    cfg = config or default_config(chunk * k, E, hidden, inter, x.dtype, act_quant)
    if fp8:
        _check_fp8(w13, w2, w13_scale, w2_scale, cfg, act_quant)
    else:
        w13_scale = w2_scale = topk_weights  # unused pointers (FP8_W off)
    if x.stride(-1) != 1:
        x = x.contiguous()
    # The kernels index these flat; a copy (only for non-contiguous inputs) is still graph-safe.
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    h = torch.empty(chunk * k, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(chunk * k, hidden, dtype=torch.float32, device=x.device)
    for t0 in range(0, T, chunk):  # host loop, no sync: each pass is a complete fused call on its tokens
        t1 = min(T, t0 + chunk)
        _fused_pass(x[t0:t1], w13, w2, weights[t0 * k: t1 * k], ids[t0 * k: t1 * k], out[t0:t1], h, y, cfg,
                    w13_scale, w2_scale, fp8, act_quant)
    return out


def _fused_pass(x, w13, w2, weights, ids, out, h, y, cfg: MoEConfig, w13_scale, w2_scale, fp8: bool,
                act_quant: bool) -> None:
    """The four steps on T tokens (module doc): flat ``weights`` / ``ids`` [T*k], h and y with >= T*k rows."""
    T, hidden = x.shape
    E, inter, n = w13.shape[0], w13.shape[1] // 2, ids.numel()
    k = n // T
    align = moe_align(ids, E, cfg.block_m, impl=cfg.align)
    upcast = not x.is_cuda  # the interpreter: see kernels/moe_kernels.py
    round_bf16 = upcast and x.dtype == torch.bfloat16  # its bf16 stores truncate: round by hand first
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"  # tf32 is ignored for 16-bit inputs
    launch = dict(PRECISION=precision, UPCAST=upcast, FP8_W=fp8, ACT_QUANT=act_quant, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    s13 = (w13_scale.stride(0), w13_scale.stride(1)) if fp8 else (0, 0)
    s2 = (w2_scale.stride(0), w2_scale.stride(1)) if fp8 else (0, 0)

    grid = (align.num_blocks, triton.cdiv(inter, cfg.block_n_gate_up))
    _gate_up_kernel[grid](
        x, w13, h, align.sorted_ids, align.block_expert, w13_scale, n, inter, hidden, triton.cdiv(inter, 128),
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), *s13,
        TOP_K=k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k, ROUND_BF16=round_bf16,
        **launch)
    grid = (align.num_blocks, triton.cdiv(hidden, cfg.block_n_down))
    _down_kernel[grid](
        h, w2, y, weights, align.sorted_ids, align.block_expert, w2_scale, n, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0), *s2,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k, **launch)
    grid = (T, triton.cdiv(hidden, cfg.block_n_down))
    _sum_slots_kernel[grid](y, out, ids, E, hidden, y.stride(0), out.stride(0), TOP_K=k,
                            BLOCK_N=cfg.block_n_down, ROUND_BF16=round_bf16, num_warps=4)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked expert weights -> (w13 e4m3, w13_scale, w2 e4m3, w2_scale) in this kernel's FP8 layout: gate and up
    quantized separately (each its own 128x128 grid, partial edge blocks per matrix), scales stacked, as
    ``MoE.stack_experts`` stacks a checkpoint's FP8 experts."""
    E, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    rows = scale_grid((inter, hidden))[0]
    q13 = torch.empty(w13.shape, dtype=torch.float8_e4m3fn, device=w13.device)
    s13 = torch.empty(E, 2 * rows, scale_grid((inter, hidden))[1], device=w13.device)
    q2 = torch.empty(w2.shape, dtype=torch.float8_e4m3fn, device=w2.device)
    s2 = torch.empty(E, *scale_grid((hidden, inter)), device=w2.device)
    for e in range(E):  # in place: the peak is the stacks plus one expert's temporaries
        q13[e, :inter], s13[e, :rows] = quantize_fp8_block(w13[e, :inter])
        q13[e, inter:], s13[e, rows:] = quantize_fp8_block(w13[e, inter:])
        q2[e], s2[e] = quantize_fp8_block(w2[e])
    return q13, s13, q2, s2


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
    """Plain torch, one (token, slot) at a time, all in fp32 (no intermediate rounding): [T, hidden] fp32.

    ``act_quant``: DeepSeek's W8A8 numerics on the given (dequantized) weights: x and h quantized per token per
    128 channels (kernels.fp8_gemm.act_quant_reference), h first rounded to x.dtype as the kernel stores it.
    Independent of the kernels on purpose (no sorting, no stacking tricks beyond slicing w13); it reads the
    expert ids on the host, so it is for tests only.
    """
    from mla_runner.kernels.fp8_gemm import act_quant_reference

    def quant(v: torch.Tensor) -> torch.Tensor:  # [K] -> its e4m3 values times their scales, fp32
        q, s = act_quant_reference(v[None])
        return (q.float() * s.repeat_interleave(128, 1)[:, : v.numel()])[0]

    E, inter = w13.shape[0], w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, experts in enumerate(topk_ids.tolist()):
        xt = quant(x[t].float()) if act_quant else x[t].float()
        for j, e in enumerate(experts):
            if not 0 <= e < E:
                continue  # dropped, as in fused_moe
            gate = w13[e, :inter].float() @ xt
            up = w13[e, inter:].float() @ xt
            h = F.silu(gate) * up
            if act_quant:
                h = quant(h.to(x.dtype).float())
            out[t] += topk_weights[t, j].float() * (w2[e].float() @ h)
    return out
