"""``LLM(...)``'s keywords: vLLM's names translated to the runner's config overrides, runner keys checked, a vLLM
keyword the runner lacks named with its equivalent, and a model given as a Hugging Face Hub id found in the local
Hugging Face cache (never downloaded)."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from mla_runner.compose import CONF_DIR, GROUPS, override
from mla_runner.config import RunConfig
from mla_runner.engine.distributed import Launch
from mla_runner.errors import ConfigError, UserError

# vLLM keywords LLM() does not take, and what the runner has instead (or why not).
VLLM_ONLY = {
    "swap_space": "not supported: a preempted request is recomputed, never swapped to CPU memory",
    "cpu_offload_gb": "not supported: the weights stay on the GPU",
    "pipeline_parallel_size": "not supported: tensor_parallel_size (with parallel.moe=ep|tp) splits the model",
    "data_parallel_size": "not supported: start one process group per replica",
    "num_gpu_blocks_override": "the runner's equivalent is num_pages (KV-cache pages of page_size tokens)",
    "max_seq_len_to_capture": "not supported: the runner's cuda_graphs=true|false captures decode steps of any length",
    "compilation_config": "the runner's equivalent is cuda_graphs=true|false",
    "distributed_executor_backend": "not supported: launch the script with torchrun --nproc-per-node N",
    "revision": "not supported: download that revision (huggingface-cli download org/name --revision R) and pass "
                "its directory",
    "download_dir": "not supported: a model comes from a directory or the local Hugging Face cache",
    "load_format": "not supported: checkpoints load from safetensors",
    "tokenizer_mode": "not supported: the tokenizer loads through transformers' AutoTokenizer",
    "max_logprobs": "not needed: SamplingParams.logprobs and prompt_logprobs may be up to the vocabulary size",
    "generation_config": "not supported: the checkpoint's generation_config.json is always read (vLLM's 'auto')",
    "calculate_kv_scales": "not supported: kv_cache_dtype='fp8' takes its per-tensor scale from kv_cache_scale (1.0 "
                           "by default, vLLM's uncalibrated k_scale)",
}
VLLM_DTYPES = {"half": "float16", "float": "float32"}
# vLLM's kv_cache_dtype names -> the runner's (fp8 is e4m3 in both)
VLLM_KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_ds_mla": "fp8_ds_mla"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def vllm_overrides(*, trust_remote_code: bool, dtype: Any, seed: int, max_model_len: Optional[int],
                   max_num_seqs: Optional[int], gpu_memory_utilization: Optional[float], enforce_eager: bool,
                   tensor_parallel_size: int, quantization: Optional[str], kv_cache_dtype: str,
                   enable_prefix_caching: Optional[bool], max_num_batched_tokens: Optional[int],
                   block_size: Optional[int], runner_overrides: dict[str, Any],
                   speculative_config: Optional[dict] = None) -> dict[str, Any]:
    """The runner's settings for vLLM's keywords (those left at None keep the runner's defaults, but for
    ``max_model_len``, whose None the engine resolves: ``LLMEngine(fit_max_model_len=True)``), then the runner's own
    keywords; a keyword given under both names is an error."""
    if kv_cache_dtype not in VLLM_KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported: choose one of "
                          f"{', '.join(map(repr, VLLM_KV_CACHE_DTYPES))} ('auto' is the run dtype; FP8 is e4m3 only)")
    if quantization not in (None, "fp8"):
        raise ConfigError(f"quantization={quantization!r} is not supported: None (as the checkpoint says) or 'fp8'")
    dtype = str(dtype).removeprefix("torch.")
    vllm = {
        "model.trust_remote_code": trust_remote_code or None, "dtype": VLLM_DTYPES.get(dtype, dtype), "seed": seed,
        "max_model_len": max_model_len, "max_batch_size": max_num_seqs,
        "kv_cache_memory_fraction": gpu_memory_utilization, "cuda_graphs": False if enforce_eager else None,
        "weights": quantization, "enable_prefix_caching": enable_prefix_caching,
        "max_num_batched_tokens": max_num_batched_tokens, "page_size": block_size,
        "parallel.size": _tensor_parallel_size(tensor_parallel_size),
        "kv_cache_dtype": None if kv_cache_dtype == "auto" else VLLM_KV_CACHE_DTYPES[kv_cache_dtype],
        **_speculative(speculative_config),
    }
    vllm = {k: v for k, v in vllm.items() if v is not None}
    names = {"max_batch_size": "max_num_seqs", "kv_cache_memory_fraction": "gpu_memory_utilization",
             "cuda_graphs": "enforce_eager", "weights": "quantization", "page_size": "block_size",
             "parallel.size": "tensor_parallel_size", "model.trust_remote_code": "trust_remote_code",
             "speculative": "speculative_config"}
    for key in runner_overrides:
        check_runner_key(key)
        if key in vllm and key in names:
            raise ConfigError(f"LLM() got both {names[key]}= and {key}=: they set the same thing, give one")
    return {**vllm, **runner_overrides}


# vLLM's speculative_config keys -> the speculative group's fields; its methods -> the group's options
VLLM_SPECULATIVE_KEYS = {"num_speculative_tokens": "num_tokens", "prompt_lookup_max": "prompt_lookup_max",
                         "prompt_lookup_min": "prompt_lookup_min"}
VLLM_SPECULATIVE_METHODS = {"ngram": "ngram", "mtp": "mtp", "deepseek_mtp": "mtp"}


def _speculative(config: Optional[dict]) -> dict[str, Any]:
    """The ``speculative`` group's settings for vLLM's ``speculative_config`` dict (None: none)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"speculative_config={config!r} is not valid: a dict such as {{'method': 'ngram', "
                          "'num_speculative_tokens': 3}")
    method = config.get("method")
    if method not in VLLM_SPECULATIVE_METHODS:
        raise ConfigError(f"speculative_config method={method!r} is not supported: choose one of "
                          f"{', '.join(map(repr, VLLM_SPECULATIVE_METHODS))}")
    unknown = sorted(set(config) - {"method"} - set(VLLM_SPECULATIVE_KEYS))
    if unknown:
        raise ConfigError(f"speculative_config key {unknown[0]!r} is not supported: the runner takes "
                          f"{', '.join(map(repr, ['method', *VLLM_SPECULATIVE_KEYS]))}")
    return {"speculative": VLLM_SPECULATIVE_METHODS[method],
            **{f"speculative.{VLLM_SPECULATIVE_KEYS[k]}": v for k, v in config.items() if k != "method"}}


