"""Config composition: every option of every group composes into typed dataclasses; bad values fail with one
line naming the field."""
from __future__ import annotations

import pytest

from mla_runner.compose import CONF_DIR, compose_config, override
from mla_runner.config import (
    AttentionConfig,
    BenchTaskConfig,
    GenerateTaskConfig,
    MetadataConfig,
    ModelConfig,
    RunConfig,
)
from mla_runner.errors import ConfigError

GROUP_TYPES = {"model": ModelConfig, "attention": AttentionConfig, "metadata": MetadataConfig, "task": None}
TASK_TYPES = {"generate": GenerateTaskConfig, "bench": BenchTaskConfig}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_its_documented_options():
    assert options("model") == ["deepseek_v3", "kimi_k2", "tiny_deepseek_v3", "tiny_kimi_k2"]
    assert options("attention") == ["aiter", "auto", "flashmla", "torch", "triton"]
    assert options("metadata") == ["per_step", "persistent"]
    assert options("task") == ["bench", "generate"]
    assert options("sweep") == ["backends", "decode_grid", "metadata_grid"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUP_TYPES for o in options(g)])
def test_every_option_composes_to_its_schema(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    node = getattr(cfg, group)
    assert type(node) is (GROUP_TYPES[group] or TASK_TYPES[option])
    key = {"model": "name", "attention": "name", "metadata": "strategy", "task": "name"}[group]
    assert getattr(node, key) == option


def test_defaults():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.attention.name, cfg.metadata.strategy, cfg.task.name) == (
        "tiny_deepseek_v3", "auto", "persistent", "generate")
    assert (cfg.max_num_batched_tokens, cfg.enable_chunked_prefill, cfg.enable_prefix_caching) == (8192, True, True)
    assert cfg.model.path is None and cfg.dtype == "auto" and cfg.device == "auto"
    assert compose_config(["metadata=per_step"]).metadata.num_kv_splits == 4
    assert compose_config([]).metadata.dram_ratio is None  # the device's own
    assert compose_config(["metadata.dram_ratio=0"]).metadata.dram_ratio == 0


def test_overrides_reach_the_dataclasses():
    cfg = compose_config(["model=kimi_k2", "model.path=/ckpt", "attention=triton", "dtype=float32",
                          "device=cpu", "max_batch_size=3", "task.max_tokens=5", "task.chat=true"])
    assert cfg.model.path == "/ckpt" and not cfg.model.trust_remote_code  # checkpoint code runs only when asked
    assert (cfg.attention.name, cfg.dtype, cfg.device, cfg.max_batch_size) == ("triton", "float32", "cpu", 3)
    assert cfg.task.max_tokens == 5 and cfg.task.chat is True


@pytest.mark.parametrize("overrides,field", [
    (["dtype=bf16"], "dtype"),
    (["device=tpu"], "device"),
    (["max_batch_size=0"], "max_batch_size"),
    (["max_model_len=-1"], "max_model_len"),
    (["max_batch_size=many"], "max_batch_size"),
    (["attention.name=flash"], "attention.name"),
    (["metadata.strategy=eager"], "metadata.strategy"),
    (["metadata.num_kv_splits=0"], "metadata.num_kv_splits"),
    (["metadata.dram_ratio=-1"], "metadata.dram_ratio"),
    (["task.top_p=1.5"], "task.top_p"),
    (["task.temperature=-1"], "task.temperature"),
    (["model.num_layers=0"], "model.num_layers"),
    (["kv_cache_memory_fraction=1.5"], "kv_cache_memory_fraction"),
    (["task=bench", "task.mode=train"], "task.mode"),
    (["task=bench", "task.batch=0"], "task.batch"),
    (["attention=flash"], "attention"),
    (["max_num_batched_tokens=0"], "max_num_batched_tokens"),
    (["max_num_batched_tokens=16", "max_batch_size=32"], "max_num_batched_tokens"),
    (["enable_chunked_prefill=false", "max_num_batched_tokens=2048"], "enable_chunked_prefill"),
    (["attention=auto", "metadata=per_step", "cuda_graphs=true"], "cuda_graphs"),
    (["task=bench", "task.output_len=0"], "task.output_len"),
    (["max_batch=4"], "max_batch"),
])
def test_bad_values_fail_with_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert "\n" not in message
    assert field in message


def test_python_keyword_overrides():
    assert override("attention", "triton") == "attention=triton"
    assert override("dtype", "float32") == "dtype='float32'"
    assert override("max_batch_size", 8) == "max_batch_size=8"
    assert override("progress", False) == "progress=false"
    assert override("model.num_layers", None) == "model.num_layers=null"
    path = "/tmp/odd dir/it's"
    assert compose_config([override("model.path", path)]).model.path == path
    with pytest.raises(ConfigError, match="only strings"):
        override("dtype", [1])


@pytest.mark.parametrize("preset,mode", [("decode_grid", "kernel"), ("metadata_grid", "metadata")])
def test_bench_sweep_presets_select_the_bench_task(preset, mode):
    cfg = compose_config([f"+sweep={preset}"])
    assert isinstance(cfg.task, BenchTaskConfig) and cfg.task.mode == mode
