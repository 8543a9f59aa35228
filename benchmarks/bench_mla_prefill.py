"""Benchmark of the MLA prefill attention kernel (non-absorbed form, causal, bf16) on a CUDA GPU.

Run from the repository root (tables on stdout; ``--json FILE`` also writes every number)::

    python benchmarks/bench_mla_prefill.py [--heads 128,16] [--lens 512,1024,...] [--tokens N] [--no-sdpa]
                                           [--json FILE]
    python benchmarks/bench_mla_prefill.py --sweep [--lens 2048,8192,32768]   # PrefillConfig choices per shape
    python benchmarks/bench_mla_prefill.py --device cpu                       # smoke run under the interpreter

Shapes: DeepSeek-V3 widths (q and k 128 + 64 with the 64-wide rope key shared by the heads, v 128), bf16, causal,
whole prompts (q_len = k_len = L) at H = 128 and 16; prompts shorter than ``--tokens`` (default 16384) come as a
batch of ``tokens // L`` equal prompts so that the GPU is full. k_nope and v are views of one [S, H, 256] tensor
(kv_b_proj's output), as in the model.

Kernel time = triton.testing.do_bench median (L2 flushed before every call; no CUDA graph: a call takes
milliseconds). FLOPs of a call = 2 * H * (Dqk + Dv) * pairs with Dqk = 192, Dv = 128 and pairs = the (query, key)
pairs attended, sum over requests of q_len * k_len - q_len * (q_len - 1) / 2 (causal, bottom-right; L (L + 1) / 2
for a whole prompt). TFLOP/s = FLOPs / time; "% mm" is that over the bf16 matmul rate measured in the same run
(``mla_runner.roofline``: an 8192^3 bf16 torch.mm under do_bench). The peer row is torch's
``scaled_dot_product_attention`` on the same problem in [B, H, L, D] layout (k = [k_nope | k_pe] for every head),
best of the cuDNN, flash and memory-efficient backends, each with v of width 128 where the backend takes unequal
head dims, else v zero-padded to 192 (its FLOPs are still counted at Dv = 128); a backend that refuses the shape or
runs out of memory is skipped. ``--sweep`` times a few ``PrefillConfig`` choices per shape and prints the best.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed in that same iteration)
from __future__ import annotations

import argparse
import json
import time

import torch

from mla_runner.kernels.interpreter import interpreter_problem
from mla_runner.kernels.mla_prefill import PrefillConfig, default_config, mla_prefill_attention
from mla_runner.roofline import measure_ceilings

DN, DR, DV = 128, 64, 128
DQK = DN + DR
LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SWEEP_LENS = (2048, 8192, 32768)
HEADS = (128, 16)
# (block_m, block_n, num_warps, num_stages) tried by --sweep, the default among them
SWEEP_CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                 (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 3))
FLOPS_FORMULA = "2 * H * (Dqk + Dv) * sum_b (q_len * k_len - q_len * (q_len - 1) / 2), Dqk = 192, Dv = 128"


def attended_pairs(q_lens: list[int], k_lens: list[int], causal: bool = True) -> int:
    """(query, key) pairs a call attends: bottom-right causal or all."""
    total = 0
    for n, L in zip(q_lens, k_lens):
        if causal:  # query i sees max(0, min(L, L - n + i + 1)) keys
            total += sum(max(0, min(L, L - n + i + 1)) for i in range(n)) if n > L else n * L - n * (n - 1) // 2
        else:
            total += n * L
    return total


def attention_flops(H: int, q_lens: list[int], k_lens: list[int], causal: bool = True) -> int:
    return 2 * H * (DQK + DV) * attended_pairs(q_lens, k_lens, causal)


def shapes(lens, heads, tokens: int) -> list[dict]:
    """One dict {H, B, L} per (head count, prompt length): B equal prompts of L tokens, B = max(1, tokens // L)."""
    return [dict(H=H, B=max(1, tokens // L), L=L) for H in heads for L in lens]


def make_inputs(B: int, L: int, H: int, device: str, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """q [B L, H, 192], k_nope / v as views of one [B L, H, 256] tensor, k_pe [B L, 64], cu_seqlens of B prompts."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = B * L
    q = torch.randn(T, H, DQK, device=device, dtype=dtype, generator=g)
    kv = torch.randn(T, H, DN + DV, device=device, dtype=dtype, generator=g)
    k_pe = torch.randn(T, DR, device=device, dtype=dtype, generator=g)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device=device)
    return dict(q=q, k_nope=kv[..., :DN], k_pe=k_pe, v=kv[..., DN:], cu=cu, B=B, L=L, H=H)


def time_us(fn, device: str) -> float:
    """Median time of ``fn`` in us: triton.testing.do_bench on a GPU, wall clock (best of 3) on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def prefill_call(x: dict, config: PrefillConfig | None = None):
    out = torch.empty(x["q"].shape[0], x["H"], DV, dtype=x["q"].dtype, device=x["q"].device)
    lse = torch.empty(x["q"].shape[0], x["H"], dtype=torch.float32, device=x["q"].device)
    return lambda: mla_prefill_attention(x["q"], x["k_nope"], x["k_pe"], x["v"], x["cu"], x["cu"], x["L"],
                                         DQK ** -0.5, True, out=out, lse=lse, config=config)


def sdpa_time(x: dict, device: str, ours: torch.Tensor | None = None) -> dict:
    """torch's scaled_dot_product_attention on the same problem: best backend's us, which one, whether v was padded,
    its largest relative difference from ``ours`` [T, H, 128]; {} when no backend runs the shape."""
    import torch.nn.functional as F

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    B, L, H = x["B"], x["L"], x["H"]
    to4 = lambda t: t.view(B, L, H, t.shape[-1]).transpose(1, 2).contiguous()  # [B, H, L, D]
    try:
        q = to4(x["q"])
        k = to4(torch.cat([x["k_nope"], x["k_pe"][:, None, :].expand(-1, H, -1)], dim=-1))
        v = to4(x["v"])
    except RuntimeError:  # out of memory
        return {}
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)] if device == "cuda" else [("math", SDPBackend.MATH)]
    best = {}
    v_pad = None
    for name, backend in backends:
        for padded in (False, True):
            if padded and v_pad is None:
                try:
                    v_pad = torch.nn.functional.pad(v, (0, DQK - DV))
                except RuntimeError:  # out of memory
                    break
            vv = v_pad if padded else v
            fn = lambda: F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=DQK ** -0.5)
            try:
                with sdpa_kernel(backend):
                    o = fn()
                    us = time_us(fn, device)
            except (RuntimeError, ValueError, NotImplementedError):  # refused or out of memory: try the next
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if not best or us < best["sdpa_us"]:
                best = dict(sdpa_us=us, sdpa_backend=name, sdpa_v_padded=padded)
                if ours is not None:
                    o = o[..., :DV].transpose(1, 2).reshape(B * L, H, DV).float()
                    best["sdpa_rel_diff"] = ((o - ours.float()).norm() / o.norm()).item()
            del o
            break  # this backend ran (v 128 or padded): the next backend
    return best


def run_bench(shape_list: list[dict], matmul_tflops: float, device: str, sdpa: bool = True) -> list[dict]:
    rows = []
    for s in shape_list:
        x = make_inputs(s["B"], s["L"], s["H"], device)
        fn = prefill_call(x)
        out, _ = fn()
        us = time_us(fn, device)
        flops = attention_flops(s["H"], [s["L"]] * s["B"], [s["L"]] * s["B"])
        cfg = default_config(s["L"], 2, device == "cuda")
        row = dict(H=s["H"], B=s["B"], L=s["L"], us=us, TFLOPs=flops / us / 1e6,
                   pct_matmul=100 * flops / us / 1e6 / matmul_tflops, flops=flops,
                   config=[cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages])
        if sdpa:
            row.update(sdpa_time(x, device, out))
            if "sdpa_us" in row:
                row["sdpa_TFLOPs"] = flops / row["sdpa_us"] / 1e6
        print(f"H={s['H']} B={s['B']} L={s['L']}: {us:.1f} us, {row['TFLOPs']:.1f} TFLOP/s"
              + (f"; sdpa ({row['sdpa_backend']}) {row['sdpa_us']:.1f} us" if "sdpa_us" in row else ""), flush=True)
        rows.append(row)
        del x, fn, out
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_sweep(shape_list: list[dict], matmul_tflops: float, device: str, configs=SWEEP_CONFIGS) -> list[dict]:
    """Every config of ``configs`` on every shape; one row per (shape, config), errors (e.g. out of shared memory)
    recorded as a string; the best per shape printed."""
    rows = []
    for s in shape_list:
        x = make_inputs(s["B"], s["L"], s["H"], device)
        flops = attention_flops(s["H"], [s["L"]] * s["B"], [s["L"]] * s["B"])
        d = default_config(s["L"], 2, device == "cuda")
        default = (d.block_m, d.block_n, d.num_warps, d.num_stages)
        shape_rows = []
        for c in configs:
            row = dict(H=s["H"], B=s["B"], L=s["L"], config=list(c), default=c == default)
            try:
                fn = prefill_call(x, PrefillConfig(*c))
                fn()
                row["us"] = time_us(fn, device)
                row["TFLOPs"] = flops / row["us"] / 1e6
                row["pct_matmul"] = 100 * row["TFLOPs"] / matmul_tflops
            except Exception as e:  # noqa: BLE001 - a config that cannot run (resources) is a result, not a stop
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            shape_rows.append(row)
        ok = [r for r in shape_rows if "us" in r]
        for r in shape_rows:
            r["best"] = bool(ok) and r is min(ok, key=lambda r: r["us"])
            print(f"sweep H={s['H']} B={s['B']} L={s['L']} {tuple(r['config'])}{' (default)' if r['default'] else ''}: "
                  + (f"{r['us']:.1f} us, {r['TFLOPs']:.1f} TFLOP/s{'  <- best' if r['best'] else ''}"
                     if "us" in r else r["error"]), flush=True)
        rows += shape_rows
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _f(v, p=1) -> str:
    return "-" if v is None else f"{v:.{p}f}"


def print_tables(result: dict) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}: {result['matmul']} matmul "
          f"{result['matmul_TFLOPs']:.1f} TFLOP/s. MLA prefill, causal, Dqk 192 / Dv 128, bf16. "
          f"FLOPs = {result['flops_formula']}.\n")
    if result.get("rows"):
        print("| H | B | L | us | TFLOP/s | % mm | SDPA us | SDPA TFLOP/s | SDPA backend | SDPA / ours |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in result["rows"]:
            sd = r.get("sdpa_us")
            backend = (r.get("sdpa_backend", "-") + (" (v padded)" if r.get("sdpa_v_padded") else "")) if sd else "-"
            print(f"| {r['H']} | {r['B']} | {r['L']} | {r['us']:.1f} | {r['TFLOPs']:.1f} | {r['pct_matmul']:.1f} | "
                  f"{_f(sd)} | {_f(r.get('sdpa_TFLOPs'))} | {backend} | {_f(sd / r['us'] if sd else None, 2)} |")
        print("\n(% mm: our TFLOP/s over the matmul rate above; SDPA / ours > 1: ours is faster)")
    if result.get("sweep"):
        print("\n| H | B | L | block_m | block_n | warps | stages | us | TFLOP/s | % mm | |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in result["sweep"]:
            m, n, w, st = r["config"]
            note = ("best" if r["best"] else "") + (" default" if r["default"] else "")
            if "us" in r:
                print(f"| {r['H']} | {r['B']} | {r['L']} | {m} | {n} | {w} | {st} | {r['us']:.1f} | {r['TFLOPs']:.1f} "
                      f"| {r['pct_matmul']:.1f} | {note.strip()} |")
            else:
                print(f"| {r['H']} | {r['B']} | {r['L']} | {m} | {n} | {w} | {st} | - | - | - | {r['error'][:60]} |")


def _ints(ap: argparse.ArgumentParser, text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError:
        ap.error(f"{name} takes comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        ap.error(f"{name} takes positive integers, got {text!r}")
    return vals


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=None, help="head counts, comma-separated (default 128,16)")
    ap.add_argument("--lens", default=None,
                    help="prompt lengths, comma-separated (default 512 ... 131072; with --sweep 2048,8192,32768)")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="prompts shorter than this come as a batch of tokens // L equal prompts (default 16384)")
    ap.add_argument("--sweep", action="store_true", help="time a few PrefillConfig choices per shape, print the best")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the torch scaled_dot_product_attention rows")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run of the benchmark's loop on tiny shapes under Triton's interpreter")
    args = ap.parse_args(argv)
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    smoke = args.device == "cpu"
    heads = _ints(ap, args.heads, "--heads") if args.heads else ([2] if smoke else list(HEADS))
    lens = (_ints(ap, args.lens, "--lens") if args.lens
            else [48, 96] if smoke else list(SWEEP_LENS if args.sweep else LENS))
    tokens = 96 if smoke and args.tokens == 16384 else args.tokens
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench_mla_prefill.py needs a CUDA GPU (or --device cpu for a smoke run)")
    if smoke and (problem := interpreter_problem(torch.device("cpu"))):
        raise SystemExit(problem)
    import triton

    device = torch.device(args.device)
    ceilings = measure_ceilings(device)
    result = dict(device=ceilings.device, torch=torch.__version__, triton=triton.__version__,
                  matmul="fp32 (CPU)" if smoke else "bf16", matmul_TFLOPs=ceilings.matmul_tflops,
                  flops_formula=FLOPS_FORMULA)
    shape_list = shapes(lens, heads, tokens)
    if args.sweep:
        result["sweep"] = run_sweep(shape_list, ceilings.matmul_tflops, args.device)
    else:
        result["rows"] = run_bench(shape_list, ceilings.matmul_tflops, args.device, sdpa=not args.no_sdpa)
    print_tables(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
