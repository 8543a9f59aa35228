"""Benchmark of MLA's input projections fused into one GEMM against the two separate calls, on a CUDA GPU.

``MLA.fuse_input_projections``: q_a_proj and kv_a_proj_with_mqa as one GEMM. Run from the repository root; it prints
a markdown table (the numbers kept with the project are in docs/fp8.md#5-one-gemm-for-the-two-input-projections)::

    python benchmarks/bench_mla_proj.py [--m 1 16 64]

DeepSeek-V3 / Kimi-K2 widths (the same for both): q_a_proj 7168 -> 1536 and kv_a_proj_with_mqa 7168 -> 576,
fused 7168 -> 2112. bf16 activations; weights bf16 (cuBLAS) or FP8 128x128 blocks (kernels/fp8_gemm.py, W8A8).
Times: CUDA-graph replay, L2 flushed, median us (kernels/cuda_graph.py ``graph_time``); GB/s = weight bytes
read / fused time. ``fused`` runs what the model runs (``MLA.input_projections``); for FP8 the fused N = 2112 is
not a multiple of 128, so from M = 32 it takes the ``large`` Triton path instead of cuBLASLt's scaled_mm, and
``fused+pad`` times the same weight padded with 64 zero rows to N = 2176 (the same 17 scale block rows) through
the default dispatch (scaled_mm on Hopper from M = 32): whether padding the fused weight would pay.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed, or captured, in that same iteration)
from __future__ import annotations

import argparse

import torch
from torch import nn

from mla_runner.kernels.fp8_block import quantize_fp8_block
from mla_runner.models.config import ModelArgs
from mla_runner.models.fp8_linear import FP8Linear
from mla_runner.models.mla import MLA
from mla_runner.models.presets import DEEPSEEK_V3_CONFIG

BENCH_M = (1, 16, 64)


def _projections(args: ModelArgs, fp8: bool, gen: torch.Generator) -> MLA:
    """An MLA module (meta) whose q_a_proj / kv_a_proj_with_mqa hold random weights on gen's device, unfused."""
    with torch.device("meta"):
        attn = MLA(args)
        make = (lambda n: FP8Linear(args.hidden_size, n)) if fp8 else (
            lambda n: nn.Linear(args.hidden_size, n, bias=False))
        layers = {"q_a_proj": make(args.q_lora_rank), "kv_a_proj_with_mqa": make(args.kv_cache_dim)}
    for name, layer in layers.items():
        w = torch.randn(layer.out_features, args.hidden_size, device=gen.device, generator=gen, dtype=torch.bfloat16)
        w *= args.hidden_size ** -0.5
        if fp8:
            w, layer.weight_scale_inv = quantize_fp8_block(w)
        layer.weight = nn.Parameter(w, requires_grad=False)
        setattr(attn, name, layer)
    return attn


@torch.no_grad()
def bench_fused_input_proj(ms: tuple[int, ...] = BENCH_M, args: ModelArgs | None = None) -> list[dict]:
    """Fused vs separate q_a + kv_a projections, bf16 and FP8 weights, at decode sizes M; prints a table.
    ``args``: the model widths (default DeepSeek-V3's; Kimi-K2's are the same)."""
    from mla_runner.kernels.cuda_graph import graph_time
    from mla_runner.kernels.fp8_gemm import fp8_linear

    if not torch.cuda.is_available():
        raise SystemExit("bench_mla_proj.py needs a CUDA GPU")
    args = args or ModelArgs.from_dict(DEEPSEEK_V3_CONFIG)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; q_a {args.hidden_size}->{args.q_lora_rank} "
          f"+ kv_a {args.hidden_size}->{args.kv_cache_dim}; CUDA-graph replay, L2 flushed, median us", flush=True)
    print("| weights | M | q_a | kv_a | separate (both in one graph) | fused | fused+pad | speedup | fused GB/s | "
          "rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for weights in ("fp8", "bf16"):
        attn = _projections(args, weights == "fp8", gen)
        q_a, kv_a = attn.q_a_proj, attn.kv_a_proj_with_mqa
        assert attn.fuse_input_projections() and attn.input_projections_fused
        w, s = attn.w_qkv_a, attn.w_qkv_a_scale
        nbytes = w.numel() * w.element_size() + (0 if s is None else s.numel() * 4)
        padded = None
        if s is not None:
            pad = -w.shape[0] % 128
            padded = torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else None
        for M in ms:
            x = torch.randn(M, args.hidden_size, device=gen.device, generator=gen, dtype=torch.bfloat16)
            ref = torch.cat([q_a(x), kv_a(x)], -1).float()
            out = torch.cat(attn.input_projections(x), -1).float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            t = {"q_a": graph_time(lambda: q_a(x), rep=50, warmup=10),
                 "kv_a": graph_time(lambda: kv_a(x), rep=50, warmup=10),
                 "separate": graph_time(lambda: (q_a(x), kv_a(x)), rep=50, warmup=10),
                 "fused": graph_time(lambda: attn.input_projections(x), rep=50, warmup=10)}
            if padded is not None:
                t["fused+pad"] = graph_time(lambda: fp8_linear(x, padded, s), rep=50, warmup=10)
            rows.append(dict(weights=weights, M=M, us=t, rel_err=err, fused_gbs=nbytes / t["fused"] / 1e3))
            cell = lambda k: f"{t[k]:.1f}" if k in t else "-"
            print(f"| {weights} | {M} | {cell('q_a')} | {cell('kv_a')} | {cell('separate')} | {cell('fused')} | "
                  f"{cell('fused+pad')} | {t['separate'] / t['fused']:.2f}x | {rows[-1]['fused_gbs']:.0f} | "
                  f"{err:.1e} |", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(BENCH_M), help="rows (tokens) to time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mla_proj.py needs a CUDA GPU")
    return bench_fused_input_proj(tuple(args.m))


if __name__ == "__main__":
    main()
