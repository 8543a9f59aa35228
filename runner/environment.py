"""Where a result was measured: the device and the library versions, recorded next to every result.

A number without its hardware and software is not comparable, so every ``result.json`` carries this
dict and the sweep summary prints it above the table. Versions come from the installed distributions'
metadata rather than from importing the packages, so asking costs nothing even for triton or transformers.
"""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

# Distribution names as installed (what ``pip show`` takes), keyed by the name used in the result.
LIBRARIES = {"torch": "torch", "triton": "triton", "transformers": "transformers", "hydra_core": "hydra-core"}


def environment() -> dict:
    """The device name (the first CUDA GPU's, else the CPU model), GPU count, Python, CUDA and library versions."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = {
        "device_name": torch.cuda.get_device_name(0) if gpus else cpu_model(),
        "gpu_count": gpus,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    env.update({key: _version(dist) for key, dist in LIBRARIES.items()})
    return env


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
