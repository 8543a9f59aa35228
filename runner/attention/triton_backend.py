"""``attention=triton``: this project's split-KV MLA decode kernels (``mla_runner.kernels.mla_decode``: the Gluon
kernel on Hopper where it applies, the Triton kernel elsewhere, the merge of cut requests), with the work plan built
by the chosen metadata strategy:

- ``metadata=persistent``: ``PersistentMetadataBuilder``, buffers sized once and refilled on the device by one Triton
  kernel per step (no sync, no allocation): the step is captured in a CUDA graph with it. Steps of up to
  ``spec.max_q_len`` tokens a request (speculative verification) have a builder of their own.
- ``metadata=per_step``: ``PerStepMetadataBuilder``, the plan computed on the host from the step's host lengths and
  copied in (the baseline; eager).

Short prompt chunks (``build_chunk_metadata``, eager steps) run through the same kernels with a per-step plan of
their own, q_len up to ``ABSORBED_MAX_Q_LEN``: each chunk's KV cut into as many parts as fill the GPU twice over
with its row tiles.
"""
from __future__ import annotations

import importlib.util

import torch

from mla_runner.attention.base import AttentionBackend, AttentionSpec, Capabilities, StepInputs
from mla_runner.attention.prefill import ABSORBED_MAX_Q_LEN
from mla_runner.kernels.interpreter import interpreter_problem
from mla_runner.kernels.metadata import ROWS_PER_TILE, MLAMetadata, PersistentMetadataBuilder, PerStepMetadataBuilder
from mla_runner.kernels.mla_decode import mla_decode


class TritonBackend(AttentionBackend):
    """The kernels, shared by both strategies; a subclass builds the metadata."""

    name = "triton"

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "attention=triton needs the triton package: pip install triton (or use attention=torch)"
        return interpreter_problem(device)

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._chunk_builder: PerStepMetadataBuilder | None = None  # made by the first build_chunk_metadata

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: MLAMetadata, sm_scale: float,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        return mla_decode(q, kv_cache, metadata, sm_scale, kv_lora_rank=self.spec.kv_lora_rank, kv_scale=kv_scale)

    def build_chunk_metadata(self, inputs: StepInputs) -> MLAMetadata:
        if inputs.seq_lens_host is None or inputs.q_lens_host is None:
            raise ValueError("build_chunk_metadata builds its plan from host lengths: give seq_lens_host and "
                             "q_lens_host")
        s = self.spec
        if self._chunk_builder is None:
            self._chunk_builder = PerStepMetadataBuilder(**{**self._sizes(), "max_q_len": ABSORBED_MAX_Q_LEN})
        tiles = sum(-(-n * s.num_heads // ROWS_PER_TILE) for n in inputs.q_lens_host)
        sms = torch.cuda.get_device_properties(s.device).multi_processor_count if s.device.type == "cuda" else 4
        self._chunk_builder.num_kv_splits = max(1, min(16, -(-2 * sms // max(tiles, 1))))
        return self._chunk_builder.build(inputs.seq_lens, inputs.qo_indptr, inputs.block_table, inputs.seq_lens_host,
                                         inputs.q_lens_host)

    def _sizes(self) -> dict:
        s = self.spec
        return dict(num_heads=s.num_heads, max_batch=s.max_batch, max_q_len=s.max_q_len,
                    max_pages_per_seq=s.max_pages_per_seq, page_size=s.page_size, device=s.device,
                    kv_lora_rank=s.kv_lora_rank)


class TritonPersistentBackend(TritonBackend):
    strategy = "persistent"
    capabilities = Capabilities(graph_forward=True, graph_metadata=True, devices=("cuda", "cpu"), absorbed_chunks=True)

    def __init__(self, spec: AttentionSpec, max_kv_splits: int | None = None, dram_ratio: int | None = None):
        """``max_kv_splits``: a cap on the parts one request is cut into; ``dram_ratio``: the plan's DRAM floor (None:
        the device's, 0: none). See ``mla_runner.kernels.metadata``."""
        super().__init__(spec)
        options = dict(max_kv_splits=max_kv_splits, dram_ratio=dram_ratio)
        self.builder = PersistentMetadataBuilder(**{**self._sizes(), "max_q_len": 1}, **options)
        # steps with more than one token a request (speculative verification, spec.max_q_len > 1) plan with a builder
        # of their own: the decode step's plan keeps the parts it makes for one token a request
        self.multi_token_builder = (PersistentMetadataBuilder(**self._sizes(), **options) if spec.max_q_len > 1
                                    else None)

    def build_metadata(self, inputs: StepInputs) -> MLAMetadata:
        builder = self.builder if inputs.q_len == 1 else self.multi_token_builder
        if builder is None or inputs.q_len > self.spec.max_q_len:
            raise ValueError(f"a step of q_len {inputs.q_len} is over the max_q_len={self.spec.max_q_len} this "
                             "backend was made for")
        return builder.build(inputs.seq_lens, inputs.qo_indptr, inputs.block_table)

    def check(self) -> None:
        self.builder.check()
        if self.multi_token_builder is not None:
            self.multi_token_builder.check()


class TritonPerStepBackend(TritonBackend):
    strategy = "per_step"
    capabilities = Capabilities(graph_forward=True, graph_metadata=False, devices=("cuda", "cpu"),
                                absorbed_chunks=True)

    def __init__(self, spec: AttentionSpec, num_kv_splits: int = 4):
        """``num_kv_splits``: the parts every request is cut into (fewer for a request of fewer KV blocks)."""
        super().__init__(spec)
        self.builder = PerStepMetadataBuilder(**self._sizes(), num_kv_splits=num_kv_splits)

    def build_metadata(self, inputs: StepInputs) -> MLAMetadata:
        if inputs.seq_lens_host is None or inputs.q_lens_host is None:
            raise ValueError("metadata=per_step builds its plan from host lengths: the step must give seq_lens_host "
                             "and q_lens_host")
        return self.builder.build(inputs.seq_lens, inputs.qo_indptr, inputs.block_table, inputs.seq_lens_host,
                                  inputs.q_lens_host)
