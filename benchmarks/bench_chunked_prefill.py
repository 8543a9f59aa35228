"""Decode under load: how much a long prompt arriving slows the steps of requests already decoding, on a CUDA GPU.

``--decoders`` requests of ``--context`` tokens decode (CUDA-graph steps; a short prompt passes first, so that the
kernels of steps with prompt chunks are compiled); after ``--warm`` steps a prompt of
``--prompt`` tokens arrives and is prefilled in chunks under ``max_num_batched_tokens`` and
``chunk_attention_budget`` while they go on decoding.
Printed per pair of budgets: the median decode step before the newcomer, the median and the largest step while its
chunks run (each one also decodes every running request), the ratio of the largest to the undisturbed median, the
number of chunk steps (and how many ran the chunk in absorbed form) and the newcomer's time to first token. Step time
is wall time with the device synchronized.
Model: DeepSeek-V3 widths with random weights truncated to ``--layers`` layers (3 dense + 1 MoE at 4), FP8 weights.

    python benchmarks/bench_chunked_prefill.py [--budgets 2048,8192] [--pairs default,0] [--piecewise on,off]
        [--decoders 32] [--prompt 32768] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time

import torch


def measure(budget: int, pairs: str, piecewise: str, args) -> dict:
    from mla_runner.compose import compose_config
    from mla_runner.engine import LLMEngine
    from mla_runner.sampling import SamplingParams

    cfg = compose_config([
        "model=deepseek_v3", "model.random_weights=true", f"model.num_layers={args.layers}", "weights=fp8",
        f"max_batch_size={args.decoders + 1}", f"max_model_len={args.prompt + 64}", f"max_num_batched_tokens={budget}",
        "progress=false", f"num_pages={(args.decoders * (args.context + 1024) + args.prompt + 1024) // 64 + 8}",
        f"piecewise_cuda_graphs={str(piecewise == 'on').lower()}",
        *([] if pairs == "default" else [f"chunk_attention_budget={pairs}"])])
    engine = LLMEngine(cfg)
    runner, absorbed = engine.runner, []
    build = runner.eager_step.chunk_metadata

    def record_form(*a):
        meta = build(*a)
        absorbed.append(meta.absorbed is not None)
        return meta

    runner.eager_step.chunk_metadata = record_form
    gen = torch.Generator().manual_seed(0)
    vocab = engine.args.vocab_size

    def request(i: int, n: int, max_tokens: int):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        return engine.make_request(i, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))

    for i in range(args.decoders):
        engine.scheduler.add(request(i, args.context, 100_000))

    def step() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def settle() -> None:  # until every running request decodes
        while any(r.num_computed < r.num_tokens - 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
            step()

    settle()  # the decoders' own prefill
    engine.scheduler.add(request(args.decoders, 3 * budget, 1))  # a warm-up newcomer: compiles the mixed steps
    settle()
    quiet = [step() for _ in range(args.warm)]
    newcomer = request(args.decoders + 1, args.prompt, 1)
    engine.scheduler.add(newcomer)
    arrived = time.perf_counter()
    loaded = []
    absorbed.clear()
    while newcomer.first_token_time is None:
        loaded.append(step())
    base = statistics.median(quiet[len(quiet) // 2:])
    return {"budget": budget, "chunk_attention_budget": cfg.chunk_attention_budget, "piecewise": piecewise,
            "absorbed_steps": sum(absorbed), "decode_step_ms": base * 1e3,
            "loaded_median_ms": statistics.median(loaded) * 1e3,
            "loaded_max_ms": max(loaded) * 1e3, "max_over_decode": max(loaded) / base, "chunk_steps": len(loaded),
            "newcomer_ttft_s": newcomer.first_token_time - arrived}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="2048,8192", help="max_num_batched_tokens values, comma-separated")
    p.add_argument("--pairs", default="default",
                   help="chunk_attention_budget values, comma-separated ('default': the config's, 0: no bound)")
    p.add_argument("--piecewise", default="off",
                   help="on, off or on,off: steps with chunks of up to 2048 tokens as piecewise CUDA graphs or eager")
    p.add_argument("--decoders", type=int, default=32)
    p.add_argument("--context", type=int, default=2048, help="tokens of each decoding request")
    p.add_argument("--prompt", type=int, default=32768, help="tokens of the prompt that arrives")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--warm", type=int, default=20, help="decode steps before the prompt arrives")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_chunked_prefill.py needs a CUDA GPU")
    rows = []
    print(f"{torch.cuda.get_device_name()}: {args.decoders} requests of {args.context} tokens decoding, a prompt of "
          f"{args.prompt} tokens arriving; DeepSeek-V3 widths, {args.layers} layers, FP8 weights")
    print("| max_num_batched_tokens | chunk_attention_budget | piecewise | decode step ms | loaded median ms | "
          "loaded max ms | max / decode | chunk steps (absorbed) | newcomer TTFT s |\n" + "|---" * 9 + "|")
    for budget, pairs, piecewise in itertools.product(map(int, args.budgets.split(",")), args.pairs.split(","),
                                                      args.piecewise.split(",")):
        r = measure(budget, pairs, piecewise, args)
        rows.append(r)
        print(f"| {budget} | {r['chunk_attention_budget']} | {piecewise} | {r['decode_step_ms']:.2f} | "
              f"{r['loaded_median_ms']:.2f} | {r['loaded_max_ms']:.2f} | {r['max_over_decode']:.2f} | "
              f"{r['chunk_steps']} ({r['absorbed_steps']}) | {r['newcomer_ttft_s']:.3f} |", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
