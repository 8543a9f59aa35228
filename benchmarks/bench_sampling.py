"""The decode step's sampling on a CUDA GPU: ``sampler.sample`` run eager after the step (the path of steps the decode
sampler does not take) beside the decode sampler replaying its CUDA graph, at DeepSeek-V3's vocabulary.

Run from the repository root::

    python benchmarks/bench_sampling.py [--vocab 129280] [--batches 1,16,64,128] [--json PATH]

Each setting is a batch of identical requests: ``greedy`` (temperature 0), ``temperature`` (1.0), ``top_p`` (0.9
with top_k 50), ``penalties`` (greedy with repetition 1.1 and frequency 0.2 over 256 prompt and 256 output tokens
each; the decode sampler's calls append their tokens, as the engine does). Times are wall-clock microseconds per
call, token copy to the host included (that copy is the step's synchronization either way), median of ``--iters``
calls after a warm-up; logits GB/s is the logits' bytes (B x V
x 4) over that time.
"""
# ruff: noqa: B023  (every closure a loop makes here is timed in that same iteration)
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mla_runner.engine.decode_sampler import DecodeSampler
from mla_runner.engine.request import Request
from mla_runner.engine.sampler import DrawKeys, sample
from mla_runner.sampling import SamplingParams

SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=1.0),
    "top_p": SamplingParams(temperature=1.0, top_p=0.9, top_k=50),
    "penalties": SamplingParams(temperature=0, repetition_penalty=1.1, frequency_penalty=0.2),
}
HISTORY = 256  # prompt and output tokens of each request


def wall_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, V = torch.device("cuda"), args.vocab
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, vocabulary {V}")
    print("| setting | batch | eager sample (us) | decode sampler graph (us) | speedup | graph logits GB/s |")
    print("|---|---|---|---|---|---|")
    for name, params in SETTINGS.items():
        for B in map(int, args.batches.split(",")):
            reqs = [Request(i, i, None, torch.randint(0, V, (HISTORY,), generator=g).tolist(), params,
                            output_token_ids=torch.randint(0, V, (HISTORY,), generator=g).tolist()) for i in range(B)]
            logits = torch.randn(B, V, device=device) * 3
            keys = DrawKeys(list(range(B)), [HISTORY] * B)
            sampler = DecodeSampler(max(B, 1), V, device)

            def eager():
                sample(logits, [r.params for r in reqs], keys, [r.prompt_token_ids for r in reqs],
                       [r.output_token_ids for r in reqs]).tokens.tolist()

            def graphed():  # the tokens appended as the engine does, so that the counts stay the requests' own
                for r, t in zip(reqs, sampler.sample(logits, reqs, keys.seeds, graph=True)):
                    r.output_token_ids.append(t)

            t_eager, t_graph = wall_us(eager, args.iters), wall_us(graphed, args.iters)
            row = {"setting": name, "batch": B, "eager_us": round(t_eager, 1), "graph_us": round(t_graph, 1),
                   "speedup": round(t_eager / t_graph, 2), "graph_gb_s": round(B * V * 4 / t_graph / 1e3, 1)}
            rows.append(row)
            print(f"| {name} | {B} | {row['eager_us']} | {row['graph_us']} | {row['speedup']}x | "
                  f"{row['graph_gb_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "vocab": V, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
