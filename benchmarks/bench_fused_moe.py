"""MoE benchmarks on a CUDA GPU: fused_moe vs the eager per-expert loops (decode or --prefill sizes), or (--routing)
the fused router vs torch.

Run from the repository root; each prints a markdown table (the numbers kept with the project are in
docs/fused_moe.md)::

    python benchmarks/bench_fused_moe.py                     # fused MoE vs the eager loops, decode sizes
    python benchmarks/bench_fused_moe.py --sweep             # the same, plus a few MoEConfig variants per case
    python benchmarks/bench_fused_moe.py --prefill           # align step by size; 1k-32k tokens in TFLOP/s
    python benchmarks/bench_fused_moe.py --prefill --sweep   # plus tile / chunk variants per prefill case
    python benchmarks/bench_fused_moe.py --routing           # the router: models/moe.py Gate, torch vs fused_routing

Fused MoE: for DeepSeek-V3 (E=256) and Kimi-K2 (E=384) routed-expert shapes (hidden 7168, inter 2048, top-8; random bf16
weights, and the same draws quantized to e4m3 with 128x128 block scales) and T in {1, 16, 128} tokens with
random distinct top-8 routing, it prints the triton.testing.do_bench median (L2 flushed before each call) of:

- ``fused bf16`` / ``fused W8A16`` / ``fused W8A8``: one ``fused_moe`` call captured in a CUDA graph and
  replayed (what a graph-captured decode step pays), bf16 weights / FP8 weights dequantized in registers / FP8
  weights with activations quantized per token per 128 channels (fp8 x fp8 dots);
- ``eager bf16`` / ``eager fp8``: the models/moe.py approach (argsort, bincount + host sync, Python loop over
  used experts, three matmuls each, index_add) on bf16 weights / FP8 weights (``fp8_linear``, W8A8);

the achieved GB/s of the used experts' FP8 weight bytes (used experts * 3 * hidden * inter / time) beside the
device-to-device copy bandwidth measured in the same run, and relative errors (Frobenius): W8A8 against the
eager FP8 loop (same numerics) and the FP8 paths against bf16 weights. Needs about 55 GB of GPU memory (Kimi).
The copy ceiling is ``mla_runner.roofline.measure_ceilings``'s. Prefill: see ``bench_prefill`` and ``bench_align``;
router: see ``bench_routing``.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed, or captured, in that same iteration)
from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F
import triton

from mla_runner.kernels.cuda_graph import capture
from mla_runner.kernels.fused_moe import CHUNK_TOKENS, MoEConfig, default_config, fused_moe, quantize_experts
from mla_runner.kernels.moe_align import align_impl, moe_align
from mla_runner.roofline import measure_ceilings

SHAPES = {"DeepSeek-V3": dict(E=256, k=8, hidden=7168, inter=2048),
          "Kimi-K2": dict(E=384, k=8, hidden=7168, inter=2048)}
TOKENS = (1, 16, 128)


def eager_moe_loop(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """models/moe.py's eager loop (``expert_loop``: sort by expert, host-read counts, one call per used expert)
    on stacked weights."""
    from mla_runner.models.moe import expert_loop

    inter = w13.shape[1] // 2

    def expert(e, xe):
        return (F.silu(xe @ w13[e, :inter].t()) * (xe @ w13[e, inter:].t())) @ w2[e].t()

    return expert_loop(x, topk_weights, topk_ids, w13.shape[0], expert).to(x.dtype)


def random_routing(T: int, E: int, k: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token, uniformly at random; weights normalized to sum 2.5 (like the router)."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
    w = torch.rand(T, k, device=device, generator=g) + 0.1
    return w / w.sum(dim=1, keepdim=True) * 2.5, ids


def sweep_configs(base: MoEConfig) -> list[MoEConfig]:
    """The default, then a few variants: N tiles, warps, pipeline depth (timed as graph replays; K tile 128,
    the FP8 scale block and W8A8 quantization group)."""
    out = [base]
    for bn_up, bn_down, bk, warps, stages in [(32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (128, 128, 128, 4, 5),
                                              (64, 128, 128, 8, 4), (32, 128, 128, 4, 5), (64, 128, 128, 4, 6)]:
        out.append(MoEConfig(base.block_m, bn_up, bn_down, bk, warps, stages))
    out.append(MoEConfig(**{**base.__dict__, "align": "torch"}))  # the ~25-op torch align step instead
    return out


def eager_moe_loop_fp8(x, q13, s13, q2, s2, topk_weights, topk_ids) -> torch.Tensor:
    """The same loop over FP8 experts, three ``fp8_linear`` calls (W8A8 for 16-bit x) per used expert: what
    models/moe.py's MoE.routed runs with FP8Linear experts (CPU). Same numerics as fused W8A8."""
    from mla_runner.kernels.fp8_gemm import fp8_linear
    from mla_runner.models.moe import expert_loop

    inter, rows = q13.shape[1] // 2, s13.shape[1] // 2

    def expert(e, xe):
        h = F.silu(fp8_linear(xe, q13[e, :inter], s13[e, :rows])) * fp8_linear(xe, q13[e, inter:], s13[e, rows:])
        return fp8_linear(h, q2[e], s2[e])

    return expert_loop(x, topk_weights, topk_ids, q13.shape[0], expert).to(x.dtype)


