"""Attention backends: the same outputs through every available backend and metadata strategy, and a clear
one-sentence error at start-up for a backend that cannot run here."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kernels.reference import mla_attention_reference
from kernels.testing import REL_TOL, make_problem, rel_err
from runner.attention import make_backend
from runner.config import MetadataConfig
from runner.errors import ConfigError
from runner.metadata import make_metadata_builder

HAS_FLASHMLA = torch.cuda.is_available() and importlib.util.find_spec("flash_mla") is not None


@pytest.mark.parametrize("name", ["flashmla", "aiter"])
def test_unavailable_backend_fails_at_start_with_one_sentence(name):
    if name == "flashmla" and HAS_FLASHMLA:
        pytest.skip("FlashMLA is available here")
    with pytest.raises(ConfigError) as info:
        make_backend(name, torch.device("cpu"), 512, 128, 64)
    message = str(info.value)
    assert "\n" not in message and f"attention={name}" in message and "attention=triton" in message


def run_backend(name: str, strategy: str, problem, heads: int, device: torch.device) -> torch.Tensor:
    builder = make_metadata_builder(MetadataConfig(strategy=strategy, num_kv_splits=4 if strategy == "per_step" else None),
                                    num_heads=heads, max_batch=len(problem.seq_lens_host),
                                    max_pages_per_seq=problem.max_pages, page_size=problem.kv_cache.shape[1],
                                    kv_lora_rank=512, rope_dim=64, device=device)
    backend = make_backend(name, device, 512, heads, problem.kv_cache.shape[1])
    meta = builder.build(problem.seq_lens, problem.qo_indptr, problem.block_table, problem.seq_lens_host,
                         problem.q_lens_host)
    return backend.forward(problem.q, problem.kv_cache, backend.plan(meta, 1), 0.1352)


@pytest.mark.parametrize("dram_ratio", [None, 0, 120])
def test_metadata_config_reaches_the_builder(dram_ratio):
    # metadata.dram_ratio: unset takes the device's (the H100's off CUDA); 0 turns the plan's DRAM floor off
    from kernels.metadata import device_dram_ratio

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = device_dram_ratio(device) if dram_ratio is None else dram_ratio
    kw = dict(num_heads=64, max_batch=2, max_pages_per_seq=4, page_size=64, kv_lora_rank=512, rope_dim=64,
              device=device)
    builder = make_metadata_builder(MetadataConfig(strategy="persistent", num_kv_splits=3, dram_ratio=dram_ratio), **kw)
    assert (builder.dram_ratio, builder.max_kv_splits) == (want, 3)
    per_step = make_metadata_builder(MetadataConfig(strategy="per_step", num_kv_splits=3, dram_ratio=dram_ratio), **kw)
    assert per_step.num_kv_splits == 3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on a CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("strategy", ["persistent", "per_step"])
def test_backends_agree_on_cpu(strategy):
    lens = [1, 64, 200, 37]
    p = make_problem(lens, [1] * len(lens), 3, 64, dtype=torch.float32)
    ref = mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.1352, 512)
    for name in ("torch", "triton"):
        out = run_backend(name, strategy, p, 3, torch.device("cpu"))
        assert rel_err(out, ref) < REL_TOL[torch.float32], name


@pytest.mark.skipif(not HAS_FLASHMLA, reason="needs a Hopper GPU and flash_mla")
@pytest.mark.parametrize("heads", [64, 128])
@pytest.mark.parametrize("strategy", ["persistent", "per_step"])
def test_flashmla_matches_the_reference(heads, strategy):
    lens = [4000, 1, 129, 64, 1000]
    p = make_problem(lens, [1] * len(lens), heads, 64, dtype=torch.bfloat16, device="cuda")
    ref = mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.1352, 512)
    out = run_backend("flashmla", strategy, p, heads, torch.device("cuda"))
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
