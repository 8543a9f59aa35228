"""Benchmark of the block-scaled FP8 GEMM (fp8_linear) at DeepSeek-V3 / Kimi-K2 decode shapes, on a CUDA GPU.

``mla_runner.kernels.fp8_gemm.fp8_linear`` at the decode-step projections. Run from the repository root::

    python benchmarks/bench_fp8_gemm.py [--m 1 4 16 ...]

Every implementation (W8A16 ``weight_only``; W8A8 ``small``, ``large``, ``scaled_mm`` where it applies; the
default dispatch) against bf16 cuBLAS, one markdown table on stdout (the numbers kept with the project are in
docs/fp8.md, section 4): CUDA-graph replay, L2 flushed, median us (``mla_runner.kernels.cuda_graph.graph_time``);
GB/s of the
FP8 weight bytes (weights + scales) through the default path against the device-to-device copy ceiling measured in
the same run (``mla_runner.roofline.measure_ceilings``); the largest relative error (Frobenius) of the
implementations against ``fp8_linear_reference`` (W8A8 numerics).
"""
# ruff: noqa: B023  (every closure a loop makes here is timed, or captured, in that same iteration)
from __future__ import annotations

import argparse

import torch
import triton

from mla_runner.kernels.fp8_gemm import fp8_linear, fp8_linear_reference, scaled_mm_ok
from mla_runner.roofline import measure_ceilings

# (name, K, N) of the decode-step projections; DeepSeek-V3 (128 heads) and Kimi-K2 (64 heads) differ in q_b, o_proj.
BENCH_SHAPES = (
    ("q_a 7168->1536", 7168, 1536), ("q_b 1536->24576 (V3)", 1536, 24576), ("q_b 1536->12288 (K2)", 1536, 12288),
    ("kv_a 7168->576", 7168, 576), ("o_proj 16384->7168 (V3)", 16384, 7168), ("o_proj 8192->7168 (K2)", 8192, 7168),
    ("gate_up 7168->36864", 7168, 36864), ("down 18432->7168", 18432, 7168),
)
BENCH_M = (1, 4, 16, 32, 64, 128)


def run_bench(shapes=BENCH_SHAPES, ms=BENCH_M) -> list[dict]:
    """Every FP8 implementation vs bf16 cuBLAS at decode shapes, one run; GB/s of FP8 weight bytes (default
    path) against the copy ceiling measured in the same run."""
    from mla_runner.kernels.cuda_graph import graph_time
    from mla_runner.kernels.fp8_block import quantize_fp8_block

    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_gemm.py needs a CUDA GPU")
    ceiling = measure_ceilings(torch.device("cuda")).copy_gbps  # bytes read + written per second
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy ceiling {ceiling:.0f} GB/s; times: CUDA-graph replay, L2 flushed, median us", flush=True)
    print("| shape | M | bf16 | W8A16 | W8A8 small | W8A8 large | scaled_mm | default | default vs bf16 | "
          "GB/s | of copy | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    def shape_rows(name: str, K: int, N: int) -> None:  # its weights are freed on return
        wb = torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16) * K ** -0.5
        wq, ws = quantize_fp8_block(wb)
        for M in ms:
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            ref = fp8_linear_reference(x, wq, ws, mode="act_quant")
            t = {"bf16": graph_time(lambda: x @ wb.t(), rep=30, warmup=5),
                 "W8A16": graph_time(lambda: fp8_linear(x, wq, ws, mode="weight_only"), rep=30, warmup=5)}
            err = {}
            impls = ["small"] + (["large"] if M >= 16 else []) + (["scaled_mm"] if scaled_mm_ok(N, K, x.device)
                                                                   else [])
            for impl in impls + [None]:
                try:
                    y = fp8_linear(x, wq, ws, impl=impl)
                    err[impl] = ((y.float() - ref).norm() / ref.norm()).item()
                    t[impl] = graph_time(lambda: fp8_linear(x, wq, ws, impl=impl), rep=30, warmup=5)
                except Exception as exc:  # noqa: BLE001 - e.g. a cuBLASLt layout it refuses: reported, the table goes on
                    print(f"  {name} M={M} {impl}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            del ref
            gbs = (wq.numel() + 4 * ws.numel()) / t[None] / 1e3
            rows.append(dict(shape=name, M=M, us={str(k): v for k, v in t.items()}, gbs=gbs, copy_gbs=ceiling,
                             rel_err={str(k): v for k, v in err.items()}))
            cell = lambda k: f"{t[k]:.1f}" if k in t else "-"
            print(f"| {name} | {M} | {cell('bf16')} | {cell('W8A16')} | {cell('small')} | {cell('large')} | "
                  f"{cell('scaled_mm')} | {cell(None)} | {t['bf16'] / t[None]:.2f}x | {gbs:.0f} | "
                  f"{gbs / ceiling:.0%} | {max(err.values()):.1e} |", flush=True)

    for name, K, N in shapes:
        shape_rows(name, K, N)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(BENCH_M), help="rows (tokens) to time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_gemm.py needs a CUDA GPU")
    return run_bench(ms=tuple(args.m))


if __name__ == "__main__":
    main()