def run_bench(sweep: bool = False, dtype: torch.dtype = torch.bfloat16, shapes: dict = SHAPES,
              tokens: tuple = TOKENS, dev: str = "cuda") -> list[dict]:
    """Graph-replayed fused MoE (bf16 weights; FP8 W8A16; FP8 W8A8) against the eager loops (bf16, FP8) in one
    run; GB/s of the used experts' weight bytes against the copy ceiling measured in the same run."""
    from triton.testing import do_bench

    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe.py needs a CUDA GPU")
    # device-to-device copy GB/s (read + write): the practical ceiling for streaming weights
    ceiling = measure_ceilings(torch.device(dev)).copy_gbps
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dtype}; "
          f"d2d copy {ceiling:.0f} GB/s; us = median, L2 flushed; fused = CUDA-graph replay", flush=True)
    print("| model | T | experts used | eager bf16 | eager fp8 | fused bf16 | fused W8A16 | fused W8A8 | "
          "W8A8 vs fused bf16 | W8A8 vs W8A16 | W8A8 GB/s | of copy | W8A8 err vs eager fp8 | "
          "W8A8 err vs bf16 weights | W8A16 err vs bf16 weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    def model_rows(name: str, s: dict) -> None:  # its weights are freed on return
        E, k, hidden, inter = s["E"], s["k"], s["hidden"], s["inter"]
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(E, 2 * inter, hidden, dtype=dtype, device=dev, generator=g).mul_(hidden ** -0.5)
        w2 = torch.randn(E, hidden, inter, dtype=dtype, device=dev, generator=g).mul_(inter ** -0.5)
        q13, s13, q2, s2 = quantize_experts(w13, w2)
        for T in tokens:
            x = torch.randn(T, hidden, dtype=dtype, device=dev, generator=g)
            weights, ids = random_routing(T, E, k, dev, seed=T)
            used = ids.unique().numel()
            nbytes = used * 3 * hidden * inter  # FP8 weight bytes of the used experts (bf16: twice that)
            outs, us = {}, {}
            for tag, fn in [
                ("bf16", lambda o: fused_moe(x, w13, w2, weights, ids, out=o)),
                ("W8A16", lambda o: fused_moe(x, q13, q2, weights, ids, out=o, w13_scale=s13, w2_scale=s2,
                                              act_quant=False)),
                ("W8A8", lambda o: fused_moe(x, q13, q2, weights, ids, out=o, w13_scale=s13, w2_scale=s2,
                                             act_quant=True)),
            ]:
                o = torch.empty_like(x)
                graph, _ = capture(lambda: fn(o), warmup=2)
                us[tag] = do_bench(graph.replay, return_mode="median") * 1e3
                graph.replay()
                outs[tag] = o.float()
                del graph
            us["eager bf16"] = do_bench(lambda: eager_moe_loop(x, w13, w2, weights, ids), return_mode="median") * 1e3
            us["eager fp8"] = do_bench(lambda: eager_moe_loop_fp8(x, q13, s13, q2, s2, weights, ids),
                                       return_mode="median") * 1e3
            ref = eager_moe_loop(x, w13, w2, weights, ids).float()
            ref8 = eager_moe_loop_fp8(x, q13, s13, q2, s2, weights, ids).float()
            err = lambda a, b: ((a - b).norm() / b.norm()).item()
            row = dict(model=name, T=T, experts_used=used, us=us, w8a8_gbs=nbytes / us["W8A8"] / 1e3,
                       copy_gbs=ceiling, err_w8a8_vs_eager_fp8=err(outs["W8A8"], ref8),
                       err_w8a8_vs_bf16=err(outs["W8A8"], ref), err_w8a16_vs_bf16=err(outs["W8A16"], ref),
                       err_bf16=err(outs["bf16"], ref))
            rows.append(row)
            print(f"| {name} | {T} | {used} | {us['eager bf16']:.0f} | {us['eager fp8']:.0f} | {us['bf16']:.1f} | "
                  f"{us['W8A16']:.1f} | {us['W8A8']:.1f} | {us['bf16'] / us['W8A8']:.2f}x | "
                  f"{us['W8A16'] / us['W8A8']:.2f}x | {row['w8a8_gbs']:.0f} | {row['w8a8_gbs'] / ceiling:.0%} | "
                  f"{row['err_w8a8_vs_eager_fp8']:.1e} | {row['err_w8a8_vs_bf16']:.1e} | "
                  f"{row['err_w8a16_vs_bf16']:.1e} |", flush=True)
            if sweep:
                base = default_config(T * k, E, hidden, inter, dtype, act_quant=True)
                for cfg in sweep_configs(base):
                    tag = (f"bm {cfg.block_m} bn_up {cfg.block_n_gate_up} bn_down {cfg.block_n_down} "
                           f"bk {cfg.block_k} warps {cfg.num_warps} stages {cfg.num_stages} align {cfg.align}")
                    o = torch.empty_like(x)
                    try:
                        g_cfg, _ = capture(lambda: fused_moe(x, q13, q2, weights, ids, out=o, config=cfg,
                                                             w13_scale=s13, w2_scale=s2), warmup=2)
                        ms = do_bench(g_cfg.replay, return_mode="median")
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory, or a block_k W8A8 refuses
                        print(f"    {tag}: failed ({type(exc).__name__})")
                        continue
                    print(f"    W8A8 {tag}: graph {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")
                    del g_cfg

    for name, s in shapes.items():
        model_rows(name, s)
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- the router (kernels/moe_routing.py)
ROUTERS = {"DeepSeek-V3": dict(E=256, n_group=8, topk_group=4, k=8, scale=2.5),
           "Kimi-K2": dict(E=384, n_group=1, topk_group=1, k=8, scale=2.827)}


def bench_routing(tokens: tuple = TOKENS, hidden: int = 7168, warps: tuple = (1, 2, 4, 8)) -> list[dict]:
    """models/moe.py Gate, torch ops vs the fused routing kernel, each captured in a CUDA graph (graph_time:
    median us, L2 flushed): the whole Gate.forward (bf16 router weight, fp32 GEMM), the GEMM alone, and the
    routing after the GEMM alone (torch ``routing_reference`` vs ``fused_routing`` at its default num_warps and
    at each of ``warps``). ``same ids``: fraction of tokens whose fused ids equal the torch ones, in order.
    Two GEMM variants that would skip Gate's per-call ``weight.float()`` copy (not used by Gate; for deciding
    the next step): ``GEMM f32 W`` on an fp32 copy of the weight kept beside it (same result, bit for bit),
    ``GEMM bf16->f32`` one bf16 GEMM with fp32 output (``torch.mm(out_dtype=)``, torch >= 2.8; exact products,
    cuBLAS's summation order: not bit-identical logits)."""
    from types import SimpleNamespace

    from mla_runner.kernels.cuda_graph import graph_time
    from mla_runner.kernels.moe_routing import fused_routing, routing_reference
    from mla_runner.models.moe import Gate

    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; router "
          f"hidden {hidden}, bf16 weight, fp32 logits; us = CUDA-graph replay median, L2 flushed", flush=True)
    print("| model | T | Gate torch | Gate fused | speedup | GEMM only | routing torch | routing fused | "
          + " | ".join(f"fused {w} warps" for w in warps) + " | same ids | GEMM f32 W | GEMM bf16->f32 |")
    print("|---|---:|" + "---:|" * (9 + len(warps)))
    rows = []
    for name, r in ROUTERS.items():
        E, G, TG, k, scale = r["E"], r["n_group"], r["topk_group"], r["k"], r["scale"]
        args = SimpleNamespace(num_experts_per_tok=k, n_group=G, topk_group=TG, norm_topk_prob=True,
                               routed_scaling_factor=scale, n_routed_experts=E, hidden_size=hidden)
        gate = Gate(args).cuda().requires_grad_(False)
        g = torch.Generator(device="cuda").manual_seed(0)
        gate.weight.data = (torch.randn(E, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16()
        gate.e_score_correction_bias.copy_(torch.randn(E, device="cuda", generator=g) * 0.1)
        bias = gate.e_score_correction_bias
        for T in tokens:
            x = torch.randn(T, hidden, device="cuda", generator=g).bfloat16()
            logits = x.float() @ gate.weight.float().t()
            out_w = torch.empty(T, k, device="cuda")
            out_ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
            us = {}
            gate.fused = False
            us["Gate torch"] = graph_time(lambda: gate(x))
            ref_w, ref_ids = gate(x)
            gate.fused = True
            us["Gate fused"] = graph_time(lambda: gate(x))
            w, ids = gate(x)
            us["GEMM only"] = graph_time(lambda: x.float() @ gate.weight.float().t())
            us["routing torch"] = graph_time(lambda: routing_reference(logits, bias, k, G, TG, True, scale))
            us["routing fused"] = graph_time(
                lambda: fused_routing(logits, bias, k, G, TG, True, scale, out_w, out_ids))
            for nw in warps:
                us[f"{nw} warps"] = graph_time(
                    lambda: fused_routing(logits, bias, k, G, TG, True, scale, out_w, out_ids, num_warps=nw))
            w32 = gate.weight.float()
            us["GEMM f32 W"] = graph_time(lambda: x.float() @ w32.t())
            try:
                us["GEMM bf16->f32"] = graph_time(lambda: torch.mm(x, gate.weight.t(), out_dtype=torch.float32))
            except (TypeError, RuntimeError):  # torch without out_dtype, or no kernel for it
                us["GEMM bf16->f32"] = float("nan")
            same = (ids == ref_ids).all(dim=1).float().mean().item()
            rows.append(dict(model=name, T=T, us=us, same_ids=same,
                             max_weight_rel_err=((w - ref_w).abs() / ref_w).max().item()))
            print(f"| {name} | {T} | {us['Gate torch']:.1f} | {us['Gate fused']:.1f} | "
                  f"{us['Gate torch'] / us['Gate fused']:.2f}x | {us['GEMM only']:.1f} | {us['routing torch']:.1f} | "
                  f"{us['routing fused']:.1f} | " + " | ".join(f"{us[f'{nw} warps']:.1f}" for nw in warps)
                  + f" | {same:.3f} | {us['GEMM f32 W']:.1f} | {us['GEMM bf16->f32']:.1f} |", flush=True)
    return rows


# ---------------------------------------------------------------- prefill sizes
PREFILL_TOKENS = (1024, 4096, 16384, 32768)
ALIGN_TOKENS = (16, 128, 256, 512, 1024, 2048, 4096, 16384)


def grouped_mm_prep(x, topk_weights, topk_ids, num_experts: int):
    """The pairs sorted by expert for ``torch._grouped_mm`` (host sync; not timed): gathered rows, int32 group
    ends, each row's token and routing weight. Ids outside [0, E) are left out."""
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    order = order[(flat[order] >= 0) & (flat[order] < num_experts)]
    offs = torch.bincount(flat[order], minlength=num_experts).cumsum(0).to(torch.int32)
    tokens = order // topk_ids.shape[1]
    return x[tokens], offs, tokens, topk_weights.flatten()[order]


def grouped_mm_gemms(xs, w13, w2, offs) -> torch.Tensor:
    """gate/up, SwiGLU and down of expert-sorted rows through ``torch._grouped_mm``: [rows, hidden] in x.dtype."""
    inter = w13.shape[1] // 2
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    return torch._grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2.transpose(1, 2), offs=offs)


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The whole routed MoE around ``grouped_mm_gemms`` (to check the peer computes the same thing): fp32."""
    xs, offs, tokens, w = grouped_mm_prep(x, topk_weights, topk_ids, w13.shape[0])
    y = grouped_mm_gemms(xs, w13, w2, offs).float() * w[:, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y)


def bench_align(tokens: tuple = ALIGN_TOKENS, experts: tuple = (256, 384), k: int = 8, dev: str = "cuda"
                ) -> list[dict]:
    """``moe_align`` alone, the one-program Triton kernel against the sort path, each captured in a CUDA graph
    (median us, L2 flushed), with the one ``align_impl`` picks: the data behind TRITON_ALIGN_MAX_WORK."""
    from mla_runner.kernels import cuda_graph

    print(f"# torch {torch.__version__}, triton {triton.__version__}; moe_align alone, top-{k} random routing; "
          "us = CUDA-graph replay median, L2 flushed")
    print("| E | T | pairs | align triton us | align sort us | impl=None picks |\n|---:|---:|---:|---:|---:|---|")
    rows = []
    for E in experts:
        for T in tokens:
            _, ids = random_routing(T, E, k, dev, seed=T)
            block_m = default_config(T * k, E, 7168, 2048, torch.bfloat16).block_m
            us = {impl: cuda_graph.graph_time(lambda: moe_align(ids, E, block_m, impl=impl))
                  if impl == "sort" or T * k * triton.next_power_of_2(E) <= 1 << 24 else float("nan")
                  for impl in ("triton", "sort")}
            rows.append(dict(E=E, T=T, us=us, picks=align_impl(T * k, E)))
            print(f"| {E} | {T} | {T * k} | {us['triton']:.1f} | {us['sort']:.1f} | {rows[-1]['picks']} |", flush=True)
    return rows


def prefill_variants(base: MoEConfig, T: int) -> list[MoEConfig]:
    """The default, then 64 / 128-row tiles at several chunk sizes (stages that fit in both dtypes)."""
    out = [base]
    for block_m, stages in ((64, 4), (128, 3)):
        for chunk in (4096, 8192, 16384, 32768):
            cfg = dataclasses.replace(base, block_m=block_m, num_stages=stages, num_warps=8, chunk_tokens=chunk)
            if chunk < 2 * T and cfg not in out:
                out.append(cfg)
    return out


def bench_prefill(tokens: tuple = PREFILL_TOKENS, name: str = "DeepSeek-V3", sweep: bool = False,
                  shapes: dict = SHAPES, dev: str = "cuda") -> list[dict]:
    """Prefill-sized batches: fused_moe (bf16; FP8 W8A8) against the eager loops and ``torch._grouped_mm``, in ms
    and TFLOP/s (2 * T * k * 3 * hidden * inter FLOPs, dropped pairs none) beside the bf16 matmul ceiling measured
    in the same run. Eager calls, not graphs (a prefill runs once; the chunk loop is on the host). The
    ``torch._grouped_mm`` peer times its two grouped GEMMs and the SwiGLU on rows already sorted by expert (no
    align, gather or scatter), where this torch has it. About 50 GB of GPU memory."""
    from triton import testing

    ceil = measure_ceilings(torch.device(dev))
    print(f"# {ceil.device}, torch {torch.__version__}, triton {triton.__version__}; bf16 matmul ceiling "
          f"{ceil.matmul_tflops:.0f} TFLOP/s (8192^3, this run); ms = do_bench median, L2 flushed", flush=True)
    rows = []
    s = shapes[name]
    E, k, hidden, inter = s["E"], s["k"], s["hidden"], s["inter"]
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * inter, hidden, dtype=torch.bfloat16, device=dev, generator=g).mul_(hidden ** -0.5)
    w2 = torch.randn(E, hidden, inter, dtype=torch.bfloat16, device=dev, generator=g).mul_(inter ** -0.5)
    q13, s13, q2, s2 = quantize_experts(w13, w2)
    print(f"\n{name} routed experts (E {E}, top-{k}, hidden {hidden}, inter {inter}), random routing; eager calls; "
          f"TFLOP/s = 2*T*k*3*hidden*inter / time; grouped_mm = torch._grouped_mm GEMMs + SwiGLU on sorted rows only")
    print("| T | eager bf16 ms | eager fp8 ms | fused bf16 ms | TFLOP/s | of mm | fused W8A8 ms | TFLOP/s | of mm | "
          "grouped_mm bf16 ms | TFLOP/s | err bf16 vs eager | err W8A8 vs eager fp8 |")
    print("|---:|" + "---:|" * 12)
    err = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    for T in tokens:
        x = torch.randn(T, hidden, dtype=torch.bfloat16, device=dev, generator=g)
        weights, ids = random_routing(T, E, k, dev, seed=T)
        tflop = 2 * T * k * 3 * hidden * inter / 1e12
        fp8 = dict(w13_scale=s13, w2_scale=s2, act_quant=True)
        out_bf16, out_w8a8 = torch.empty_like(x), torch.empty_like(x)
        median = lambda fn: testing.do_bench(fn, return_mode="median")
        ms = {"bf16": median(lambda: fused_moe(x, w13, w2, weights, ids, out=out_bf16)),
              "W8A8": median(lambda: fused_moe(x, q13, q2, weights, ids, out=out_w8a8, **fp8)),
              "eager bf16": median(lambda: eager_moe_loop(x, w13, w2, weights, ids)),
              "eager fp8": median(lambda: eager_moe_loop_fp8(x, q13, s13, q2, s2, weights, ids)),
              "grouped_mm": math.nan}
        if hasattr(torch, "_grouped_mm"):
            try:
                xs, offs, _, _ = grouped_mm_prep(x, weights, ids, E)
                ms["grouped_mm"] = median(lambda: grouped_mm_gemms(xs, w13, w2, offs))
            except (RuntimeError, TypeError, NotImplementedError) as exc:  # no kernel for this GPU / dtype
                print(f"    torch._grouped_mm: {type(exc).__name__}: {str(exc)[:120]}")
        tf = {key: tflop / (v * 1e-3) for key, v in ms.items()}
        row = dict(model=name, T=T, ms=ms, tflops=tf, mm_tflops=ceil.matmul_tflops,
                   err_bf16=err(out_bf16, eager_moe_loop(x, w13, w2, weights, ids)),
                   err_w8a8=err(out_w8a8, eager_moe_loop_fp8(x, q13, s13, q2, s2, weights, ids)))
        rows.append(row)
        print(f"| {T} | {ms['eager bf16']:.2f} | {ms['eager fp8']:.2f} | {ms['bf16']:.2f} | {tf['bf16']:.0f} | "
              f"{tf['bf16'] / ceil.matmul_tflops:.0%} | {ms['W8A8']:.2f} | {tf['W8A8']:.0f} | "
              f"{tf['W8A8'] / ceil.matmul_tflops:.0%} | {ms['grouped_mm']:.2f} | {tf['grouped_mm']:.0f} | "
              f"{row['err_bf16']:.1e} | {row['err_w8a8']:.1e} |", flush=True)
        if sweep:
            for tag, kw, w_a, w_b in (("bf16", {}, w13, w2), ("W8A8", fp8, q13, q2)):
                base = default_config(min(T, CHUNK_TOKENS) * k, E, hidden, inter, x.dtype, act_quant=tag == "W8A8")
                for cfg in prefill_variants(base, T):
                    try:
                        t = median(lambda: fused_moe(x, w_a, w_b, weights, ids, out=out_bf16, config=cfg, **kw))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        print(f"    {tag} {cfg}: failed ({type(exc).__name__})")
                        continue
                    print(f"    {tag} bm {cfg.block_m} stages {cfg.num_stages} chunk {cfg.chunk_tokens}: "
                          f"{t:.2f} ms, {tflop / (t * 1e-3):.0f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time a few MoEConfig variants per case (W8A8)")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill sizes instead: the align step by size, then 1k-32k tokens in TFLOP/s")
    ap.add_argument("--routing", action="store_true",
                    help="the router benchmark instead: models/moe.py Gate, torch ops vs the fused routing kernel")
    args = ap.parse_args(argv)
    if args.routing and args.sweep:
        ap.error("--sweep sweeps the fused MoE's configs: use it without --routing")
    if args.routing and args.prefill:
        ap.error("--prefill and --routing are two different benchmarks: pick one")
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe.py needs a CUDA GPU")
    if args.prefill:
        return bench_align() + bench_prefill(sweep=args.sweep)
    return bench_routing() if args.routing else run_bench(sweep=args.sweep)


if __name__ == "__main__":
    main()
