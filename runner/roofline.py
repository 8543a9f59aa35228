"""The two ceilings every benchmark divides by, measured in the same run: copy bandwidth and matmul rate."""
from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass

import torch


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written per second
    matmul_tflops: float  # bf16 matmul on a GPU, fp32 on a CPU
    device: str


@functools.lru_cache(maxsize=None)
def measure_ceilings(device: torch.device) -> Ceilings:
    """Measured once per device and process: the jobs of a multirun share one measurement."""
    if device.type == "cuda":
        from kernels.bench import measure_ceilings as measure_gpu

        d = measure_gpu()
        return Ceilings(d["copy_GBps"], d["matmul_bf16_TFLOPs"], d["device"])
    return _measure_cpu()


def _measure_cpu(reps: int = 5) -> Ceilings:
    a = torch.empty(1 << 27, dtype=torch.uint8)
    b = torch.empty_like(a)
    copy_s = _best(lambda: b.copy_(a), reps)
    x = torch.randn(1024, 1024)
    mm_s = _best(lambda: x @ x, reps)
    return Ceilings(2 * a.numel() / copy_s / 1e9, 2 * 1024**3 / mm_s / 1e12, platform.processor() or "cpu")


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
