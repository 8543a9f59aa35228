"""Tolerances of the kernel tests and the error measure they compare against."""
from __future__ import annotations

import torch

# Tolerance on ||out - ref|| / ||ref|| per dtype (fp32: ieee dots; bf16/fp16: p and the output rounded).
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def plan_reference(builder, seq_lens: list[int], q_lens: list[int]) -> dict:
    """``mla_runner.kernels.reference.persistent_plan_reference`` with a ``PersistentMetadataBuilder``'s parameters."""
    from mla_runner.kernels.reference import persistent_plan_reference

    b = builder
    return persistent_plan_reference(seq_lens, q_lens, b.num_parts, b.plan_block, b.overhead, b.min_chunk,
                                     b.snap_div, b.snap_max, b.max_kv_splits, b.split_cost, b.tiles, b.cut_ratio,
                                     b.dram_ratio, b.slack_div)


def build_metadata(strategy: str, seq_lens: torch.Tensor, qo_indptr: torch.Tensor, block_table: torch.Tensor,
                   seq_lens_host: list[int], q_lens_host: list[int], **builder_kw):
    """(builder, one step's MLAMetadata) from the builder of ``strategy`` ("persistent" reads the device tensors,
    "per_step" the host lists)."""
    from mla_runner.kernels.metadata import PersistentMetadataBuilder, PerStepMetadataBuilder

    if strategy == "persistent":
        builder = PersistentMetadataBuilder(**builder_kw)
        return builder, builder.build(seq_lens, qo_indptr, block_table)
    builder = PerStepMetadataBuilder(**builder_kw)
    return builder, builder.build(seq_lens, qo_indptr, block_table, seq_lens_host, q_lens_host)