def _tensor_parallel_size(size: Any) -> Optional[int]:
    """``parallel.size`` for vLLM's tensor_parallel_size, which must be the number of processes launched."""
    world = Launch.from_env().world
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"tensor_parallel_size={size!r} is not valid: it must be a positive integer")
    if size != world:
        how = "as one process (no torchrun)" if world == 1 else f"as {world} processes"
        raise ConfigError(f"tensor_parallel_size={size} but this script was started {how}: launch it with torchrun "
                          f"--nproc-per-node {size} script.py (each process runs the script; rank 0 alone prints)")
    return size if size > 1 else None


def check_runner_key(key: str) -> None:
    """A keyword that is a runner setting (a RunConfig field, a config group, or a dotted key under one) passes; any
    other raises one line naming the runner's equivalent or saying where the runner's keys are listed."""
    if key.split(".")[0] in {f.name for f in fields(RunConfig)} | set(GROUPS):
        return
    if key in VLLM_ONLY:
        raise ConfigError(f"LLM({key}=...): {VLLM_ONLY[key]}")
    raise ConfigError(f"LLM() has no keyword {key!r}: it takes vLLM's LLM keywords (model, tokenizer, dtype, "
                      "max_model_len, max_num_seqs, tensor_parallel_size, ...) and the runner's settings "
                      "(mla_runner.config.RunConfig; mla-runner --help lists them)")


def model_overrides(model: str) -> list[str]:
    """A config name selects the model group option; a directory, or a Hub id cached locally, runs that
    checkpoint."""
    if (CONF_DIR / "model" / f"{model}.yaml").is_file():
        return [f"model={model}"]
    path = resolve_path(model)
    option = "deepseek_v3"
    try:
        if json.loads((path / "config.json").read_text()).get("model_type") == "kimi_k2":
            option = "kimi_k2"
    except (OSError, ValueError):
        pass  # the loader reports a missing or bad config.json with the file named
    return [f"model={option}", override("model.path", str(path))]


def resolve_path(name: str) -> Path:
    """A directory as given; a Hugging Face Hub id (``org/name``, not a directory) as its snapshot in the local
    Hugging Face cache (HF_HUB_CACHE or HF_HOME), or a ``UserError`` saying how to download it."""
    path = Path(name).expanduser()
    if path.is_dir() or not HUB_ID.fullmatch(name):
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or not a valid repo id
        raise UserError(f"{name} is neither a directory nor a model in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}): download it first (huggingface-cli download {name})") from None
