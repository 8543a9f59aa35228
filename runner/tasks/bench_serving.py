"""``task=bench`` modes that run whole requests through the engine, as a user's offline job does:

- ``prefill``: ``batch`` prompts of ``context`` random tokens, one output token each: the time to the last first
  token, prefill tokens/s, and the FLOP roofline of the same work (linear layers plus causal attention, over the bf16
  matmul rate measured in this run: ``mla_runner.roofline.prefill_flops``).
- ``throughput``: vLLM's ``benchmark_throughput`` shape: ``batch`` prompts of ``context`` tokens, ``output_len``
  tokens each, all submitted at once: requests/s, input and output tokens/s, time to first token and time per output
  token (mean, median, p99), against the roofline of the same work: the prefill's FLOPs at the matmul rate plus every
  decode step at the larger of its bytes (the weights it touches and the KV it reads) over the copy rate and its FLOPs
  over the matmul rate.

Every measured run uses fresh random prompts, so the prefix cache never hits; one smaller warm-up run first compiles
the kernels. The figures are the median run's of ``repeats``.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from mla_runner.config import BenchTaskConfig, RunConfig
from mla_runner.engine import LLMEngine
from mla_runner.engine.request import Request
from mla_runner.roofline import linear_flops_per_token, measure_ceilings, prefill_flops, touched_weight_bytes
from mla_runner.sampling import SamplingParams
from mla_runner.tasks.generate import summarize


def bench_prefill(cfg: RunConfig) -> dict:
    task: BenchTaskConfig = cfg.task
    B, L = task.batch, task.context
    # one token per request: no decode step to capture
    cfg = dataclasses.replace(cfg, max_batch_size=max(cfg.max_batch_size, B), cuda_graphs=False,
                              max_model_len=max(cfg.max_model_len, L + 2), num_pages=None)
    engine = LLMEngine(cfg)
    device, args = engine.runner.device, engine.args
    ceilings = measure_ceilings(device)
    gen = torch.Generator().manual_seed(0)
    _run(engine, _requests(engine, gen, B, L, 1), device)
    runs = sorted(_run(engine, _requests(engine, gen, B, L, 1), device)[0] for _ in range(task.repeats))
    seconds = statistics.median(runs)
    flops = prefill_flops(args, [L] * B)
    roofline = flops / (ceilings.matmul_tflops * 1e12)
    return {
        "mode": "prefill", "batch": B, "context": L, "weights": engine.runner.resolved["weights"],
        "max_num_batched_tokens": cfg.max_num_batched_tokens, "ttft_s": seconds,
        "prefill_tokens_per_s": B * L / seconds, "tflops": flops / seconds / 1e12,
        **_roofline(device, roofline, seconds), "matmul_tflops": ceilings.matmul_tflops,
        "device_name": ceilings.device,
    }


def bench_throughput(cfg: RunConfig) -> dict:
    task: BenchTaskConfig = cfg.task
    N, I, O = task.batch, task.context, task.output_len
    cfg = dataclasses.replace(cfg, max_model_len=max(cfg.max_model_len, I + O + 1), num_pages=None)
    engine = LLMEngine(cfg)
    device, args = engine.runner.device, engine.args
    ceilings = measure_ceilings(device)
    gen = torch.Generator().manual_seed(0)
    _run(engine, _requests(engine, gen, min(N, 8), I, min(O, 8)), device)
    runs = sorted((_run(engine, _requests(engine, gen, N, I, O), device) for _ in range(task.repeats)),
                  key=lambda run: run[0])
    seconds, requests = runs[len(runs) // 2]
    summary = summarize(requests, 0, time.perf_counter() - seconds)
    roofline = (prefill_flops(args, [I] * N) / (ceilings.matmul_tflops * 1e12)
                + decode_floor(engine, N, I, O, ceilings.copy_gbps, ceilings.matmul_tflops))
    return {
        "mode": "throughput", "batch": N, "context": I, "output_len": O, "weights": engine.runner.resolved["weights"],
        "max_batch_size": cfg.max_batch_size, "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "seconds": seconds, "requests_per_s": N / seconds, "input_tokens_per_s": N * I / seconds,
        "tokens_per_s": N * O / seconds, "total_tokens_per_s": N * (I + O) / seconds,
        **{k: v for k, v in summary.items() if k.startswith(("ttft_s", "tpot_s"))},
        **_roofline(device, roofline, seconds), "copy_gb_s": ceilings.copy_gbps,
        "matmul_tflops": ceilings.matmul_tflops, "device_name": ceilings.device, **speculative_stats(engine),
    }


def speculative_stats(engine: LLMEngine) -> dict:
    """The acceptance figures of ``LLMEngine.stats`` (with speculative decoding on; none otherwise), over every
    step the engine ran, warm-up included."""
    stats = engine.stats()
    return {k: v for k, v in stats.items() if "accept" in k or k in ("num_draft_tokens", "num_verify_steps")}


def decode_floor(engine: LLMEngine, N: int, I: int, O: int, copy_gbps: float, matmul_tflops: float) -> float:
    """Seconds the decode steps of the throughput workload cannot beat: ceil(N / max_batch_size) waves of O - 1 steps
    of ``max_batch_size`` requests (fewer in the last wave), each at least its bytes over the copy rate (weights it
    touches, with the expected number of distinct experts for its tokens, plus its KV read at the wave's mean
    context) and its FLOPs over the matmul rate."""
    args, runner = engine.args, engine.runner
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    E, k = args.n_routed_experts, args.num_experts_per_tok
    cache = runner.kv.cache
    kv_per_token = cache.shape[0] * cache.shape[-1] * cache.element_size()
    total, left = 0.0, N
    while left > 0:
        B = min(left, engine.cfg.max_batch_size)
        experts = E * (1 - (1 - 1 / E) ** (B * k)) if E else 0
        weights = touched_weight_bytes(runner.model, B, [round(experts)] * moe_layers)
        kv = B * (I + O / 2) * kv_per_token
        step = max((weights + kv) / (copy_gbps * 1e9), B * linear_flops_per_token(args) / (matmul_tflops * 1e12))
        total += (O - 1) * step
        left -= B
    return total


def _requests(engine: LLMEngine, gen: torch.Generator, n: int, length: int, max_tokens: int) -> list[Request]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [engine.make_request(i, torch.randint(0, engine.args.vocab_size, (length,), generator=gen).tolist(), params)
            for i in range(n)]


def _run(engine: LLMEngine, requests: list[Request], device: torch.device) -> tuple[float, list[Request]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    engine.run(requests, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, requests


def _roofline(device: torch.device, roofline_s: float, seconds: float) -> dict:
    """On a GPU only (see ``mla_runner.tasks.bench``)."""
    if device.type != "cuda" or not math.isfinite(roofline_s):
        return {}
    return {"roofline_s": roofline_s, "roofline_fraction": roofline_s / seconds}
