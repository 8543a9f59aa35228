"""What an attention backend is: the attention it serves, what it declares it supports, and its calls.

A backend is one choice of ``attention=`` (and, for ``triton``, of ``metadata=``). It serves both forms of MLA
attention: ``forward``, the absorbed form of decode, and ``prefill``, the non-absorbed form of prompt chunks. It owns
the absorbed form's metadata: the model runner hands it the step's lengths and block table (``StepInputs``) once per
step, ``build_metadata`` turns them into whatever its kernel reads, and every MLA layer then calls ``forward`` with
that same object (the prompt chunks' metadata is the same for every backend: ``mla_runner.attention.prefill``).
What it can run is declared once, in ``capabilities``: the engine reads it to decide on CUDA graphs, and config
validation reads it to refuse a run before any weights load.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionSpec:
    """The attention a backend serves on this rank, and the sizes its fixed buffers are allocated for."""

    num_heads: int  # this rank's query heads
    kv_lora_rank: int  # latent width: the values, and the first part of every cached vector
    rope_dim: int  # the rotary part of every cached vector
    page_size: int
    dtype: torch.dtype  # of q and the output, and of the cache where kv_cache_dtype is auto
    device: torch.device
    max_batch: int = 1  # requests in one step
    max_pages_per_seq: int = 1  # block-table width
    max_q_len: int = 1  # query tokens of one request in one step
    kv_cache_dtype: str = "auto"  # the cache's layout (mla_runner.kernels.kv_cache): auto, fp8 or fp8_ds_mla


@dataclass(frozen=True)
class Capabilities:
    """What a backend runs. ``None`` in a tuple field means any value."""

    graph_forward: bool  # forward can be captured in a CUDA graph: no host sync, no allocation outside the pool
    graph_metadata: bool  # build_metadata can be captured: on the device, into buffers allocated once
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    page_sizes: tuple[int, ...] | None = None
    head_counts: tuple[int, ...] | None = None
    kv_lora_ranks: tuple[int, ...] | None = None
    rope_dims: tuple[int, ...] | None = None
    varlen_q: bool = True  # requests of one step may have different q_len (False: one q_len for all of them)
    kv_cache_dtypes: tuple[str, ...] | None = None  # the cache layouts forward reads (kernels.kv_cache)
    # build_chunk_metadata serves prompt chunks of up to ABSORBED_MAX_Q_LEN tokens in the absorbed form (eager steps)
    absorbed_chunks: bool = False

    @property
    def cuda_graphs(self) -> bool:
        """Whether a decode step through this backend (metadata and every layer) can be captured."""
        return self.graph_forward and self.graph_metadata

    def unmet(self, *, device: str | None = None, dtype: torch.dtype | None = None, page_size: int | None = None,
              num_heads: int | None = None, kv_lora_rank: int | None = None, rope_dim: int | None = None,
              kv_cache_dtype: str | None = None) -> list[str]:
        """The requirements the given settings miss, each as "what it needs (here: the value)". A setting left at
        None is not checked: config validation knows some of them before the model's config.json is read."""
        checks = (
            (device, self.devices, "device={}"),
            (dtype, self.dtypes, "{}"),
            (page_size, self.page_sizes, "page_size={}"),
            (num_heads, self.head_counts, "{} heads"),
            (kv_lora_rank, self.kv_lora_ranks, "kv_lora_rank={}"),
            (rope_dim, self.rope_dims, "qk_rope_head_dim={}"),
            (kv_cache_dtype, self.kv_cache_dtypes, "kv_cache_dtype={}"),
        )
        out = []
        for value, allowed, form in checks:
            if value is not None and allowed is not None and value not in allowed:
                out.append(f"{form.format(_one_of([_name(a) for a in allowed]))} (here {_name(value)})")
        return out


def _name(value) -> str:
    return str(value).removeprefix("torch.")


def _one_of(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" or {items[-1]}"


@dataclass
class StepInputs:
    """One step's requests as the model runner hands them to ``build_metadata``: device tensors (in a captured step,
    views of the runner's persistent buffers) and, in eager steps, the same lengths as host lists."""

    seq_lens: torch.Tensor  # [B] int32: KV length of each request including this step's tokens (0: padding slot)
    qo_indptr: torch.Tensor  # [B + 1] int32: offsets of each request's query tokens among the step's T tokens
    block_table: torch.Tensor  # [B, max_pages] int32: page ids of each request
    q_len: int = 1  # the largest q_len of the step (every request's, for a backend without varlen_q)
    seq_lens_host: list[int] | None = None  # eager steps only: what host-built metadata reads
    q_lens_host: list[int] | None = None


class AttentionBackend(ABC):
    """Absorbed MLA attention over a paged latent cache (``mla_runner.models.context.AttentionBackend`` is the part
    the model calls). Subclasses set ``name`` and ``capabilities`` and take only their own options."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    strategy: ClassVar[str | None] = None  # the metadata strategy it implements, where the choice is the user's

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @classmethod
    def label(cls) -> str:
        """The choice as the command line writes it: ``attention=triton metadata=persistent``, ``attention=torch``."""
        return f"attention={cls.name}" + (f" metadata={cls.strategy}" if cls.strategy else "")

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (a package missing, the wrong GPU), in one sentence that says
        what to do; None when it can. Checked before any weights load."""
        return None

    @abstractmethod
    def build_metadata(self, inputs: StepInputs) -> Any:
        """The step's metadata, once per step, read by every layer. A backend with ``capabilities.graph_metadata``
        builds it on the device into buffers allocated once, without synchronizing, so it is captured with the
        step."""

    @abstractmethod
    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, H, kv_lora_rank + rope_dim] (the absorbed query) against one layer's cache [pages, page_size,
        width] -> [T, H, kv_lora_rank] in q's dtype. The cache's layout is read from its dtype
        (``kernels.kv_cache.layout_of``: q's dtype, or an FP8 layout, which ``capabilities.kv_cache_dtypes`` lists);
        ``kv_scale``: the ``fp8`` layout's [1] float32 per-tensor scale, else None."""

    def build_chunk_metadata(self, inputs: StepInputs) -> Any:
        """Metadata with which ``forward`` attends a step's short prompt chunks in absorbed form (q_len up to
        ``mla_runner.attention.prefill.ABSORBED_MAX_Q_LEN``, each causal over its own tokens after its cached ones),
        for a backend that declares ``absorbed_chunks``; eager steps only (host lengths given)."""
        raise NotImplementedError(f"{self.label()} does not run prompt chunks in absorbed form")

    def prefill(self, q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_q_len: int, sm_scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-absorbed attention of a step's prompt chunks (``mla_runner.models.context.AttentionBackend`` says
        what it takes): this project's Triton prefill kernel, whichever backend runs decode, except torch's."""
        from mla_runner.kernels.mla_prefill import mla_prefill_attention

        return mla_prefill_attention(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, max_q_len, sm_scale,
                                     causal=causal)

    def check(self) -> None:  # noqa: B027 - a hook: a backend without device-side checks keeps this one
        """Raise if a step since the last call found a request it could not serve on the device (the persistent
        plan drops out-of-bounds requests without a host sync). Called after the step's results reached the host."""
