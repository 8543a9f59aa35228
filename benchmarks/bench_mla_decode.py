"""Benchmark of the MLA decode kernels and the metadata strategies, on a CUDA GPU.

Run from the repository root (results: ``mla_decode.json`` in the current directory, or ``--out FILE``; the H100
results kept with the project live in docs/bench-h100/)::

    python benchmarks/bench_mla_decode.py [--quick] [--triton-too] [--layers N] [--flush read] [--only CASES]
                                          [--heads H,...] [--no-metadata] [--out FILE]
    python benchmarks/bench_mla_decode.py --split-floor [--flush read]     # writes mla_split_floor.json
    python benchmarks/bench_mla_decode.py --sweep                          # tuning sweeps, then exit

Kernel time = triton.testing.do_bench median (it flushes L2 before every call by zeroing 256 MB; ``--flush read``
reads 256 MB instead, leaving L2 clean rather than dirty) of a CUDA-graph replay of the decode + merge of one
layer, with the step's metadata built beforehand (graph replay keeps Python launch overhead out, as in the
engine's captured decode step). Reported beside it: GB/s of KV read (sum L * 576 *
elem bytes), TFLOP/s (2 * H * q_len * L * (576 + 512) per request), the roofline floor
max(bytes / copy BW, flops / matmul rate) with both ceilings measured in the same run, the timing method's own
read floor (``read_floor_us``: a plain stream read of the same KV bytes timed the same way), FlashMLA when
``flash_mla`` imports, and the H100 reference numbers of FlashMLA and SGLang's Triton kernel
(/work/shared/reference/mla_decode.md). Metadata build at B = 1..256: the persistent build's plan kernel time
(profiler) and its graph replay timed as above, and wall time of the per-step build (host work + copies).
``--layers N`` adds the time per layer of a graph of N layers, each reading its own cache (as a model's step
does; a replay's own ~5 us is then spread over the N layers), ours, FlashMLA's and the read floor's. ``--only``
(comma-separated case names) and ``--heads`` pick a part of the grid; the whole grid with ``--triton-too --layers 8``
takes ~2.5 minutes on an H100. ``--split-floor`` times what a split-KV decode at B = 1, L = 16k costs with no
arithmetic at all (``split_floor_us``). The copy and matmul ceilings come from ``mla_runner.roofline``; the JSON
names them ``copy_GBps``, ``matmul_bf16_TFLOPs`` and ``device``.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed, or captured, in that same iteration)
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from mla_runner.kernels.cuda_graph import FLUSHES, graph_time, kernel_time
from mla_runner.roofline import Ceilings, measure_ceilings

DV, DPE, D = 512, 64, 576
# Stream-read configs tried for the read floor, best taken: (int32 words a program loads per iteration, programs an SM)
READ_CONFIGS = ((2048, 8), (4096, 4), (4096, 8), (8192, 4))

# H100 80GB HBM3, torch 2.11, triton 3.6 (mla_decode.md): (H, B, L) -> (FlashMLA us, SGLang Triton us), q_len 1
REF_UNIFORM = {
    (64, 1, 16384): (51.1, 59.5), (64, 8, 4096): (36.4, 66.5), (64, 32, 4096): (75.7, 213.9),
    (64, 64, 4096): (131.9, 407.9), (64, 128, 4096): (234.8, 846.2), (64, 128, 16384): (874.5, 3238.7),
    (128, 1, 16384): (44.5, 68.7), (128, 8, 4096): (40.0, 108.2), (128, 32, 4096): (84.1, 401.2),
    (128, 64, 4096): (134.2, 799.3), (128, 128, 4096): (262.0, 1676.8), (128, 128, 16384): (1041.7, 6672.3),
    (16, 128, 16384): (None, 939.6),
}
# case name -> H -> (FlashMLA q1, FlashMLA q2, SGLang q1) us
REF_UNEVEN = {
    "1x32k+63x512": {64: (56.5, 61.1, 290.1), 128: (60.7, 92.0, 480.2)},
    "1x16k+127x256": {64: (52.8, 59.8, 268.4), 128: (60.6, 96.2, 471.3)},
    "64 random in [1,8k]": {64: (153.0, 173.2, 542.1), 128: (173.2, 280.1, 1026.4)},
    "B1 L65536": {64: (71.1, 62.0, 172.5), 128: (61.4, 86.5, 199.5)},
    "B256 L2048": {64: (240.8, 278.9, 1222.4), 128: (280.2, 498.2, 2420.0)},
}


def uneven_lens(name: str) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return {
        "1x32k+63x512": lambda: [32768] + [512] * 63,
        "1x16k+127x256": lambda: [16384] + [256] * 127,
        "64 random in [1,8k]": lambda: torch.randint(1, 8193, (64,), generator=g).tolist(),
        "B1 L65536": lambda: [65536],
        "B256 L2048": lambda: [2048] * 256,
    }[name]()


def ceilings_record(c: Ceilings) -> dict:
    """``mla_runner.roofline``'s ceilings under the names this benchmark's JSON and tables use: device-to-device
    copy GB/s (read + write), bf16 8192^3 matmul TFLOP/s, the device's name."""
    return {"copy_GBps": c.copy_gbps, "matmul_bf16_TFLOPs": c.matmul_tflops, "device": c.device}


