"""What the model layers read about the current step.

The engine builds one ``ForwardContext`` per step and passes it down ``model.forward``; model code never
sees scheduling. Only the MLA layer reads it: it writes the step's latent vectors into its paged cache at
``slot_mapping``, then attends in two parts. The step's first tokens (one per request: decodes, and prompts down to
their last token) take the absorbed form through ``backend.forward`` with the step's shared ``attn_metadata``
(built once per step by the backend, read by every layer). The chunks of prompts after them (``prefill``) take the
non-absorbed form through ``backend.prefill``: causal attention over the chunk's own tokens, plus the tokens of
the request already in the cache (earlier chunks, a prefix-cache hit), gathered and up-projected in bounded chunks
and merged by log-sum-exp; or, short chunks after a long context, the absorbed form through ``backend.forward``
with metadata of their own (``prefill.absorbed``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch


class AttentionBackend(Protocol):
    """The two attention calls of an MLA layer.

    ``forward``, absorbed MLA over the paged latent cache:
    q:        [T, H, D] with D = kv_lora_rank + rope_dim (576 for the real models): the absorbed query
              (q_nope @ W_UK, then the rotated q_pe).
    kv_cache: [num_pages, page_size, D], one layer's latent cache; the first kv_lora_rank values of each
              vector are the (normalized) c_kv, the last rope_dim are the rotated k_pe. Values are c_kv. An FP8
              cache (``kernels.kv_cache``: e4m3 [.., D] with the per-tensor ``kv_scale`` [1], or the uint8
              fp8_ds_mla layout) is dequantized inside the kernel.
    returns:  [T, H, kv_lora_rank] in q's dtype.
    Query token i of request b (q_len_b tokens, KV length seq_len_b including them) sits at position
    seq_len_b - q_len_b + i and attends causally to KV positions 0 .. that position.

    ``prefill``, non-absorbed (MHA) attention over up-projected keys and values (``kernels.mla_prefill``):
    q [T, H, nope + rope], k_nope [S, H, nope], k_pe [S, rope] (shared by the heads), v [S, H, v] ->
    (out [T, H, v] in q's dtype, lse [T, H] fp32), request b's queries rows cu_q[b]:cu_q[b+1] against its keys
    rows cu_k[b]:cu_k[b+1]; causal: bottom-right aligned.
    """

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor: ...

    def prefill(self, q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_q_len: int, sm_scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ContextChunk:
    """A bounded slice of the cached context of the step's prompt chunks: for request b, the context tokens
    cu_seqlens_k[b]:cu_seqlens_k[b+1] of ``slots``."""

    slots: torch.Tensor  # [n] int64: flat cache slot (page * page_size + offset) of each token
    cu_seqlens_k: torch.Tensor  # [P + 1] int32


@dataclass
class PrefillMetadata:
    """The prompt chunks of a step: the last ``num_tokens`` tokens of the step, P requests."""

    num_tokens: int
    cu_seqlens_q: torch.Tensor  # [P + 1] int32, offsets among those tokens
    max_q_len: int
    context: list[ContextChunk] = field(default_factory=list)  # empty when no request has tokens in the cache
    # set: the chunks run in absorbed form, through backend.forward with this metadata (context then stays empty)
    absorbed: Any = None


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64, straight from the step's input buffer
    slot_mapping: torch.Tensor  # [T] int64: flat slot (page * page_size + offset) of each new token
    backend: AttentionBackend
    attn_metadata: Any  # the absorbed part's metadata, shared by every layer (None when that part is empty)
    prefill: Optional[PrefillMetadata] = None  # the step's prompt chunks (None: every token is absorbed)
