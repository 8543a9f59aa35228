"""``task=bench``: measured figures for one point of a sweep (batch, context, backend, strategy).

Modes:
- ``decode``: the engine's whole decode step (scheduling, metadata, model, sampling) on a model whose KV
  cache already holds ``context`` tokens for each of ``batch`` requests; step time, tokens/s, and the
  roofline: bytes of weights the step touches plus KV read, over the copy bandwidth measured in this run.
  Under torchrun (``tp`` ranks) the bytes are the busiest rank's: its weight shards and routed experts, and
  the whole latent cache, which every rank reads for its heads.
- ``kernel``: one layer's MLA attention call through the configured backend and metadata strategy: us,
  GB/s of KV read, TFLOP/s and the roofline floor (copy and matmul ceilings measured in this run).
- ``metadata``: the per-step metadata build of the configured strategy at ``batch``.
- ``prefill`` and ``throughput``: whole requests through the engine (``mla_runner.tasks.bench_serving``).

The roofline floor and the fraction of it reached are reported on a GPU only: on a CPU the measured copy and matmul
rates bound neither the interpreter nor torch's CPU kernels.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mla_runner.attention import (
    AttentionBackend,
    AttentionSpec,
    StepInputs,
    backend_class,
    make_backend,
    resolve_name,
)
from mla_runner.config import BenchTaskConfig, RunConfig
from mla_runner.engine import LLMEngine, Request, Status, resolve_device, resolve_dtype
from mla_runner.engine.checkpoint import ModelSource
from mla_runner.engine.distributed import rank
from mla_runner.errors import ConfigError
from mla_runner.kernels.cuda_graph import graph_time
from mla_runner.kernels.synthetic import make_problem
from mla_runner.roofline import measure_ceilings, touched_weight_bytes
from mla_runner.sampling import SamplingParams
from mla_runner.tasks.bench_serving import bench_prefill, bench_throughput, speculative_stats

log = logging.getLogger(__name__)


def run_bench(cfg: RunConfig, output_dir: Path, should_stop: Callable[[], bool] | None = None) -> dict:
    """One measured point (a signal stops the process after it: a point is short)."""
    task: BenchTaskConfig = cfg.task
    modes: dict[str, Callable[[RunConfig], dict]] = {
        "decode": bench_decode, "kernel": bench_kernel, "metadata": bench_metadata, "prefill": bench_prefill,
        "throughput": bench_throughput}
    device = resolve_device(cfg.device)
    name = resolve_name(cfg.attention.name, device.type)
    # the strategy where the backend has one (the others build their own metadata)
    strategy = backend_class(name, cfg.metadata.strategy).strategy or "-"
    row = {"backend": name, "strategy": strategy, **modes[task.mode](cfg)}
    if rank() == 0:
        log.info(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    resolved = {"device": str(device), "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
                "attention": name}
    return {"metrics": row, "rows": [row], "resolved": resolved}


def bench_decode(cfg: RunConfig) -> dict:
    task: BenchTaskConfig = cfg.task
    B, L = task.batch, task.context
    steps = task.warmup + task.iters
    # a step emits up to 1 + k tokens per request with speculative decoding: none may finish within the run
    per_step = 1 + (cfg.speculative.num_tokens if cfg.speculative.method != "none" else 0)
    max_tokens = (steps + 2) * per_step
    cfg = dataclasses.replace(
        cfg, max_batch_size=B, max_model_len=max(cfg.max_model_len, L + max_tokens), num_pages=None,
    )
    engine = LLMEngine(cfg)
    runner = engine.runner
    ceilings = measure_ceilings(runner.device)
    fill_running(engine, [L] * B, max_tokens=max_tokens)
    experts = count_experts(engine)
    times, generated = [], 0
    for i in range(steps):
        _sync(runner.device)
        start = time.perf_counter()
        done = engine.step()
        _sync(runner.device)
        if i >= task.warmup:
            times.append(time.perf_counter() - start)
            generated += done.output_tokens
    step_s = statistics.median(times)
    tokens_per_step = generated / len(times)  # B without speculative decoding
    weight_bytes = engine.par.agree(touched_weight_bytes(runner.model, B, experts), runner.device, largest=True)
    cache = runner.kv.cache
    kv_bytes = B * (L + steps // 2) * cache[0, 0, 0].numel() * cache.element_size() * cache.shape[0]
    floor_s = (weight_bytes + kv_bytes) / (ceilings.copy_gbps * 1e9)
    return {
        "mode": "decode", "tp": engine.par.world, "moe": cfg.parallel.moe, "batch": B, "context": L,
        "cuda_graphs": runner.use_graphs,
        "step_ms": step_s * 1e3, "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step_s,
        "tokens_per_s_per_request": tokens_per_step / step_s / B,
        "tokens_per_s_per_gpu": tokens_per_step / step_s / engine.par.world,
        "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
        "gb_s": (weight_bytes + kv_bytes) / step_s / 1e9,
        **_roofline(runner.device, "floor_ms", floor_s * 1e3, floor_s / step_s),
        "copy_gb_s": ceilings.copy_gbps, "device_name": ceilings.device, **speculative_stats(engine),
    }


def bench_kernel(cfg: RunConfig) -> dict:
    """One layer's attention call over ``batch`` requests, metadata built beforehand (it is shared by all
    layers, so its cost is not a per-call cost)."""
    task: BenchTaskConfig = cfg.task
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    args = ModelSource.resolve(cfg.model).args
    H = task.heads or args.num_attention_heads
    lens = request_lengths(task)
    p = make_problem(lens, [task.q_len] * len(lens), H, cfg.page_size, kv_lora_rank=args.kv_lora_rank,
                     rope_dim=args.qk_rope_head_dim, dtype=dtype, device=device)
    backend = _backend(cfg, H, len(lens), p.max_pages, args, dtype, device)
    meta = backend.build_metadata(StepInputs(p.seq_lens, p.qo_indptr, p.block_table, task.q_len, p.seq_lens_host,
                                             p.q_lens_host))
    call = lambda: backend.forward(p.q, p.kv_cache, meta, args.softmax_scale)
    seconds = time_call(call, device, task, graph=backend.capabilities.graph_forward)
    ceilings = measure_ceilings(device)
    D = args.kv_lora_rank + args.qk_rope_head_dim
    nbytes = sum(lens) * D * p.kv_cache.element_size()
    flops = sum(2 * H * task.q_len * L * (D + args.kv_lora_rank) for L in lens)
    floor = max(nbytes / (ceilings.copy_gbps * 1e9), flops / (ceilings.matmul_tflops * 1e12))
    return {
        "mode": "kernel", "heads": H, "batch": len(lens), "context": task.context, "lengths": task.lengths,
        "q_len": task.q_len, "time_us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9,
        "tflops": flops / seconds / 1e12, **_roofline(device, "floor_us", floor * 1e6, floor / seconds),
        "copy_gb_s": ceilings.copy_gbps, "matmul_tflops": ceilings.matmul_tflops, "device_name": ceilings.device,
    }


def bench_metadata(cfg: RunConfig) -> dict:
    """The configured backend's metadata build of one step: wall time (host work plus copies where it builds on the
    host), and on a GPU the device time of its graph replay where the build can be captured."""
    task: BenchTaskConfig = cfg.task
    device = resolve_device(cfg.device)
    args = ModelSource.resolve(cfg.model).args
    H = task.heads or args.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, task.context + 1, (task.batch,), generator=gen).tolist()
    q_lens = [task.q_len] * task.batch
    max_pages = -(-task.context // cfg.page_size)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    qo_indptr = torch.arange(0, task.q_len * task.batch + 1, task.q_len, dtype=torch.int32, device=device)
    block_table = torch.randint(0, 1 << 20, (task.batch, max_pages), generator=gen, dtype=torch.int32).to(device)
    backend = _backend(cfg, H, task.batch, max_pages, args, resolve_dtype(cfg.dtype, device), device)
    inputs = StepInputs(seq_lens, qo_indptr, block_table, task.q_len, lens, q_lens)

    def build():
        return backend.build_metadata(inputs)

    wall = time_call(build, device, task, wall=True)
    row = {"mode": "metadata", "heads": H, "batch": task.batch, "context": task.context,
           "metadata_wall_us": wall * 1e6, "metadata_us": wall * 1e6}
    if device.type == "cuda" and backend.capabilities.graph_metadata:
        row["metadata_us"] = time_call(build, device, task, graph=True) * 1e6
    return row


def _roofline(device: torch.device, floor_key: str, floor: float, fraction: float) -> dict:
    """The floor and the fraction of it reached, on a GPU. A CPU's measured copy and matmul rates do not bound what
    the interpreter or torch's CPU kernels do (fractions over 1 come out), so CPU rows carry neither."""
    return {floor_key: floor, "roofline_fraction": fraction} if device.type == "cuda" else {}


