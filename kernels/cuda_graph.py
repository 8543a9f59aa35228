"""CUDA-graph capture with a warm-up, and the graph-replay timing every benchmark here uses."""
from __future__ import annotations

from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any], warmup: int = 1, pool=None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (compiles kernels, settles lazy state and allocator
    pools outside the capture), then capture one call. Returns the graph and what the captured call
    returned (tensors in the graph's memory, refreshed by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def graph_time(fn: Callable[[], Any], rep: int = 100, warmup: int = 25) -> float:
    """Median GPU time (us) of ``fn`` captured in a CUDA graph: ``do_bench`` flushes L2 before every replay,
    and graph replay keeps the Python launch overhead out of the kernel time."""
    from triton.testing import do_bench

    graph, _ = capture(fn)
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3


def kernel_time(fn: Callable[[], Any], rep: int = 50) -> float:
    """Mean device time (us) of the kernels of one call of ``fn`` captured in a CUDA graph, summed, as the
    profiler (CUPTI) records them, L2 flushed before every replay: the GPU's own time, without what a replay's
    timing adds (~5 us for an empty graph on an H100)."""
    from torch.profiler import ProfilerActivity, profile

    graph, _ = capture(fn)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rep):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and "FillFunctor" not in e.key:
            total += getattr(e, "device_time_total", None) or e.cuda_time_total
    return total / rep
