"""``task=bench``: measured figures for one point of a sweep (batch, context, backend, strategy).

Modes:
- ``decode``: the engine's whole decode step (scheduling, metadata, model, sampling) on a model whose KV
  cache already holds ``context`` tokens for each of ``batch`` requests; step time, tokens/s, and the
  roofline: bytes of weights the step touches plus KV read, over the copy bandwidth measured in this run.
- ``kernel``: one layer's MLA attention call through the configured backend and metadata strategy: us,
  GB/s of KV read, TFLOP/s and the roofline floor (copy and matmul ceilings measured in this run).
- ``metadata``: the per-step metadata build of the configured strategy at ``batch``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from runner.config import BenchTaskConfig, RunConfig
from runner.engine import Engine
from runner.errors import ConfigError
from runner.request import Request, Status
from runner.roofline import Ceilings, measure_ceilings
from runner.sampling import SamplingParams


def run_bench(cfg: RunConfig, output_dir: Path) -> dict:
    task: BenchTaskConfig = cfg.task
    modes: dict[str, Callable[[RunConfig], dict]] = {"decode": bench_decode}
    row = modes[task.mode](cfg)
    print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    return {"metrics": row, "rows": [row]}


def bench_decode(cfg: RunConfig) -> dict:
    task: BenchTaskConfig = cfg.task
    B, L = task.batch, task.context
    steps = task.warmup + task.iters
    cfg = dataclasses.replace(
        cfg, max_batch_size=max(cfg.max_batch_size, B), max_model_len=max(cfg.max_model_len, L + steps + 1),
        num_pages=None,
    )
    engine = Engine(cfg)
    ceilings = measure_ceilings(engine.device)
    fill_running(engine, B, L, max_tokens=steps + 2)
    experts = count_experts(engine)
    times = []
    for i in range(steps):
        _sync(engine.device)
        start = time.perf_counter()
        engine.step()
        _sync(engine.device)
        if i >= task.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    weight_bytes = touched_weight_bytes(engine.model, B, experts)
    kv_bytes = B * (L + steps // 2) * engine.kv_cache[0, 0, 0].numel() * engine.kv_cache.element_size() \
        * engine.kv_cache.shape[0]
    floor_s = (weight_bytes + kv_bytes) / (ceilings.copy_gbps * 1e9)
    return {
        "mode": "decode", "batch": B, "context": L, "cuda_graphs": engine.graphs is not None,
        "step_ms": step_s * 1e3, "tokens_per_s": B / step_s,
        "weight_GB": weight_bytes / 1e9, "kv_GB": kv_bytes / 1e9,
        "GBps": (weight_bytes + kv_bytes) / step_s / 1e9,
        "floor_ms": floor_s * 1e3, "roofline_fraction": floor_s / step_s,
        "copy_GBps": ceilings.copy_gbps,
    }


def fill_running(engine: Engine, batch: int, context: int, max_tokens: int) -> None:
    """``batch`` running requests whose first ``context`` tokens are already in a random-filled cache."""
    if engine.blocks.pages_needed(context + max_tokens) * batch > engine.blocks.num_free:
        raise ConfigError(f"the KV cache cannot hold batch={batch} requests of context={context}: raise num_pages")
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, engine.args.vocab_size, (context + 1,), generator=gen).tolist()
        req = Request(i, None, ids[:context], params, output_token_ids=ids[context:], status=Status.RUNNING)
        engine.blocks.allocate(req, context)
        req.num_cached = context
        engine.scheduler.running.append(req)
    engine.kv_cache.normal_()


def count_experts(engine: Engine) -> list[int]:
    """The distinct experts each MoE layer routes to in one eager decode step (router hooks; graph replays
    would not call them)."""
    unique: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: unique.append(int(out[1].unique().numel())))
             for name, m in engine.model.named_modules() if name.endswith("mlp.gate")]
    graphs, engine.graphs = engine.graphs, None
    try:
        engine.step()
    finally:
        engine.graphs = graphs
        for h in hooks:
            h.remove()
    return unique


def touched_weight_bytes(model: torch.nn.Module, batch: int, unique_experts: list[int]) -> int:
    """Weights one decode step reads: everything but the routed experts and the embedding table, plus the
    experts actually routed to and one embedding row per token."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            total += batch * p.shape[1] * p.element_size()
        elif ".experts." not in name:
            total += p.numel() * p.element_size()
    experts = [m for name, m in model.named_modules() if name.endswith(".experts.0")]
    if experts:  # every MoE layer's experts have the same shapes
        total += sum(p.numel() * p.element_size() for p in experts[0].parameters()) * sum(unique_experts)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
