"""``attention=aiter``: AMD's aiter MLA decode (``aiter.mla.mla_decode_fwd``) on ROCm GPUs.

aiter reads the cache through per-token indices: the cache is viewed as pages of one token, and the metadata is
``kv_indptr`` (the prefix sum of the lengths) and ``kv_indices`` (every token's flat slot), built on the device by
``mla_runner.kernels.plan_kernels.build_kv_indices`` into buffers sized once, plus ``kv_last_page_lens`` (all 1) and
the query offsets. Not run on AMD hardware by this project yet: the metadata is checked against the reference through
a stand-in of aiter's documented call (tests/runner/attention/test_backends.py); graphs stay off. A cache in the model
dtype only (``kv_cache_dtype=auto``).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from mla_runner.attention.base import AttentionBackend, AttentionSpec, Capabilities, StepInputs
from mla_runner.kernels.plan_kernels import build_kv_indices

log = logging.getLogger(__name__)


@dataclass
class AiterMetadata:
    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32: prefix sum of the lengths
    kv_indices: torch.Tensor  # [>= sum of lengths] int32: flat cache slot of every token, request after request
    kv_last_page_lens: torch.Tensor  # [B] int32: all 1 (pages of one token)
    max_q_len: int


class AiterBackend(AttentionBackend):
    name = "aiter"
    # forward allocates its output and aiter its split buffers per call
    capabilities = Capabilities(graph_forward=False, graph_metadata=True, devices=("cuda",), dtypes=(torch.bfloat16,),
                                kv_lora_ranks=(512,), rope_dims=(64,), kv_cache_dtypes=("auto",))

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        if importlib.util.find_spec("aiter") is None:
            return ("attention=aiter needs AMD's aiter package on a ROCm GPU; use attention=triton, which runs on AMD "
                    "GPUs too")
        if device.type != "cuda" or not torch.version.hip:
            return "attention=aiter needs a ROCm GPU (device=cuda on a ROCm build of torch); use attention=triton"
        return None

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        i32 = dict(dtype=torch.int32, device=spec.device)
        self.kv_indptr = torch.zeros(spec.max_batch + 1, **i32)
        self.kv_indices = torch.zeros(spec.max_batch * spec.max_pages_per_seq * spec.page_size, **i32)
        self.kv_last_page_lens = torch.ones(spec.max_batch, **i32)
        if spec.device.type == "cuda":
            log.warning("attention=aiter: not validated on AMD hardware by this project yet")

    def build_metadata(self, inputs: StepInputs) -> AiterMetadata:
        B = inputs.seq_lens.shape[0]
        kv_indptr = self.kv_indptr[: B + 1]
        torch.cumsum(inputs.seq_lens, 0, dtype=torch.int32, out=kv_indptr[1:])
        build_kv_indices(inputs.seq_lens, kv_indptr, inputs.block_table, self.spec.page_size, self.kv_indices)
        return AiterMetadata(inputs.qo_indptr, kv_indptr, self.kv_indices, self.kv_last_page_lens[:B], inputs.q_len)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: AiterMetadata, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        from aiter.mla import mla_decode_fwd

        T, H, D = q.shape
        out = torch.empty(T, H, self.spec.kv_lora_rank, dtype=q.dtype, device=q.device)
        mla_decode_fwd(q, kv_cache.view(-1, 1, 1, D), out, metadata.qo_indptr, metadata.kv_indptr,
                       metadata.kv_indices, metadata.kv_last_page_lens, metadata.max_q_len, sm_scale=sm_scale)
        return out
