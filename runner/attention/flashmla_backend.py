"""``attention=flashmla``: FlashMLA's dense MLA decode (``mla_runner.kernels.flashmla``, from ``pip install
sgl-flash-mla``). Its metadata is FlashMLA's own split-KV schedule, computed on the GPU once per step from the lengths
(no sync: captured with the step). Hopper only, page size 64, bf16, one q_len for every request of a step. A bf16
cache, or ``kv_cache_dtype=fp8`` through the community FP8 kernel that vLLM's wheel carries (``flashmla.fp8_library``:
an installed vllm, or ``$MLA_RUNNER_FLASHMLA_FP8``): FP8 query and cache, per-tensor scales."""
from __future__ import annotations

import torch

from mla_runner.attention.base import AttentionBackend, AttentionSpec, Capabilities, StepInputs
from mla_runner.errors import ConfigError
from mla_runner.kernels import flashmla


class FlashMLABackend(AttentionBackend):
    name = "flashmla"
    capabilities = Capabilities(graph_forward=True, graph_metadata=True, devices=("cuda",), dtypes=(torch.bfloat16,),
                                page_sizes=(flashmla.PAGE_SIZE,), head_counts=flashmla.HEAD_COUNTS,
                                kv_lora_ranks=(512,), rope_dims=(64,), varlen_q=False,
                                kv_cache_dtypes=("auto", "fp8"))

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self.fp8 = spec.kv_cache_dtype == "fp8"
        if self.fp8:
            try:
                flashmla.fp8_ops()
            except RuntimeError as e:
                raise ConfigError(f"attention=flashmla with kv_cache_dtype=fp8 {e}; or use attention=triton") from None

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        reason = flashmla.unavailable_reason(device)
        return None if reason is None else f"attention=flashmla {reason}; use attention=triton"

    def build_metadata(self, inputs: StepInputs) -> flashmla.FlashMLAPlan:
        plan = flashmla.plan_fp8 if self.fp8 else flashmla.plan
        return plan(inputs.seq_lens, inputs.block_table, inputs.q_len, self.spec.num_heads)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: flashmla.FlashMLAPlan, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp8:
            return flashmla.flashmla_decode_fp8(q, kv_cache, metadata, sm_scale, kv_scale, self.spec.kv_lora_rank)
        return flashmla.flashmla_decode(q, kv_cache, metadata, sm_scale, self.spec.kv_lora_rank)
