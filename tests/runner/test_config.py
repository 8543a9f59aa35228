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
    SpeculativeConfig,
    check_speculative,
)
from mla_runner.errors import ConfigError

GROUP_TYPES = {"model": ModelConfig, "attention": AttentionConfig, "metadata": MetadataConfig,
               "speculative": SpeculativeConfig, "task": None}
TASK_TYPES = {"generate": GenerateTaskConfig, "bench": BenchTaskConfig}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_its_documented_options():
    assert options("model") == ["deepseek_v3", "kimi_k2", "tiny_deepseek_v3", "tiny_kimi_k2"]
    assert options("attention") == ["aiter", "auto", "flashmla", "torch", "triton"]
    assert options("metadata") == ["per_step", "persistent"]
    assert options("speculative") == ["mtp", "ngram", "none"]
    assert options("task") == ["bench", "generate"]
    assert options("sweep") == ["backends", "decode_grid", "metadata_grid"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUP_TYPES for o in options(g)])
def test_every_option_composes_to_its_schema(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    node = getattr(cfg, group)
    assert type(node) is (GROUP_TYPES[group] or TASK_TYPES[option])
    key = {"model": "name", "attention": "name", "metadata": "strategy", "speculative": "method", "task": "name"}[group]
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
    assert compose_config([]).speculative == SpeculativeConfig(method="none")


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
    (["speculative=eagle"], "speculative"),
    (["speculative.method=eagle"], "speculative.method"),
    (["speculative=mtp", "speculative.num_tokens=0"], "speculative.num_tokens"),
    (["speculative=mtp", "speculative.force_acceptance_length=2.5"], "speculative.force_acceptance_length"),
    (["speculative=mtp", "speculative.force_acceptance_length=0.9"], "speculative.force_acceptance_length"),
    (["speculative=ngram", "speculative.prompt_lookup_min=0"], "speculative.prompt_lookup_min"),
    (["speculative=ngram", "speculative.prompt_lookup_min=4", "speculative.prompt_lookup_max=2"],
     "speculative.prompt_lookup_min"),
    (["speculative=ngram", "speculative.draft_model=x"], "speculative.draft_model"),
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


def test_speculative_options_and_their_values():
    mtp = compose_config(["speculative=mtp", "speculative.num_tokens=3", "speculative.force_acceptance_length=2.5"])
    assert mtp.speculative == SpeculativeConfig(method="mtp", num_tokens=3, force_acceptance_length=2.5)
    assert compose_config(["speculative=mtp"]).speculative.num_tokens == 1
    ngram = compose_config(["speculative=ngram"]).speculative
    assert (ngram.num_tokens, ngram.prompt_lookup_min, ngram.prompt_lookup_max) == (3, 5, 5)  # vLLM's lookup defaults
    one = compose_config(["speculative=ngram", "speculative.prompt_lookup_max=3"]).speculative
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (3, 3)  # one given: the other equals it (vLLM)
    one = compose_config(["speculative=ngram", "speculative.prompt_lookup_min=2"]).speculative
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (2, 2)
    both = compose_config(["speculative=ngram", "speculative.prompt_lookup_min=2", "speculative.prompt_lookup_max=4"])
    assert (both.speculative.prompt_lookup_min, both.speculative.prompt_lookup_max) == (2, 4)
    # none ignores the rest, so that a sweep speculative=none,mtp compares the two with one set of values
    none = compose_config(["speculative=none", "speculative.num_tokens=3", "speculative.force_acceptance_length=4"])
    assert none.speculative.method == "none"
    assert compose_config(["speculative=mtp", "speculative.force_acceptance_length=1"]).speculative.num_tokens == 1
    assert compose_config([override("speculative", "ngram")]).speculative.method == "ngram"


def test_mtp_needs_a_model_with_an_mtp_layer():
    check_speculative(SpeculativeConfig(method="mtp"), has_mtp=True, model_name="deepseek_v3")
    check_speculative(SpeculativeConfig(method="ngram"), has_mtp=False, model_name="kimi_k2")
    check_speculative(SpeculativeConfig(), has_mtp=False, model_name="kimi_k2")
    with pytest.raises(ConfigError) as info:
        check_speculative(SpeculativeConfig(method="mtp"), has_mtp=False, model_name="kimi_k2")
    message = str(info.value)
    assert "\n" not in message and "speculative=mtp" in message and "kimi_k2" in message
    assert "speculative=ngram" in message


def test_kv_cache_dtype_options_and_their_errors():
    """kv_cache_dtype and kv_cache_scale compose from the command line; a bad value, an FP8 cache with float16 or with
    a backend that cannot read it is one line naming the field (and, for a backend, the one that can)."""
    assert (compose_config([]).kv_cache_dtype, compose_config([]).kv_cache_scale) == ("auto", 1.0)
    cfg = compose_config(["kv_cache_dtype=fp8", "kv_cache_scale=0.02", "attention=triton"])
    assert (cfg.kv_cache_dtype, cfg.kv_cache_scale) == ("fp8", 0.02)
    assert compose_config(["kv_cache_dtype=fp8_ds_mla", "dtype=bfloat16"]).kv_cache_dtype == "fp8_ds_mla"
    cases = [
        (["kv_cache_dtype=fp8_e5m2"], "kv_cache_dtype='fp8_e5m2' is not valid: choose one of auto, fp8, fp8_ds_mla"),
        (["kv_cache_scale=0"], "kv_cache_scale=0.0 is not valid: it must be a positive finite number"),
        (["kv_cache_scale=-1"], "kv_cache_scale=-1.0 is not valid"),
        (["kv_cache_scale=inf"], "kv_cache_scale=inf is not valid"),
        (["kv_cache_dtype=fp8", "dtype=float16"], "kv_cache_dtype=fp8 needs dtype=bfloat16 or float32"),
        (["kv_cache_dtype=fp8_ds_mla", "attention=flashmla"],
         "attention=flashmla needs kv_cache_dtype=auto or fp8 (here fp8_ds_mla); use attention=triton"),
        (["kv_cache_dtype=fp8", "attention=aiter"], "attention=aiter needs kv_cache_dtype=auto (here fp8)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            compose_config(overrides)
        assert message in str(info.value) and "\n" not in str(info.value), (overrides, str(info.value))
