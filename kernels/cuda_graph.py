"""CUDA-graph capture with a warm-up, and the graph-replay timing every benchmark here uses."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

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


# How L2 is emptied before every timed replay (``graph_time``): "write" is triton.testing.do_bench's flush (zero a
# 256 MB buffer), which leaves L2 full of dirty lines that the first reads must write back to DRAM; "read" reads a
# 256 MB buffer, which leaves it full of clean lines (as a layer's weight GEMMs do before its attention).
FLUSHES = ("write", "read")
_FLUSH_BYTES = 256 << 20


def graph_time(fn: Callable[[], Any], rep: int = 100, warmup: int = 25, flush: str = "write") -> float:
    """Median GPU time (us) of ``fn`` captured in a CUDA graph, L2 flushed before every replay (``flush``, one of
    FLUSHES), ``warmup`` and ``rep`` in ms as for ``do_bench``; graph replay keeps the Python launch overhead out of
    the kernel time."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    from triton.testing import do_bench

    graph, _ = capture(fn)
    if flush == "write":
        return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3
    return _read_flushed_time(graph.replay, rep, warmup)


def _read_flushed_time(replay: Callable[[], Any], rep: int, warmup: int) -> float:
    """do_bench's loop (repetitions from a first estimate, one pair of events a replay), with a read flush."""
    buf = torch.ones(_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    sink = torch.empty((), dtype=torch.float32, device="cuda")

    def timed(n: int) -> list[float]:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in ev:
            torch.sum(buf, dim=0, out=sink)
            start.record()
            replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in ev]

    est = max(sum(timed(5)) / 5, 1e-3)  # ms, the replay alone
    flush_ms = _FLUSH_BYTES / 2e9  # the flush's own time at 2 TB/s, for the repetition count
    timed(max(1, int(warmup / (est + flush_ms))))
    return statistics.median(timed(max(1, int(rep / (est + flush_ms))))) * 1e3


def kernel_time(fn: Callable[[], Any], rep: int = 50) -> float:
    """Mean device time (us) of the kernels of one call of ``fn`` captured in a CUDA graph, summed, as the
    profiler (CUPTI) records them, L2 flushed before every replay: the GPU's own time, without what a replay's
    timing adds (~5 us for an empty graph on an H100)."""
    from torch.profiler import ProfilerActivity, profile

    graph, _ = capture(fn)
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
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
