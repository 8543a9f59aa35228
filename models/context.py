"""What the model layers read about the current step.

The engine builds one ``ForwardContext`` per step and passes it down ``model.forward``; model code never
sees scheduling. Only the MLA layer reads it: it writes the step's latent vectors into its paged cache at
``slot_mapping`` and hands the absorbed query to ``backend.forward`` together with the step's shared
``attn_metadata`` (built once per step by the metadata strategy, read by every layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class AttentionBackend(Protocol):
    """Absorbed MLA attention over a paged latent cache.

    q:        [T, H, D] with D = kv_lora_rank + rope_dim (576 for the real models): the absorbed query
              (q_nope @ W_UK, then the rotated q_pe).
    kv_cache: [num_pages, page_size, D], one layer's latent cache; the first kv_lora_rank values of each
              vector are the (normalized) c_kv, the last rope_dim are the rotated k_pe. Values are c_kv.
    returns:  [T, H, kv_lora_rank] in q's dtype.
    Query token i of request b (q_len_b tokens, KV length seq_len_b including them) sits at position
    seq_len_b - q_len_b + i and attends causally to KV positions 0 .. that position.
    """

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, sm_scale: float) -> torch.Tensor: ...


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64, straight from the step's input buffer
    slot_mapping: torch.Tensor  # [T] int64: flat slot (page * page_size + offset) of each new token
    backend: AttentionBackend
    attn_metadata: Any  # the step's metadata, shared by every layer
