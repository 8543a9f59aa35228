"""Typed configuration: the schemas behind every Hydra group, and their validation.

Hydra composes YAML files that extend these dataclasses (``conf/``); the entry point converts the result
once with ``OmegaConf.to_object`` and from then on library code only sees these dataclasses. Each one
checks its own values in ``__post_init__`` and raises ``ConfigError`` naming the field, so a bad value
fails before any work starts, whether it came from the command line, a YAML file or ``LLM(**overrides)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mla_runner.attention import CHOICES, TRITON_STRATEGIES, check_choice
from mla_runner.errors import ConfigError
from mla_runner.kernels.kv_cache import KV_CACHE_DTYPES
from mla_runner.sampling import check_sampling_values

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPES = ("auto", *TORCH_DTYPES)
DEVICES = ("auto", "cuda", "cpu")
WEIGHTS = ("auto", "fp8", "bf16")
MOE_LAYOUTS = ("ep", "tp")


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{field_name}={value!r} is not valid: choose one of {', '.join(choices)}")


def _check_positive(field_name: str, value: Optional[int | float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{field_name}={value!r} is not valid: it must be a positive number")


@dataclass
class ModelConfig:
    """Which checkpoint to run.

    ``path`` is a Hugging Face checkpoint directory (config.json, safetensors shards with an index,
    tokenizer). With ``path`` unset, a model whose ``preset`` is a tiny one is generated from ``seed``
    into the user's cache the first time it is needed (the embedded default); the full-size presets
    need a path, or ``random_weights=true`` (benchmarks: no checkpoint, no tokenizer, token-id prompts).
    """

    name: str = MISSING
    preset: str = MISSING  # an architecture in models.presets
    path: Optional[str] = None
    seed: int = 0
    num_layers: Optional[int] = None  # keep only the first N decoder layers (studies, benchmarks)
    # with num_layers: run this many decoder layers, those past num_layers over the weights of the last kept layer
    # of their kind (each with its own KV cache): a full-depth step's time in a truncation's memory (benchmarks;
    # the outputs are not the model's)
    depth: Optional[int] = None
    random_weights: bool = False  # the preset's shapes with random weights made on the device (no checkpoint)
    # run the Python code a checkpoint's tokenizer ships (Kimi-K2's tiktoken tokenizer): only when asked
    trust_remote_code: bool = False
    # where the tiny presets are written on first use; unset: $XDG_CACHE_HOME/mla-runner, else ~/.cache/mla-runner
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_positive("model.num_layers", self.num_layers, allow_none=True)
        _check_positive("model.depth", self.depth, allow_none=True)


@dataclass
class AttentionConfig:
    """The attention backend that runs MLA (mla_runner.attention); auto: triton on a GPU, torch on a CPU."""

    name: str = MISSING

    def __post_init__(self) -> None:
        _check_choice("attention.name", self.name, CHOICES)


@dataclass
class MetadataConfig:
    """How ``attention=triton`` builds its per-step metadata (the other backends build their own).

    ``persistent``: fixed buffers sized once, filled on the device every step (no sync, graph-safe).
    ``per_step``: fresh tensors built on the host every step and copied in (the baseline).
    """

    strategy: str = MISSING
    num_kv_splits: Optional[int] = None  # split count: a cap for persistent, the fixed count for per_step
    # persistent: KV blocks the GPU streams while a part computes one (the plan's DRAM floor; 0: none);
    # unset: the device's (kernels.metadata.device_dram_ratio)
    dram_ratio: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("metadata.strategy", self.strategy, tuple(TRITON_STRATEGIES))
        _check_positive("metadata.num_kv_splits", self.num_kv_splits, allow_none=True)
        if self.dram_ratio is not None and self.dram_ratio < 0:
            raise ConfigError(f"metadata.dram_ratio={self.dram_ratio!r} is not valid: it must be >= 0 (0: no floor)")


@dataclass
class GenerateTaskConfig:
    """Prompts to completions."""

    name: str = "generate"
    prompts: Optional[str] = None  # a .jsonl or .txt file; unset: a few built-in prompts
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: Optional[int] = None  # each prompt samples with its own seed, made from this one and its index
    stop: list[str] = field(default_factory=list)  # stop strings of every prompt (a line's "stop" replaces them)
    chat: bool = False  # apply the tokenizer's chat template
    output: str = "completions.jsonl"  # written into the run's output directory
    resume: bool = False  # with hydra.run.dir=<an earlier run>: run only the prompts its output has no line for

    def __post_init__(self) -> None:
        check_sampling_values("task", self.temperature, self.top_p, self.top_k, self.max_tokens)


BENCH_MODES = ("decode", "kernel", "metadata", "prefill", "throughput")


@dataclass
class BenchTaskConfig:
    """One measured point: ``batch`` requests of ``context`` tokens (see runner/tasks/bench.py)."""

    name: str = "bench"
    mode: str = "decode"  # decode | kernel | metadata | prefill | throughput
    batch: int = 8  # requests (throughput: prompts, vLLM's --num-prompts)
    context: int = 4096  # tokens of each (prefill, throughput: prompt tokens, vLLM's --input-len)
    output_len: int = 128  # throughput: tokens generated per prompt (vLLM's --output-len)
    repeats: int = 3  # prefill, throughput: measured runs of the whole workload (after one warm-up run)
    q_len: int = 1  # query tokens per request (kernel mode; >1 is speculative/MTP verification)
    heads: Optional[int] = None  # attention heads per GPU (kernel, metadata); unset: the model's
    lengths: str = "uniform"  # kernel mode: uniform | skewed (one request of `context`, the rest context/16)
    warmup: int = 3
    iters: int = 20

    def __post_init__(self) -> None:
        _check_choice("task.mode", self.mode, BENCH_MODES)
        _check_choice("task.lengths", self.lengths, ("uniform", "skewed"))
        for name in ("batch", "context", "q_len", "iters", "output_len", "repeats"):
            _check_positive(f"task.{name}", getattr(self, name))
        _check_positive("task.heads", self.heads, allow_none=True)


@dataclass
class ParallelConfig:
    """How a ``torchrun --nproc-per-node N -m mla_runner ...`` launch splits the model over its N processes (one GPU
    each, or CPU processes over gloo): attention heads, dense MLPs, embedding and lm_head always tensor
    parallel; ``moe`` picks the routed experts' layout. A single process ignores ``moe``.

    ``moe``: ep (expert parallel: each rank holds E/N whole experts) | tp (each rank a 1/N slice of every expert).
    ``size``: the number of processes this run expects (checked against torchrun's); unset: whatever was launched.
    """

    moe: str = "ep"
    size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("parallel.moe", self.moe, MOE_LAYOUTS)
        _check_positive("parallel.size", self.size, allow_none=True)


SPECULATIVE_METHODS = ("none", "mtp", "ngram")
NGRAM_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min and prompt_lookup_max when neither is given


@dataclass
class SpeculativeConfig:
    """Speculative decoding (docs/speculative.md): each step a request drafts up to ``num_tokens`` tokens and the
    target model verifies them in one step of q_len = drafts + 1, emitting 1 to num_tokens + 1 tokens.

    ``method``: none | mtp (DeepSeek-V3's MTP layer, applied num_tokens times on its own output) | ngram (prompt
    lookup: the tokens that followed the earliest occurrence of the context's last n-gram, n from
    prompt_lookup_max down to prompt_lookup_min; no model, so Kimi-K2 too). ``none`` ignores the other fields, so a
    sweep ``speculative=none,mtp speculative.num_tokens=3`` compares the two.

    ``force_acceptance_length`` (benchmarks, as vLLM's ``synthetic_acceptance_length`` and SGLang's
    ``SGLANG_SIMULATE_ACC_LEN``): the mean number of tokens a verify step emits per request, the accepted drafts plus
    the target's own token, so 1 <= value <= num_tokens + 1. Each step a request accepts floor(value - 1) drafts, and
    one more with probability frac(value - 1) (1.8 at k = 1: its draft 80% of steps), whatever the tokens; a request
    that drafted fewer accepts at most what it drafted. The text is then meaningless: it measures speed only.
    """

    method: str = "none"
    num_tokens: int = 1  # k: drafts per request and step (a request near max_tokens or max_model_len drafts fewer)
    force_acceptance_length: Optional[float] = None  # unset: the target model decides what is accepted
    # ngram: the longest and shortest suffix n-gram looked up; neither set: both 5 (vLLM's), one set: both equal it
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("speculative.method", self.method, SPECULATIVE_METHODS)
        _check_positive("speculative.num_tokens", self.num_tokens)
        length = self.force_acceptance_length
        if length is not None and not 1 <= length <= self.num_tokens + 1:
            raise ConfigError(f"speculative.force_acceptance_length={length} is not valid: it counts the accepted "
                              f"drafts and the target's own token, so it must be in [1, num_tokens + 1] = "
                              f"[1, {self.num_tokens + 1}]")
        _check_positive("speculative.prompt_lookup_min", self.prompt_lookup_min, allow_none=True)
        _check_positive("speculative.prompt_lookup_max", self.prompt_lookup_max, allow_none=True)
        if self.method == "ngram":
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min = self.prompt_lookup_max = NGRAM_DEFAULT_LOOKUP
            self.prompt_lookup_min = self.prompt_lookup_min or self.prompt_lookup_max
            self.prompt_lookup_max = self.prompt_lookup_max or self.prompt_lookup_min
        if self.prompt_lookup_min and self.prompt_lookup_max and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative.prompt_lookup_min={self.prompt_lookup_min} is larger than "
                              f"speculative.prompt_lookup_max={self.prompt_lookup_max}")


def check_speculative(spec: SpeculativeConfig, has_mtp: bool, model_name: str) -> None:
    """What only the model's config.json can decide, for the engine to call once it is read: ``speculative=mtp``
    needs an MTP layer (``num_nextn_predict_layers`` >= 1; Kimi-K2 has none)."""
    if spec.method == "mtp" and not has_mtp:
        raise ConfigError(f"speculative=mtp needs a model with an MTP layer and {model_name} has none "
                          "(num_nextn_predict_layers: 0): use speculative=ngram or speculative=none")


@dataclass
class RunConfig:
    """One run: a model, an attention backend, a metadata strategy, a task and the run settings."""

    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    metadata: MetadataConfig = MISSING
    task: Any = MISSING
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    device: str = "auto"  # auto: cuda when available
    seed: int = 0
    max_batch_size: int = 32  # requests decoded together
    max_model_len: int = 4096  # prompt + generated tokens per request
    # tokens one step computes, over all its requests (decodes count one each): a prompt longer than what is left is
    # prefilled in chunks over several steps while the others decode (docs/scheduling.md)
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True  # false: a prompt is prefilled whole, in one step
    # while requests decode, the query-key pairs a step's prompt chunks may attend (a chunk of n tokens after c cached
    # ones attends n * c + n (n + 1) / 2): a chunk deep into a long prompt costs in proportion to its context, so this,
    # not the token budget, bounds how much it slows the decoding requests' step; 0: no bound (docs/scheduling.md#4)
    chunk_attention_budget: int = 4_194_304
    enable_prefix_caching: bool = True  # full KV pages keyed by their prefix, shared by requests that start alike
    page_size: int = 64  # tokens per KV-cache page
    num_pages: Optional[int] = None  # KV-cache capacity; unset: see kv_cache_memory_fraction
    # With num_pages unset: enough pages for max_batch_size full-length requests, but on a GPU no more than
    # this fraction of the memory free once the weights are loaded (the rest is for activations and graphs).
    kv_cache_memory_fraction: float = 0.8
    # the latent cache's layout (docs/kv_cache_fp8.md): auto (the run dtype) | fp8 (e4m3 latent and rope, one scale for
    # the whole cache: 576 bytes a token and layer at DeepSeek-V3's widths, half of bf16) | fp8_ds_mla (DeepSeek's: e4m3
    # latent with a power-of-two scale per 128 values, rope in bf16: 656 bytes)
    kv_cache_dtype: str = "auto"
    # fp8: the per-tensor scale, every layer's at start (a value is stored as x / scale: |x| up to 448 * scale fits,
    # e4m3's normal range starts at scale / 64); 1.0 is vLLM's k_scale for MLA without calibration. The other
    # layouts ignore it.
    kv_cache_scale: float = 1.0
    cuda_graphs: Optional[bool] = None  # capture the decode step; unset: on wherever it can work
    # with graphs: steps with prompt chunks of up to 2048 tokens replay graphs of everything but the attention
    # (docs/scheduling.md section 2); false: they run eagerly
    piecewise_cuda_graphs: bool = False
    progress: bool = True  # progress bars
    profile: bool = False  # a torch.profiler trace of steps 3-7 of a generate run: trace.json in the run directory
    # fp8: FP8 linear layers keep e4m3 weights + block scales (Triton block-scaled GEMMs; on a CPU through the
    # Triton interpreter: slow, for tests); bf16: dequantized at load to the run dtype; auto: fp8 for an FP8
    # checkpoint on a GPU, else dequantized (random weights: fp8 only when asked).
    weights: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # several GPUs (torchrun or srun)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # drafts verified in one step
    # the metric a run returns to a sweeper that optimizes (Optuna, Ax, Nevergrad); unset: the task's headline,
    # tokens_per_s (time_us for task.mode=kernel, metadata_us for task.mode=metadata, prefill_tokens_per_s for
    # task.mode=prefill)
    objective: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("weights", self.weights, WEIGHTS)
        _check_positive("max_batch_size", self.max_batch_size)
        _check_positive("max_model_len", self.max_model_len)
        _check_positive("page_size", self.page_size)
        _check_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_batch_size="
                              f"{self.max_batch_size}: a step could not decode every running request")
        if self.chunk_attention_budget < 0:
            raise ConfigError(f"chunk_attention_budget={self.chunk_attention_budget} is not valid: it must be >= 0 "
                              "(0: no bound)")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"enable_chunked_prefill=false needs max_num_batched_tokens >= max_model_len (here "
                              f"{self.max_num_batched_tokens} < {self.max_model_len}): a long prompt could never run")
        if self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size={self.page_size} is not valid: it must be a power of two")
        _check_positive("num_pages", self.num_pages, allow_none=True)
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} is not valid: "
                              "it must be in (0, 1]")
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if not 0 < self.kv_cache_scale < float("inf"):
            raise ConfigError(f"kv_cache_scale={self.kv_cache_scale!r} is not valid: it must be a positive finite "
                              "number")
        if self.kv_cache_dtype != "auto" and self.dtype == "float16":
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype} needs dtype=bfloat16 or float32 (the FP8 cache is "
                              "dequantized to them), not float16")
        # what the backend declares it supports, as far as it is known before the model's config.json is read
        check_choice(self.attention.name, self.metadata.strategy, cuda_graphs=self.cuda_graphs,
                     device=None if self.device == "auto" else self.device,
                     dtype=TORCH_DTYPES.get(self.dtype), page_size=self.page_size, kv_cache_dtype=self.kv_cache_dtype)


def register_configs() -> None:
    """Register the schemas that the YAML files in conf/ extend (``defaults: [base_...]``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="attention", name="base_attention", node=AttentionConfig)
    cs.store(group="metadata", name="base_metadata", node=MetadataConfig)
    cs.store(group="speculative", name="base_speculative", node=SpeculativeConfig)
    cs.store(group="task", name="base_generate", node=GenerateTaskConfig)
    cs.store(group="task", name="base_bench", node=BenchTaskConfig)
