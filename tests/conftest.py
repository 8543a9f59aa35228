"""Shared fixtures: tiny checkpoints of both flavours in the real format, and the transformers oracle on them.

- ``dsv3_ckpt``: DeepSeek-V3 flavour, DeepSeek shard names (``model-00001-of-000003``), with its MTP layer.
- ``kimi_ckpt``: Kimi-K2 flavour (``model_type: kimi_k2``), Kimi shard names (``model-1-of-3``), with
  ``rotary_emb.inv_freq`` tensors, bos/eos at the end of the vocabulary.
- ``dsv3_oracle`` / ``kimi_oracle``: transformers' DeepseekV3ForCausalLM (fp32) on a dequantized copy.
- ``dsv3_model`` / ``kimi_model``: ours, fp32 on CPU, loaded from the FP8 checkpoint.

GPU-only tests carry ``@pytest.mark.gpu`` (``gpu(count=2)`` for two GPUs): skipped where fewer CUDA GPUs are
visible. Without a GPU, ``import mla_runner`` (the first import here) has switched Triton's interpreter on.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mla_runner.models.loader import load_model
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG
from mla_runner.models.tiny import make_tiny_checkpoint
from mla_testing.oracle import load_oracle

# Under pytest-xdist (the README's command runs one worker per core, up to 4) each worker gets its share of the cores:
# torch's default of one thread per core in every worker oversubscribes them, and small ops then wait on each other
# (a 6 s test took 97 s with two workers of two threads on two cores). Subprocesses inherit the share.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        need = marker.kwargs.get("count", 1) if marker is not None else 0
        if gpus < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU{'s' if need > 1 else ''}"))


@pytest.fixture(scope="session")
def dsv3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-dsv3")
    return make_tiny_checkpoint(out, TINY_DEEPSEEK_V3_CONFIG, seed=0, shard_style="deepseek", mtp=True)


@pytest.fixture(scope="session")
def kimi_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-kimi")
    return make_tiny_checkpoint(out, TINY_KIMI_K2_CONFIG, seed=1, shard_style="kimi", inv_freq=True)


@pytest.fixture(scope="session")
def dsv3_oracle(dsv3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return load_oracle(dsv3_ckpt, tmp_path_factory.mktemp("oracle-dsv3"))


@pytest.fixture(scope="session")
def kimi_oracle(kimi_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return load_oracle(kimi_ckpt, tmp_path_factory.mktemp("oracle-kimi"))


@pytest.fixture(scope="session")
def dsv3_model(dsv3_ckpt: Path) -> torch.nn.Module:
    return load_model(dsv3_ckpt, dtype=torch.float32, device="cpu", progress=False)


@pytest.fixture(scope="session")
def kimi_model(kimi_ckpt: Path) -> torch.nn.Module:
    return load_model(kimi_ckpt, dtype=torch.float32, device="cpu", progress=False)
