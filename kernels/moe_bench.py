"""Benchmark of ``fused_moe`` against the eager per-expert loop: ``python -m kernels.fused_moe [--sweep]``.

For DeepSeek-V3 (E=256) and Kimi-K2 (E=384) routed-expert shapes (hidden 7168, inter 2048, top-8, bf16
weights; the checkpoints are FP8, dequantized here) and T in {1, 16, 64, 128} tokens with random distinct
top-8 routing, it prints the triton.testing.do_bench median (L2 flushed before each call) of:

- ``fused``: one ``fused_moe`` call launched eagerly (align ops + 3 Triton kernels);
- ``graph``: the same call captured in a CUDA graph and replayed (what a graph-captured decode step pays);
- ``align``: the align step alone (Triton kernel), graph-replayed: the part that does not stream weights;
- ``fp8 graph``: the same graph with FP8 e4m3 expert weights and 128x128 block scales (the bf16 draws
  quantized; weight-only dequantization in the kernels) and its GB/s of FP8 weight bytes;
- ``eager``: the models/moe.py approach (argsort, bincount + host sync, Python loop over used experts,
  three matmuls each, index_add), reimplemented here on the stacked weights;

and the achieved GB/s of expert weight bytes touched (used experts * 3 * hidden * inter * 2 bytes / time),
beside the device-to-device copy bandwidth measured in the same run. Needs about 34 GB of GPU memory (Kimi).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from kernels.fused_moe import MoEConfig, default_config, fused_moe
from kernels.moe_align import moe_align

SHAPES = {"DeepSeek-V3": dict(E=256, k=8, hidden=7168, inter=2048),
          "Kimi-K2": dict(E=384, k=8, hidden=7168, inter=2048)}
TOKENS = (1, 16, 64, 128)


def eager_moe_loop(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """models/moe.py's MoE.routed on stacked weights: sort by expert, host-read counts, loop over experts."""
    inter, k = w13.shape[1] // 2, topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    tokens = order // k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # the host sync
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count:
            idx = tokens[start:start + count]
            xe = x[idx]
            h = F.silu(xe @ w13[e, :inter].t()) * (xe @ w13[e, inter:].t())
            y = (h @ w2[e].t()).float() * topk_weights.flatten()[order[start:start + count], None]
            out.index_add_(0, idx, y)
            start += count
    return out.to(x.dtype)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor):
    """Stacked expert weights -> (w13 e4m3, w13_scale, w2 e4m3, w2_scale) in fused_moe's FP8 layout: gate and
    up quantized separately (each its own 128x128 grid, partial edge blocks per matrix), scales stacked."""
    from models.fp8 import quantize_fp8_block

    from models.fp8 import scale_grid

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