def request_lengths(task: BenchTaskConfig) -> list[int]:
    if task.lengths == "uniform":
        return [task.context] * task.batch
    return [task.context] + [max(task.context // 16, 1)] * (task.batch - 1)


def time_call(fn: Callable[[], object], device: torch.device, task: BenchTaskConfig, wall: bool = False,
              graph: bool = False) -> float:
    """Median seconds per call: on a GPU, device time with the L2 flushed (``do_bench``), of a CUDA-graph
    replay with ``graph`` (launch overhead out, as in a graphed decode step); else wall time."""
    if device.type == "cuda" and not wall:
        from triton.testing import do_bench

        if graph:
            return graph_time(fn) * 1e-6
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    for _ in range(task.warmup):
        fn()
    times = []
    for _ in range(task.iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _backend(cfg: RunConfig, heads: int, batch: int, max_pages: int, args, dtype: torch.dtype,
             device: torch.device) -> AttentionBackend:
    spec = AttentionSpec(num_heads=heads, kv_lora_rank=args.kv_lora_rank, rope_dim=args.qk_rope_head_dim,
                         page_size=cfg.page_size, dtype=dtype, device=device, max_batch=batch,
                         max_pages_per_seq=max_pages, max_q_len=cfg.task.q_len)
    return make_backend(cfg.attention.name, cfg.metadata.strategy, spec, num_kv_splits=cfg.metadata.num_kv_splits,
                        dram_ratio=cfg.metadata.dram_ratio)


def fill_running(engine: LLMEngine, contexts: list[int], max_tokens: int) -> list[Request]:
    """Running requests whose first ``contexts[i]`` tokens are already in the (random-filled) cache, as if
    prefilled: decode steps can be measured at any context without running the prefill."""
    blocks = engine.scheduler.blocks
    if sum(blocks.pages_needed(c + max_tokens) for c in contexts) > blocks.num_free:
        raise ConfigError(f"the KV cache cannot hold {len(contexts)} requests of up to {max(contexts)} tokens: "
                          "raise num_pages")
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = []
    for i, context in enumerate(contexts):
        ids = torch.randint(0, engine.args.vocab_size, (context + 1,), generator=gen).tolist()
        req = engine.make_request(i, ids[:context], params)
        req.output_token_ids, req.status = ids[context:], Status.RUNNING
        blocks.allocate(req, context)
        req.num_computed = context
        engine.scheduler.running.append(req)
        requests.append(req)
    engine.runner.kv.randomize(engine.runner.dtype)
    return requests


def count_experts(engine: LLMEngine) -> list[int]:
    """The distinct experts of this rank that each MoE layer routes to in one eager decode step (router hooks;
    graph replays would not call them)."""
    unique: list[int] = []
    owned = engine.par.owned_experts(engine.args.n_routed_experts)

    def record(_m, _i, out) -> None:
        ids = out[1].unique()
        unique.append(int(((ids >= owned.start) & (ids < owned.stop)).sum()))

    runner = engine.runner
    hooks = [m.register_forward_hook(record) for name, m in runner.model.named_modules() if name.endswith("mlp.gate")]
    try:
        with runner.eager():
            engine.step()
    finally:
        for h in hooks:
            h.remove()
    return unique


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
