"""``attention=torch``: plain PyTorch over the gathered pages (``mla_runner.kernels.reference``), the reference every
kernel is checked against (``mla_prefill_reference`` for prompt chunks); runs anywhere. Its metadata is what the
reference reads: lengths and the block table. An FP8 cache is dequantized request by request as gathered
(``kernels.kv_cache.dequantize_reference``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mla_runner.attention.base import AttentionBackend, Capabilities, StepInputs
from mla_runner.kernels.kv_cache import layout_of
from mla_runner.kernels.mla_prefill import mla_prefill_reference
from mla_runner.kernels.reference import mla_attention_reference


@dataclass
class TorchMetadata:
    qo_indptr: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_pages] int32


class TorchBackend(AttentionBackend):
    name = "torch"
    # forward reads the lengths on the host (a sync per layer), so a step cannot be captured
    capabilities = Capabilities(graph_forward=False, graph_metadata=True, devices=("cuda", "cpu"), absorbed_chunks=True)

    def build_metadata(self, inputs: StepInputs) -> TorchMetadata:
        return TorchMetadata(inputs.qo_indptr, inputs.seq_lens, inputs.block_table)

    def build_chunk_metadata(self, inputs: StepInputs) -> TorchMetadata:
        return self.build_metadata(inputs)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: TorchMetadata, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        layout = layout_of(kv_cache, self.spec.kv_lora_rank, self.spec.rope_dim)
        layout.check_scale(kv_scale, kv_cache.device)
        return mla_attention_reference(q, kv_cache, metadata.qo_indptr, metadata.seq_lens, metadata.block_table,
                                       sm_scale, self.spec.kv_lora_rank, kv_layout=layout, kv_scale=kv_scale)

    def prefill(self, q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_q_len: int, sm_scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_prefill_reference(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, max_q_len, sm_scale,
                                     causal=causal)
