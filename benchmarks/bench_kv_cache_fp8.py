"""Decode attention over an FP8 latent cache, on a CUDA GPU: our Triton kernel reading ``fp8`` and ``fp8_ds_mla``
caches beside our bf16 kernel, FlashMLA's bf16 decode (``flash_mla``, when it imports) and the FP8 FlashMLA kernel
vLLM ships (``--flashmla-fp8 PATH``: vLLM's ``_flashmla_extension_C.abi3.so``, by default the one
``mla_runner.kernels.flashmla.fp8_library`` finds; FP8 query and cache with per-tensor scales).

Run from the repository root::

    python benchmarks/bench_kv_cache_fp8.py [--flashmla-fp8 PATH] [--layers 8] [--heads 16,64,128] [--json PATH]

Time per layer of a CUDA graph of ``--layers`` decode calls (L2 flushed before every replay, as
``bench_mla_decode.py`` times), each with the step's metadata built beforehand. Beside each time: the KV bytes
read per layer over it (GB/s), and the fraction of the copy ceiling (measured in the same run) that reading those
bytes at the ceiling would take. Accuracy: the relative error (||o - o_ref|| / ||o_ref||) of each FP8 output
against attention in fp32 over the original cache; FP8 FlashMLA also quantizes the query.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed in that same iteration)
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from mla_runner.kernels.cuda_graph import graph_time
from mla_runner.kernels.fp8_block import FP8_MAX
from mla_runner.kernels.kv_cache import KVCacheLayout, per_tensor_scale, write_latent
from mla_runner.kernels.metadata import PersistentMetadataBuilder
from mla_runner.kernels.mla_decode import decode_impl, default_config, mla_decode
from mla_runner.kernels.reference import mla_attention_reference
from mla_runner.roofline import measure_ceilings

DV, DPE, D = 512, 64, 576
PAGE = 64
# (H, B, L): the grid of issue #30 (64 and 128 heads at 4k-16k) and the 16 heads a rank holds at TP 8
SHAPES = [(64, 64, 8192), (64, 128, 16384), (64, 32, 32768), (128, 64, 8192), (128, 128, 4096), (128, 128, 16384),
          (16, 64, 8192), (16, 128, 16384)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def flashmla_fp8(path: str | None):
    """The FP8 FlashMLA ops of vLLM's extension library (``path``, else where ``flashmla.fp8_library`` finds it), or
    None (with the reason printed) where it cannot load."""
    from mla_runner.kernels import flashmla

    if path is None and flashmla.fp8_library() is None:
        return None
    try:
        torch.ops.load_library(path or str(flashmla.fp8_library()))
        return torch.ops._flashmla_extension_C
    except Exception as e:  # noqa: BLE001 - the benchmark runs without it
        print(f"FP8 FlashMLA not loaded from {path or flashmla.fp8_library()}: {type(e).__name__}: {e}")
        return None


def shape_row(H: int, B: int, L: int, layers: int, ceilings, fm8) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    pages_per = -(-L // PAGE)
    n_pages = B * pages_per
    kv = torch.randn(n_pages, PAGE, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = torch.randperm(n_pages, device="cuda", generator=g).int().view(B, pages_per)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
    qo = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    row = dict(H=H, B=B, L=L, layers=layers)
    slots = torch.arange(n_pages * PAGE, device="cuda")
    sample = slice(0, min(B, 4))  # accuracy on the first requests (the fp32 reference is slow at full size)
    ref = mla_attention_reference(q[sample].float(), kv.float(), qo[: sample.stop + 1], sl[sample], bt[sample], scale,
                                  DV)
    for kind in ("auto", "fp8", "fp8_ds_mla"):
        layout = KVCacheLayout(kind, DV, DPE, torch.bfloat16)
        if kind == "auto":
            cache, kv_scale = kv, None
        else:
            cache = layout.allocate(n_pages, PAGE, "cuda")
            kv_scale = per_tensor_scale(kv.float().abs().max().item(), "cuda") if kind == "fp8" else None
            write_latent(cache, kv.view(-1, D), slots, layout, kv_scale)
        builder = PersistentMetadataBuilder(num_heads=H, max_batch=B, max_q_len=1, max_pages_per_seq=pages_per,
                                            page_size=PAGE, device="cuda")
        meta = builder.build(sl, qo, bt)
        out = torch.empty(B, H, DV, device="cuda", dtype=torch.bfloat16)
        call = lambda: mla_decode(q, cache, meta, scale, DV, out=out, kv_scale=kv_scale)
        call()
        us = graph_time(lambda: [call() for _ in range(layers)]) / layers
        nbytes = B * L * layout.bytes_per_token
        row[kind] = dict(us=us, GBps=nbytes / us / 1e3, pct_copy=100 * nbytes / (ceilings.copy_gbps * 1e3) / us,
                         impl=decode_impl(q, cache, meta, DV, out),
                         rel_err=relative_error(out[sample], ref))
        if kind == "auto" and row[kind]["impl"] == "gluon":  # the FP8 caches run the Triton kernel: its bf16 time too
            cfg = dataclasses.replace(default_config(H, 2), gluon=False)
            triton_call = lambda: mla_decode(q, cache, meta, scale, DV, out=out, config=cfg)
            triton_call()
            row["triton_bf16_us"] = graph_time(lambda: [triton_call() for _ in range(layers)]) / layers
        del cache
    try:
        from mla_runner.kernels import flashmla

        if flashmla.unavailable_reason(q.device) is None and H in flashmla.HEAD_COUNTS:
            step = flashmla.plan(sl, bt, 1, H)
            fn = lambda: flashmla.flashmla_decode(q, kv, step, scale, DV)
            fn()
            row["flashmla_bf16_us"] = graph_time(lambda: [fn() for _ in range(layers)]) / layers
    except Exception as e:  # noqa: BLE001 - keep the row
        row["flashmla_bf16_us"] = f"error: {type(e).__name__}: {e}"[:160]
    if fm8 is not None:
        try:
            layout = KVCacheLayout("fp8", DV, DPE, torch.bfloat16)
            cache = layout.allocate(n_pages, PAGE, "cuda")
            k_scale = per_tensor_scale(kv.float().abs().max().item(), "cuda")
            write_latent(cache, kv.view(-1, D), slots, layout, k_scale)
            q_scale = (q.float().abs().max() / FP8_MAX).reshape(1)
            q8 = (q.float() / q_scale).to(torch.float8_e4m3fn).view(B, 1, H, D)
            md, splits = fm8.get_mla_decoding_metadata_dense_fp8(sl, H, 1)
            fn = lambda: fm8.fwd_kvcache_mla_fp8(q8, cache.view(n_pages, PAGE, 1, D), DV, sl, bt, scale, False, md,
                                                 splits, q_scale, k_scale)
            o8 = fn()[0].view(B, H, DV)
            row["flashmla_fp8_us"] = graph_time(lambda: [fn() for _ in range(layers)]) / layers
            row["flashmla_fp8_rel_err"] = relative_error(o8[sample], ref)
        except Exception as e:  # noqa: BLE001 - keep the row
            row["flashmla_fp8_us"] = f"error: {type(e).__name__}: {e}"[:160]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flashmla-fp8", metavar="PATH",
                   help="vLLM's _flashmla_extension_C.abi3.so (default: $MLA_RUNNER_FLASHMLA_FP8, or an installed "
                   "vllm's)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", default="16,64,128")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_cache_fp8.py needs a CUDA GPU")
    ceilings = measure_ceilings(torch.device("cuda"))
    fm8 = flashmla_fp8(args.flashmla_fp8)
    heads = {int(h) for h in args.heads.split(",")}
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gbps:.0f} GB/s; us per layer of a graph of "
          f"{args.layers}; (GB/s, % of copy ceiling, rel. error)")
    print("| H | B | L | bf16 | bf16, Triton kernel | fp8 | fp8_ds_mla | fp8 / bf16 | ds / bf16 | FlashMLA bf16 | "
          "FlashMLA FP8 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for H, B, L in SHAPES:
        if H not in heads:
            continue
        r = shape_row(H, B, L, args.layers, ceilings, fm8)
        rows.append(r)

        def cell(k):
            c = r[k]
            return f"{c['us']:.1f} ({c['GBps']:.0f}, {c['pct_copy']:.0f}%, {c['rel_err']:.1e})"

        fm = r.get("flashmla_bf16_us")
        f8 = r.get("flashmla_fp8_us")
        fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v or "-")
        f8s = fmt(f8) + (f" ({r['flashmla_fp8_rel_err']:.1e})" if "flashmla_fp8_rel_err" in r else "")
        print(f"| {H} | {B} | {L} | {cell('auto')} | {fmt(r.get('triton_bf16_us'))} | {cell('fp8')} | "
              f"{cell('fp8_ds_mla')} | "
              f"{r['auto']['us'] / r['fp8']['us']:.2f}x | {r['auto']['us'] / r['fp8_ds_mla']['us']:.2f}x | "
              f"{fmt(fm)} | {f8s} |", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": ceilings.copy_gbps, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
