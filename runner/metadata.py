"""The metadata strategy of the config, bound to the engine's sizes (see kernels/metadata.py)."""
from __future__ import annotations

import torch

from runner.attention import prepare_triton
from runner.config import MetadataConfig


def make_metadata_builder(cfg: MetadataConfig, *, num_heads: int, max_batch: int, max_pages_per_seq: int,
                          page_size: int, kv_lora_rank: int, rope_dim: int, device: torch.device, max_q_len: int = 1):
    if cfg.strategy == "persistent":
        prepare_triton(device)  # its buffers are filled by Triton kernels
    from kernels.metadata import make_metadata_builder as make

    return make(
        cfg.strategy,
        num_heads=num_heads,
        max_batch=max_batch,
        max_q_len=max_q_len,
        max_pages_per_seq=max_pages_per_seq,
        page_size=page_size,
        device=device,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
        max_kv_splits=cfg.num_kv_splits,
        dram_ratio=cfg.dram_ratio,
    )
