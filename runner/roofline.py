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


@functools.cache
def measure_ceilings(device: torch.device) -> Ceilings:
    """Measured once per device and process: the jobs of a multirun share one measurement."""
    if device.type == "cuda":
        return _measure_gpu(device)
    return _measure_cpu()


def _measure_gpu(device: torch.device) -> Ceilings:
    """A 1 GiB device-to-device copy (GB/s of bytes read + written) and a bf16 8192^3 matmul (TFLOP/s), medians of
    ``triton.testing.do_bench`` (L2 flushed before every call)."""
    with torch.cuda.device(device):
        return Ceilings(_copy_gbps(device), _matmul_tflops(device), torch.cuda.get_device_name(device))


def _copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _matmul_tflops(device: torch.device, n: int = 8192) -> float:
    from triton.testing import do_bench

    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


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