def random_routing(T: int, E: int, k: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token, uniformly at random; weights normalized to sum 2.5 (like the router)."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
    w = torch.rand(T, k, device=device, generator=g) + 0.1
    return w / w.sum(dim=1, keepdim=True) * 2.5, ids


def capture(fn) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (compiles the kernels), then capture one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) of 1 GiB: the practical ceiling for streaming weights."""
    from triton.testing import do_bench

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def sweep_configs(base: MoEConfig) -> list[MoEConfig]:
    """The default, then a few variants: N tiles, K tile, warps, pipeline depth (timed as graph replays)."""
    out = [base]
    for bn_up, bn_down, bk, warps, stages in [(32, 64, 128, 4, 4), (64, 64, 256, 4, 3), (128, 128, 64, 4, 5),
                                              (64, 128, 128, 8, 4), (32, 128, 128, 4, 5), (64, 256, 64, 8, 4)]:
        out.append(MoEConfig(base.block_m, bn_up, bn_down, bk, warps, stages))
    out.append(MoEConfig(**{**base.__dict__, "align": "torch"}))  # the ~25-op torch align step instead
    return out


def run_bench(sweep: bool = False, dtype: torch.dtype = torch.bfloat16, shapes: dict = SHAPES,
              tokens: tuple = TOKENS, dev: str = "cuda") -> list[dict]:
    from triton.testing import do_bench

    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels.moe_bench needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dtype}; "
          f"d2d copy {copy_bandwidth():.0f} GB/s")
    print(f"{'model':<12} {'T':>4} {'experts':>7} {'fused us':>9} {'graph us':>9} {'align us':>8} {'eager us':>9} "
          f"{'graph GB/s':>10} {'speedup':>7} {'rel err':>8} {'fp8 graph us':>12} {'fp8 GB/s':>8} "
          f"{'fp8/bf16':>8} {'fp8 err':>8}")
    rows = []
    for name, s in shapes.items():
        E, k, hidden, inter = s["E"], s["k"], s["hidden"], s["inter"]
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(E, 2 * inter, hidden, dtype=dtype, device=dev, generator=g).mul_(hidden ** -0.5)
        w2 = torch.randn(E, hidden, inter, dtype=dtype, device=dev, generator=g).mul_(inter ** -0.5)
        w13_q, w13_s, w2_q, w2_s = quantize_experts(w13, w2)
        for T in tokens:
            x = torch.randn(T, hidden, dtype=dtype, device=dev, generator=g)
            weights, ids = random_routing(T, E, k, dev, seed=T)
            out = torch.empty_like(x)
            used = ids.unique().numel()
            nbytes = used * 3 * hidden * inter * w13.element_size()
            call = lambda: fused_moe(x, w13, w2, weights, ids, out=out)  # noqa: E731
            graph = capture(call)
            t_fused = do_bench(call, return_mode="median")
            t_graph = do_bench(graph.replay, return_mode="median")
            block_m = default_config(T * k, E, hidden, inter, dtype).block_m
            align_graph = capture(lambda: moe_align(ids, E, block_m))
            t_align = do_bench(align_graph.replay, return_mode="median")
            del align_graph
            t_eager = do_bench(lambda: eager_moe_loop(x, w13, w2, weights, ids), return_mode="median")
            graph.replay()
            ref = eager_moe_loop(x, w13, w2, weights, ids).float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            out8 = torch.empty_like(x)
            graph8 = capture(lambda: fused_moe(x, w13_q, w2_q, weights, ids, out=out8, w13_scale=w13_s,
                                               w2_scale=w2_s))
            t_fp8 = do_bench(graph8.replay, return_mode="median")
            graph8.replay()
            err8 = ((out8.float() - ref).norm() / ref.norm()).item()
            del graph8
            row = dict(model=name, T=T, experts_used=used, fused_us=t_fused * 1e3, graph_us=t_graph * 1e3,
                       align_us=t_align * 1e3, eager_us=t_eager * 1e3,
                       graph_gbs=nbytes / (t_graph * 1e-3) / 1e9, rel_err=err, fp8_graph_us=t_fp8 * 1e3,
                       fp8_gbs=nbytes / w13.element_size() / (t_fp8 * 1e-3) / 1e9, fp8_rel_err=err8)
            rows.append(row)
            print(f"{name:<12} {T:>4} {used:>7} {row['fused_us']:>9.1f} {row['graph_us']:>9.1f} "
                  f"{row['align_us']:>8.1f} {row['eager_us']:>9.1f} {row['graph_gbs']:>10.0f} "
                  f"{t_eager / t_graph:>6.1f}x {err:>8.1e} {row['fp8_graph_us']:>12.1f} {row['fp8_gbs']:>8.0f} "
                  f"{t_graph / t_fp8:>7.2f}x {err8:>8.1e}", flush=True)
            if sweep:
                base = default_config(T * k, E, hidden, inter, dtype)
                for cfg in sweep_configs(base):
                    tag = (f"bm {cfg.block_m} bn_up {cfg.block_n_gate_up} bn_down {cfg.block_n_down} "
                           f"bk {cfg.block_k} warps {cfg.num_warps} stages {cfg.num_stages} align {cfg.align}")
                    try:
                        g_cfg = capture(lambda: fused_moe(x, w13, w2, weights, ids, out=out, config=cfg))
                        ms = do_bench(g_cfg.replay, return_mode="median")
                    except Exception as exc:  # e.g. out of shared memory for a deep pipeline
                        print(f"    {tag}: failed ({type(exc).__name__})")
                        continue
                    print(f"    {tag}: graph {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")
                    del g_cfg
            del graph
        del w13, w2, w13_q, w2_q
        torch.cuda.empty_cache()
    return rows
