"""Attention backends: one per choice, each building its own per-step metadata and declaring what it supports.

| choice | metadata it builds per step | CUDA graphs | runs on | ``kv_cache_dtype`` |
|---|---|---|---|---|
| ``attention=torch`` | lengths and block table (what the reference reads) | no | CPU, GPU | all |
| ``attention=triton metadata=persistent`` | the work plan, on the device, fixed buffers | yes | GPU, CPU | all |
| ``attention=triton metadata=per_step`` | the work plan, on the host, copied in | no | GPU, CPU | all |
| ``attention=flashmla`` | FlashMLA's schedule, on the device | yes | Hopper | auto |
| ``attention=aiter`` | per-token kv indices, on the device | no | ROCm | auto |

``attention=auto`` (the default) is ``triton`` on a GPU and ``torch`` on a CPU (``resolve_name``); an explicit
``attention=triton`` on a CPU runs the kernels under Triton's interpreter. ``metadata=`` picks the strategy of
``attention=triton``; the other backends build their own metadata and leave it
unused. The engine asks the backend (``capabilities``) rather than testing names, and config validation
(``check_choice``) reads the same declarations, so a run that cannot work stops before any weights load.
"""
from __future__ import annotations

import torch

from mla_runner.attention.aiter_backend import AiterBackend
from mla_runner.attention.base import AttentionBackend, AttentionSpec, Capabilities, StepInputs
from mla_runner.attention.flashmla_backend import FlashMLABackend
from mla_runner.attention.torch_backend import TorchBackend
from mla_runner.attention.triton_backend import TritonPersistentBackend, TritonPerStepBackend
from mla_runner.errors import ConfigError

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchBackend, "triton": TritonPersistentBackend, "flashmla": FlashMLABackend, "aiter": AiterBackend}
TRITON_STRATEGIES: dict[str, type[AttentionBackend]] = {
    "persistent": TritonPersistentBackend, "per_step": TritonPerStepBackend}

CHOICES = ("auto", *BACKENDS)

__all__ = ["AttentionBackend", "AttentionSpec", "Capabilities", "StepInputs", "BACKENDS", "CHOICES",
           "TRITON_STRATEGIES", "backend_class", "check_choice", "make_backend", "resolve_name"]


def resolve_name(name: str, device: str) -> str:
    """The backend ``attention=name`` runs on ``device`` ("cuda" or "cpu"): ``auto`` is triton on a GPU, torch on a
    CPU; any other name is itself."""
    if name != "auto":
        return name
    return "triton" if device == "cuda" else "torch"


def backend_class(name: str, strategy: str) -> type[AttentionBackend]:
    """The backend of ``attention=name`` (``metadata=strategy`` for triton)."""
    if name not in BACKENDS:
        raise ConfigError(f"attention={name!r} is not valid: choose one of {', '.join(BACKENDS)}")
    if name != "triton":
        return BACKENDS[name]
    if strategy not in TRITON_STRATEGIES:
        raise ConfigError(f"metadata={strategy!r} is not valid: choose one of {', '.join(TRITON_STRATEGIES)}")
    return TRITON_STRATEGIES[strategy]


def check_choice(name: str, strategy: str, *, cuda_graphs: bool | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, page_size: int | None = None, num_heads: int | None = None,
                 kv_lora_rank: int | None = None, rope_dim: int | None = None, kv_cache_dtype: str | None = None
                 ) -> type[AttentionBackend] | None:
    """The backend class of this choice, or a one-line ``ConfigError`` naming what it does not support. Settings left
    at None are not checked (at config time the model's heads and the resolved device may be unknown); ``auto`` with
    the device unknown checks only what holds for both of its choices (None returned)."""
    if name == "auto":
        if device is None:
            if strategy not in TRITON_STRATEGIES:
                backend_class("triton", strategy)  # the metadata choice is still checked
            if cuda_graphs and not TRITON_STRATEGIES[strategy].capabilities.cuda_graphs:
                check_choice("triton", strategy, cuda_graphs=True)
            return None
        name = resolve_name(name, device)
    cls = backend_class(name, strategy)
    unmet = cls.capabilities.unmet(device=device, dtype=dtype, page_size=page_size, num_heads=num_heads,
                                   kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, kv_cache_dtype=kv_cache_dtype)
    if unmet:
        other = "attention=torch" if name == "triton" else "attention=triton"
        raise ConfigError(f"attention={name} needs {' and '.join(unmet)}; use {other}")
    if cuda_graphs and not cls.capabilities.cuda_graphs:
        every = [*TRITON_STRATEGIES.values(), *(c for n, c in BACKENDS.items() if n != "triton")]
        capturable = " or ".join(c.label() for c in every if c.capabilities.cuda_graphs)
        raise ConfigError(f"cuda_graphs=true needs a backend whose step can be captured ({capturable}): "
                          f"{cls.label()} builds its metadata or reads lengths on the host")
    if cuda_graphs and device == "cpu":
        raise ConfigError("cuda_graphs=true needs device=cuda")
    return cls


def make_backend(name: str, strategy: str, spec: AttentionSpec, *, num_kv_splits: int | None = None,
                 dram_ratio: int | None = None) -> AttentionBackend:
    """The backend of this choice for ``spec``; a one-line ``ConfigError``, before any work, where it cannot run.
    ``num_kv_splits`` and ``dram_ratio`` are the metadata options of ``attention=triton`` (see MetadataConfig)."""
    name = resolve_name(name, spec.device.type)
    cls = backend_class(name, strategy)
    reason = cls.unavailable(spec.device)
    if reason is not None:
        raise ConfigError(reason)
    check_choice(name, strategy, device=spec.device.type, dtype=spec.dtype, page_size=spec.page_size,
                 num_heads=spec.num_heads, kv_lora_rank=spec.kv_lora_rank, rope_dim=spec.rope_dim,
                 kv_cache_dtype=spec.kv_cache_dtype)
    if cls is TritonPersistentBackend:
        return cls(spec, max_kv_splits=num_kv_splits, dram_ratio=dram_ratio)
    if cls is TritonPerStepBackend:
        return cls(spec, **({} if num_kv_splits is None else {"num_kv_splits": num_kv_splits}))
    return cls(spec)