@functools.cache
def _stream_read_kernel():
    """A Triton kernel that reads a buffer of int32 words once, grid-stride, xor-reducing into one word a program
    (stored, so that the loads are not removed): the fastest plain read of those bytes."""
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_read(src, out, n_words, iters, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc = tl.zeros([BLOCK], tl.int32)
        for i in range(iters):
            offs = (i * nprog + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(src + offs, mask=offs < n_words, other=0)
        tl.store(out + pid, tl.xor_sum(acc, 0))

    return _stream_read


def read_floor_us(nbytes: int, layers: int = 1, flush: str = "write") -> float:
    """The timing method's own floor for a call that reads ``nbytes``: us of a graph of ``layers`` stream reads of
    that many bytes (one buffer a layer), per layer, timed as the decode rows are (same flush, graph replay), best of
    READ_CONFIGS. Unlike bytes / copy rate it counts the replay's overhead and, with the write flush, the dirty lines
    the reads must first write back."""
    kernel = _stream_read_kernel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = -(-nbytes // 4)
    bufs = [torch.ones(n, dtype=torch.int32, device="cuda") for _ in range(layers)]
    best = float("inf")
    for block, per_sm in READ_CONFIGS:
        grid = min(sms * per_sm, -(-n // block))
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        iters = -(-n // (block * grid))

        def fn():
            for b in bufs:
                kernel[(grid,)](b, out, n, iters, BLOCK=block, num_warps=4)

        best = min(best, graph_time(fn, flush=flush) / layers)
    return best


@functools.cache
def _split_floor_kernels():
    """Two Triton kernels that move a split-KV decode's bytes and compute nothing: each of P programs streams a
    contiguous 1/P of the cache (int32 words, xor-reduced so that the loads stay) and writes a partial of W fp32
    words (the xor plus the word's index); the second sums the partials over P, CB words a program."""
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_piece(src, part, n_words, per, W, BLOCK: tl.constexpr, CB: tl.constexpr):
        pid = tl.program_id(0)
        lo = pid.to(tl.int64) * per
        acc = tl.zeros([BLOCK], tl.int32)
        for i in range(0, per, BLOCK):
            offs = lo + i + tl.arange(0, BLOCK)
            acc ^= tl.load(src + offs, mask=(offs < n_words) & (offs < lo + per), other=0)
        v = tl.xor_sum(acc, 0).to(tl.float32)
        for j in range(0, W, CB):
            o = j + tl.arange(0, CB)
            tl.store(part + pid.to(tl.int64) * W + o, v + o.to(tl.float32), mask=o < W)

    @triton.jit
    def _sum_pieces(part, out, W, P: tl.constexpr, CB: tl.constexpr):
        cols = tl.program_id(0) * CB + tl.arange(0, CB)
        acc = tl.zeros([CB], tl.float32)
        for p in range(P):
            acc += tl.load(part + p * W + cols, mask=cols < W, other=0.0)
        tl.store(out + cols, acc, mask=cols < W)

    return _stream_piece, _sum_pieces


def split_floor_us(nbytes: int, pieces: int, partial_words: int, flush: str = "write") -> float:
    """What a split-KV decode of ``nbytes`` of KV over ``pieces`` programs costs under the timing method before it
    computes anything: us of a graph replay of the two ``_split_floor_kernels`` (each program streams its 1/pieces of
    the bytes and writes ``partial_words`` fp32 words; the second kernel sums them, none when 0), timed as the decode
    rows are, best of two load widths."""
    stream_piece, sum_pieces = _split_floor_kernels()
    n = -(-nbytes // 4)
    src = torch.ones(n, dtype=torch.int32, device="cuda")
    part = torch.empty(max(pieces * partial_words, 1), dtype=torch.float32, device="cuda")
    out = torch.empty(max(partial_words, 1), dtype=torch.float32, device="cuda")
    per = -(-n // pieces)
    best = float("inf")
    for block in (4096, 16384):
        def fn():
            stream_piece[(pieces,)](src, part, n, per, partial_words, BLOCK=block, CB=1024, num_warps=8)
            if partial_words:
                sum_pieces[(-(-partial_words // 256),)](part, out, partial_words, P=pieces, CB=256, num_warps=4)

        best = min(best, graph_time(fn, flush=flush))
    return best


def run_split_floor(flush: str = "write") -> list[dict]:
    """``split_floor_us`` at B = 1, L = 16k (the issue's small-batch target, 20 us a call) for 64 and 128 pieces
    (64-row tiles: 64 x 512 fp32 words a piece), with fp32 partials, bf16-sized ones, an eighth of them (what an
    on-chip reduction over clusters of 8 would leave) and none, beside the read floor."""
    nbytes, words = 16384 * D * 2, 64 * DV
    rows = [dict(pieces=0, partials="read floor", us=read_floor_us(nbytes, flush=flush))]
    for pieces in (64, 128):
        for name, w in (("none", 0), ("fp32", words), ("bf16", words // 2), ("fp32 / 8", words // 8)):
            rows.append(dict(pieces=pieces, partials=name, us=split_floor_us(nbytes, pieces, w, flush)))
    return rows


def _problem(lens, q_len, H, page, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-L // page) for L in lens]
    n_pages = sum(need) + 1
    kv = torch.randn(n_pages, page, D, device="cuda", dtype=dtype, generator=g)
    perm = torch.randperm(n_pages, device="cuda", generator=g).int()
    bt = torch.zeros(len(lens), max(need), dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[at:at + n]
        at += n
    T = q_len * len(lens)
    q = torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    qo = torch.arange(0, T + 1, q_len, dtype=torch.int32, device="cuda")
    return q, kv, sl, qo, bt


def _flash_mla_time(qs, kvs, sl, bt, H, q_len, page, flush="write"):
    """FlashMLA's dense decode (kernels/flashmla.py) with its schedule planned once, when it can run here: us per
    layer of a graph of len(qs) layers (layer i reads qs[i], kvs[i])."""
    from mla_runner.kernels import flashmla

    if flashmla.unavailable_reason(qs[0].device) is not None or H not in flashmla.HEAD_COUNTS:
        return None
    try:
        step = flashmla.plan(sl, bt, q_len, H)

        def fn():
            return [flashmla.flashmla_decode(q, kv, step, D ** -0.5, DV) for q, kv in zip(qs, kvs, strict=True)]

        fn()
        return graph_time(fn, flush=flush) / len(qs)
    except Exception as e:  # noqa: BLE001 - keep the run going; report why in the row
        return f"error: {type(e).__name__}: {e}"[:200]


def run_kernel_bench(shapes: list[dict], ceilings: dict, page: int = 64, dtype=torch.bfloat16,
                     builder_kw: dict | None = None, config=None, flashmla: bool = True,
                     gluon: bool = True, layers: int = 1, flush: str = "write") -> list[dict]:
    """Time decode + merge for each shape dict {H, lens, q_len, name}; returns one row per shape.
    ``gluon=False`` keeps the Triton kernel where the sm90 Gluon kernel would run. ``layers`` > 1 also times a
    graph of that many layers, each with its own cache and queries (one step's metadata, as in a model), per
    layer (``layer_us``, ``flashmla_layer_us``): a replay's own overhead (~5 us) spread over the layers.
    ``flush``: how L2 is emptied before every replay (``kernels.cuda_graph.FLUSHES``)."""
    import dataclasses

    from mla_runner.kernels.metadata import PersistentMetadataBuilder
    from mla_runner.kernels.mla_decode import decode_impl, default_config, mla_decode

    rows = []
    read_us = {}  # KV bytes -> read floor per call, per layer
    esize = torch.tensor([], dtype=dtype).element_size()

    def shape_row(s: dict) -> dict:  # its GPU buffers are freed on return
        H, lens, q_len = s["H"], s["lens"], s["q_len"]
        q, kv, sl, qo, bt = _problem(lens, q_len, H, page, dtype)
        builder = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=q_len,
                                            max_pages_per_seq=bt.shape[1], page_size=page, device="cuda",
                                            **(builder_kw or {}))
        meta = builder.build(sl, qo, bt)
        out = torch.empty(q.shape[0], H, DV, device="cuda", dtype=dtype)
        cfg = config
        if cfg is None and not gluon:
            cfg = dataclasses.replace(default_config(q_len * H, esize), gluon=False)
        us = graph_time(lambda: mla_decode(q, kv, meta, D ** -0.5, DV, out=out, config=cfg), flush=flush)
        qs, kvs, outs = [q], [kv], [out]
        if layers > 1:
            qs += [torch.randn_like(q) for _ in range(layers - 1)]
            kvs += [torch.randn_like(kv) for _ in range(layers - 1)]
            outs += [torch.empty_like(out) for _ in range(layers - 1)]
            layer_us = graph_time(lambda: [mla_decode(*a, meta, D ** -0.5, DV, out=o, config=cfg)
                                           for *a, o in zip(qs, kvs, outs, strict=True)], flush=flush) / layers
        nbytes = sum(lens) * D * esize
        flops = sum(2 * H * q_len * L * (D + DV) for L in lens)
        floor = max(nbytes / (ceilings["copy_GBps"] * 1e3), flops / (ceilings["matmul_bf16_TFLOPs"] * 1e6))
        if nbytes not in read_us:
            read_us[nbytes] = read_floor_us(nbytes, flush=flush), (read_floor_us(nbytes, layers, flush)
                                                                   if layers > 1 else None)
        row = dict(name=s.get("name", "uniform"), H=H, B=len(lens), L=s.get("L", max(lens)), q_len=q_len,
                   impl=decode_impl(q, kv, meta, DV, out, cfg),
                   kv_MB=nbytes / 1e6, us=us, GBps=nbytes / us / 1e3, TFLOPs=flops / us / 1e6, floor_us=floor,
                   pct_floor=100 * floor / us, read_us=read_us[nbytes][0], num_parts=meta.num_parts)
        fm = _flash_mla_time([q], [kv], sl, bt, H, q_len, page, flush) if page == 64 and flashmla else None
        row["flashmla_us"] = fm
        if layers > 1:
            row["layers"], row["layer_us"], row["read_layer_us"] = layers, layer_us, read_us[nbytes][1]
            if fm is not None:
                row["flashmla_layer_us"] = _flash_mla_time(qs, kvs, sl, bt, H, q_len, page, flush)
        ref = REF_UNIFORM.get((H, len(lens), row["L"])) if row["name"] == "uniform" and q_len == 1 else None
        if row["name"] in REF_UNEVEN and H in REF_UNEVEN[row["name"]]:
            r = REF_UNEVEN[row["name"]][H]
            ref = (r[0] if q_len == 1 else r[1], r[2] if q_len == 1 else None)
        if ref:
            row["ref_flashmla_us"], row["ref_sglang_us"] = ref
        return row

    for s in shapes:
        rows.append(shape_row(s))
        torch.cuda.empty_cache()
    return rows


def kernel_shapes(quick: bool) -> list[dict]:
    Hs = [16, 64, 128]
    Bs = [1, 8, 32, 128] if quick else [1, 8, 32, 64, 128]
    Ls = [4096, 16384] if quick else [1024, 4096, 16384]
    qls = [1] if quick else [1, 2]
    shapes = []
    for q_len in qls:
        for H in Hs:
            for B in Bs:
                for L in Ls:
                    shapes.append(dict(H=H, lens=[L] * B, q_len=q_len, L=L))
                    if B > 1 and not quick:
                        shapes.append(dict(name="skewed", H=H, lens=[L] + [max(L // 16, 1)] * (B - 1), q_len=q_len,
                                           L=L))
        for H in [64, 128]:
            for name in REF_UNEVEN:
                shapes.append(dict(name=name, H=H, lens=uneven_lens(name), q_len=q_len))
    return shapes


def run_metadata_bench(batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), H: int = 128, page: int = 64,
                       L_max: int = 16384) -> list[dict]:
    """Persistent build: GPU time of a CUDA-graph replay of one build (do_bench, as the decode rows) and the
    plan kernel's own time (profiler); host wall time of an eager build. Per-step build: host wall time."""
    from mla_runner.kernels.metadata import PersistentMetadataBuilder, PerStepMetadataBuilder

    rows = []
    g = torch.Generator().manual_seed(0)
    max_pages = L_max // page
    for B in batches:
        lens = torch.randint(1, L_max + 1, (B,), generator=g).tolist()
        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        qo = torch.arange(B + 1, dtype=torch.int32, device="cuda")
        bt = torch.randint(0, 1 << 16, (B, max_pages), generator=g, dtype=torch.int32).cuda()
        kw = dict(num_heads=H, max_batch=B, max_q_len=1, max_pages_per_seq=max_pages, page_size=page, device="cuda")
        pers = PersistentMetadataBuilder(**kw)
        gpu_us = graph_time(lambda: pers.build(sl, qo, bt), rep=50, warmup=10)
        kernel_us = kernel_time(lambda: pers.build(sl, qo, bt))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 50
        for _ in range(n):
            pers.build(sl, qo, bt)
        torch.cuda.synchronize()
        pers_wall = (time.perf_counter() - t0) / n * 1e6
        per = PerStepMetadataBuilder(**kw)
        qls = [1] * B
        per.build(sl, qo, bt, lens, qls)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            per.build(sl, qo, bt, lens, qls)
        torch.cuda.synchronize()
        per_wall = (time.perf_counter() - t0) / n * 1e6
        rows.append(dict(B=B, persistent_gpu_us=gpu_us, persistent_kernel_us=kernel_us, persistent_wall_us=pers_wall,
                         per_step_wall_us=per_wall))
    return rows


def compiled_kernels(jit_fn) -> dict:
    """The kernels Triton has compiled so far in this process for a ``@triton.jit`` function, by cache entry: read
    from the function's JIT cache (``device_caches``, a Triton internal; empty where its layout differs)."""
    found = {}
    try:
        for dev, caches in jit_fn.device_caches.items():
            found.update({(dev, key): k for key, k in caches[0].items()})
    except (AttributeError, TypeError, IndexError, KeyError):
        pass
    return found


def register_summary(kernels) -> str:
    """``regs=R spills=S`` (ranges over several kernels) of compiled Triton kernels; ``?`` where none is known."""
    regs = sorted({k.n_regs for k in kernels if isinstance(getattr(k, "n_regs", None), int)})
    spills = sorted({k.n_spills for k in kernels if isinstance(getattr(k, "n_spills", None), int)})
    span = lambda v: "?" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"
    return f"regs={span(regs)} spills={span(spills)}"


def run_config_sweep(ceilings: dict) -> list[dict]:
    """Tile configs on a few shapes (tuning aid; the defaults live in mla_decode.default_config). Registers and
    spills: of the Triton decode kernels compiled for the config (``?`` where the Gluon kernel ran instead)."""
    from mla_runner.kernels import mla_decode as md
    from mla_runner.kernels.mla_decode import DecodeConfig

    rows = []
    big = [dict(H=128, lens=[16384], q_len=1), dict(H=128, lens=[4096] * 32, q_len=1),
           dict(H=128, lens=[4096] * 128, q_len=1), dict(H=64, lens=[16384], q_len=1),
           dict(H=64, lens=[4096] * 64, q_len=1), dict(H=64, lens=[16384] * 128, q_len=1)]
    small = [dict(H=16, lens=[16384] * 128, q_len=1), dict(H=16, lens=[4096] * 8, q_len=1),
             dict(H=8, lens=[4096] * 32, q_len=1)]
    C = DecodeConfig
    cfgs = [(big, C(64, 64, 8, 2)), (big, C(64, 64, 8, 2, False)), (big, C(64, 32, 8, 2)), (big, C(64, 64, 8, 3)),
            (small, C(16, 64, 8, 3)), (small, C(16, 64, 8, 2)), (small, C(16, 64, 4, 2)),
            (small, C(16, 64, 8, 3, False))]
    for shapes, cfg in cfgs:
        before = compiled_kernels(md._mla_decode_kernel)
        try:
            r = run_kernel_bench(shapes, ceilings, config=cfg, flashmla=False)
        except Exception as e:  # noqa: BLE001 - a config that cannot run is reported, the sweep goes on
            print("config", cfg, "failed:", type(e).__name__, str(e)[:200], flush=True)
            continue
        regs = register_summary(k for key, k in compiled_kernels(md._mla_decode_kernel).items() if key not in before)
        for x in r:
            x["config"] = str(cfg) + " " + regs
        rows += r
        print(cfg, regs, " ".join(f"{x['H']}/{x['B']}/{x['L']}:{x['us']:.1f}" for x in r), flush=True)
    return rows


def run_snap_sweep(ceilings: dict) -> list[dict]:
    """Plan boundary snapping (PersistentMetadataBuilder.snap_div) on shapes where parts cut requests."""
    rows = []
    rnd = uneven_lens("64 random in [1,8k]")
    shapes = [dict(H=128, lens=[1024] * 128, q_len=1), dict(H=128, lens=[4096] * 128, q_len=1),
              dict(H=64, lens=[4096] * 64, q_len=1), dict(H=128, lens=[4096] * 32, q_len=1),
              dict(H=64, lens=[16384] + [256] * 127, q_len=1), dict(H=64, lens=[2048] * 256, q_len=1),
              dict(H=16, lens=[4096] * 128, q_len=1), dict(H=128, lens=rnd, q_len=1), dict(H=128, lens=rnd, q_len=2),
              dict(H=64, lens=rnd, q_len=1), dict(H=64, lens=[1024] * 128, q_len=2)]
    for sd, sm in ((0, 0), (2, 4), (2, 8), (4, 1000)):
        r = run_kernel_bench(shapes, ceilings, builder_kw=dict(snap_div=sd, snap_max=sm), flashmla=False)
        for x in r:
            x["config"] = f"snap_div={sd} snap_max={sm}"
        rows += r
        print(f"snap_div={sd} snap_max={sm}", " ".join(f"{x['H']}/{x['B']}/{x['L']}:{x['us']:.1f}" for x in r),
              flush=True)
    return rows


def run_parts_sweep(ceilings: dict) -> list[dict]:
    """Grid size (num_parts) at small batch: fewer, longer parts mean fewer partials to write and merge."""
    rows = []
    shapes = [dict(H=64, lens=[16384], q_len=1), dict(H=128, lens=[16384], q_len=1), dict(H=64, lens=[4096], q_len=1),
              dict(H=64, lens=[4096] * 8, q_len=1), dict(H=128, lens=[4096] * 8, q_len=1),
              dict(H=64, lens=[65536], q_len=1), dict(H=64, lens=[16384] * 8, q_len=1)]
    for parts in (None, 96, 64, 48, 32, 24, 16):
        for s in shapes:
            tiles = -(-(s["H"] * s["q_len"]) // 64)
            kw = {} if parts is None else dict(num_parts=max(parts // tiles, 1))
            r = run_kernel_bench([s], ceilings, builder_kw=kw, flashmla=False)
            r[0]["config"] = f"parts={parts or 'SMs'}"
            rows += r
            print(f"parts={parts or 'SMs'} H={s['H']} B={len(s['lens'])} L={max(s['lens'])}: {r[0]['us']:.1f} us",
                  flush=True)
    return rows


def run_merge_sweep() -> list[dict]:
    """Merge kernel tiles (BLOCK_R, BLOCK_D, BLOCK_S) on shapes with one long split request and with many short ones."""
    import functools

    import mla_runner.kernels.mla_decode as md
    from mla_runner.kernels.metadata import PersistentMetadataBuilder
    from mla_runner.kernels.mla_merge import merge_tiles, mla_merge

    rows = []
    for H, lens in ((128, [16384]), (64, [16384]), (64, [1024]), (128, [4096] * 8), (128, [4096] * 32),
                    (64, [32768] + [512] * 63)):
        q, kv, sl, qo, bt = _problem(lens, 1, H, 64, torch.bfloat16)
        m = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=1, max_pages_per_seq=bt.shape[1],
                                      page_size=64, device="cuda").build(sl, qo, bt)
        out = torch.empty(len(lens), H, DV, device="cuda", dtype=torch.bfloat16)
        md.mla_decode(q, kv, m, 0.04, DV, out=out)
        default = merge_tiles(m.batch_size, m.num_parts, DV)
        for tiles in ((2, 512, 8), (4, 512, 4), (1, 512, 16), (1, 256, 32), (1, 128, 64), (8, 512, 2)):
            t = graph_time(functools.partial(mla_merge, out, m, tiles=tiles))
            rows.append(dict(H=H, B=len(lens), L=max(lens), block_r=tiles[0], block_d=tiles[1], block_s=tiles[2], us=t,
                             default=tiles == default, num_merge=m.num_merge.item()))
            print(f"merge H={H} B={len(lens)} L={max(lens)} merges={m.num_merge.item()} tiles={tiles}"
                  f"{' (default)' if tiles == default else ''}: {t:.1f} us", flush=True)
    return rows


def _fmt(v, w=8, p=1):
    if v is None:
        return "-".rjust(w)
    if isinstance(v, str):
        return "err".rjust(w)
    return f"{v:{w}.{p}f}"


def print_tables(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{c['device']}: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s; "
          f"L2 flushed by a {result.get('flush', 'write')} of 256 MB before every replay")
    hdr = (f"{'case':>20} {'H':>4} {'B':>4} {'L':>6} {'q':>2} {'us':>8} {'GB/s':>7} {'TF/s':>6} {'floor':>7} "
           f"{'%floor':>6} {'read':>6} {'FlashMLA':>8} {'x FM':>5} {'refFM':>7} {'x refFM':>7} {'refSGL':>7} "
           f"{'x SGL':>6} {'kernel':>6} {'triton':>7}")
    layers = max((r.get("layers", 1) for r in result["kernel"]), default=1)
    if layers > 1:
        hdr += f" {'us/layer':>8} {'FM/layer':>8} {'x FM/l':>6} {'read/l':>6}"
    print(hdr)
    for r in result["kernel"]:
        fm = r.get("flashmla_us")
        fm = fm if isinstance(fm, (int, float)) else None
        rfm, rsg = r.get("ref_flashmla_us"), r.get("ref_sglang_us")
        print(f"{r['name'][:20]:>20} {r['H']:>4} {r['B']:>4} {r['L']:>6} {r['q_len']:>2} {_fmt(r['us'])} "
              f"{r['GBps']:7.0f} {r['TFLOPs']:6.0f} {_fmt(r['floor_us'], 7)} {r['pct_floor']:6.0f} "
              f"{_fmt(r.get('read_us'), 6)} {_fmt(fm)} "
              f"{_fmt(fm / r['us'] if fm else None, 5, 2)} {_fmt(rfm, 7)} {_fmt(rfm / r['us'] if rfm else None, 7, 2)} "
              f"{_fmt(rsg, 7)} {_fmt(rsg / r['us'] if rsg else None, 6, 2)} {r.get('impl', '-'):>6} "
              f"{_fmt(r.get('triton_us'), 7)}", end="")
        if layers > 1:
            lu, fl = r.get("layer_us"), r.get("flashmla_layer_us")
            fl = fl if isinstance(fl, (int, float)) else None
            print(f" {_fmt(lu)} {_fmt(fl)} {_fmt(fl / lu if fl and lu else None, 6, 2)} "
                  f"{_fmt(r.get('read_layer_us'), 6)}", end="")
        print()
    if result.get("metadata"):
        print(f"\n{'B':>4} {'persistent kernel us':>21} {'persistent replay us':>21} {'persistent wall us':>19} "
              f"{'per_step wall us':>17}")
        for r in result["metadata"]:
            print(f"{r['B']:>4} {r.get('persistent_kernel_us', float('nan')):21.2f} {r['persistent_gpu_us']:21.2f} "
                  f"{r['persistent_wall_us']:19.1f} {r['per_step_wall_us']:17.1f}")
    print("(read: us of a plain stream read of the same KV bytes timed the same way, the method's own floor (replay "
          "overhead and flush included); "
          "x FM / x refFM / x SGL: their time over ours, > 1 means we are faster; ref* = mla_decode.md H100; "
          "kernel: gluon = kernels/mla_decode_sm90.py, triton = kernels/mla_decode.py; triton: the Triton kernel's "
          "us on the same shape" + (f"; us/layer, FM/layer, read/l: per layer of a graph of {layers} layers, each "
                                    "with its own cache)" if layers > 1 else ")"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the shapes, q_len 1 only")
    ap.add_argument("--out", default=None,
                    help="JSON file for all numbers (default mla_decode.json; mla_split_floor.json with "
                         "--split-floor)")
    ap.add_argument("--no-metadata", action="store_true", help="skip the metadata build benchmark")
    ap.add_argument("--only", default=None,
                    help="only cases whose name contains one of these comma-separated strings (e.g. uniform,skewed)")
    ap.add_argument("--heads", default=None, help="only these head counts (comma-separated, e.g. 16,64)")
    ap.add_argument("--sweep", action="store_true",
                    help="tile-config, plan-snapping, grid-size and merge sweeps, then exit")
    ap.add_argument("--min-chunk", type=int, default=None, help="PersistentMetadataBuilder min_chunk")
    ap.add_argument("--triton-too", action="store_true",
                    help="also time the Triton kernel where the sm90 Gluon kernel runs (column 'triton')")
    ap.add_argument("--layers", type=int, default=1,
                    help="also time a graph of this many layers (own cache each), per layer, ours and FlashMLA's")
    ap.add_argument("--split-floor", action="store_true",
                    help="what a split-KV decode at B = 1, L = 16k costs with no arithmetic (stream + partials + "
                         "their sum: docs/mla_decode.md#12-batch-1-and-the-split-floor), then exit")
    ap.add_argument("--flush", choices=FLUSHES, default="write",
                    help="how L2 is emptied before every timed replay: write (do_bench's: zero 256 MB, L2 left "
                         "dirty) or read (read 256 MB, L2 left clean)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_mla_decode.py needs a CUDA GPU")
    if args.out is None:
        args.out = "mla_split_floor.json" if args.split_floor else "mla_decode.json"
    if args.split_floor:
        rows = run_split_floor(args.flush)
        print(f"B = 1, L = 16k ({16384 * D * 2 / 1e6:.1f} MB of KV), {torch.cuda.get_device_name()}, "
              f"{args.flush} flush: us a call with no arithmetic")
        for r in rows:
            print(f"{r['pieces'] or '-':>6} pieces  {r['partials']:>10}  {r['us']:7.1f}")
        with open(args.out, "w") as f:
            json.dump({"flush": args.flush, "split_floor": rows}, f, indent=1)
        return {"split_floor": rows}
    ceilings = ceilings_record(measure_ceilings(torch.device("cuda")))
    if args.sweep:
        rows = (run_config_sweep(ceilings) + run_snap_sweep(ceilings) + run_parts_sweep(ceilings)
                + run_merge_sweep())
        with open(args.out, "w") as f:
            json.dump({"ceilings": ceilings, "sweep": rows}, f, indent=1, default=str)
        return {"sweep": rows}
    shapes = kernel_shapes(args.quick)
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        shapes = [s for s in shapes if any(k in s.get("name", "uniform") for k in keys)]
    if args.heads:
        try:
            heads = {int(h) for h in args.heads.split(",") if h}
        except ValueError:
            ap.error(f"--heads takes comma-separated integers, got {args.heads!r}")
        shapes = [s for s in shapes if s["H"] in heads]
    kw = {} if args.min_chunk is None else {"min_chunk": args.min_chunk}
    result = {"ceilings": ceilings, "torch": torch.__version__,
              "flush": args.flush,
              "kernel": run_kernel_bench(shapes, ceilings, builder_kw=kw, layers=args.layers, flush=args.flush)}
    if args.triton_too:
        todo = [(s, r) for s, r in zip(shapes, result["kernel"], strict=True) if r["impl"] == "gluon"]
        for (_, r), t in zip(todo, run_kernel_bench([s for s, _ in todo], ceilings, builder_kw=kw, flashmla=False,
                                                    gluon=False, flush=args.flush), strict=True):
            r["triton_us"] = t["us"]
    import triton
    result["triton"] = triton.__version__
    with open(args.out, "w") as f:  # kernel rows first, in case the metadata part is cut short
        json.dump(result, f, indent=1, default=str)
    if not args.no_metadata:
        result["metadata"] = run_metadata_bench()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
