"""The offline Python API, vLLM's: ``LLM(model, ...).generate(prompts, params)`` and ``.chat(messages, params)``.

``LLM`` takes vLLM's keywords (mla_runner.llm_args translates them) and the runner's own settings; the outputs have
vLLM's fields: one ``RequestOutput`` per prompt, with one ``CompletionOutput`` per sample (``SamplingParams.n``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from mla_runner.compose import compose_config, override
from mla_runner.config import RunConfig
from mla_runner.engine import LLMEngine
from mla_runner.engine.request import Request
from mla_runner.errors import ConfigError, UserError
from mla_runner.llm_args import model_overrides, resolve_path, vllm_overrides
from mla_runner.models.loader import load_tokenizer
from mla_runner.prompts import encode, encode_chat, parse_prompt
from mla_runner.sampling import Logprob, SamplingParams

PromptType = Union[str, dict]
Conversation = list[dict[str, Any]]
# generation_config.json's fields that set default sampling, as vLLM reads them (HF's max_new_tokens is max_tokens).
GENERATION_DEFAULTS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_p": "top_p",
                       "top_k": "top_k", "min_p": "min_p", "max_new_tokens": "max_tokens"}
PositionLogprobs = Optional[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int  # which of the prompt's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None  # the sum of logprobs' sampled-token entries; None when not asked
    logprobs: Optional[list[PositionLogprobs]] = None  # per token, when SamplingParams.logprobs asks
    finish_reason: Optional[str] = None  # "stop" (EOS, a stop id or a stop string) | "length"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it; None for EOS or length

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request arrived, got its first token and its last, in seconds on ``time.perf_counter``'s clock (vLLM's
    are wall-clock times: only their differences compare)."""

    arrival_time: float
    first_token_time: Optional[float]
    last_token_time: Optional[float]
    time_to_first_token: Optional[float]
    time_per_output_token: Optional[float]  # after the first; None with a single output token


@dataclass
class RequestOutput:
    request_id: str  # the prompt's position in the call, as a string
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: Optional[RequestMetrics] = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (the last admission's, after a preemption)
    prompt_logprobs: Optional[list[PositionLogprobs]] = None  # per prompt token (the first None), when asked

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.metrics is None else self.metrics.time_to_first_token

    @property
    def latency(self) -> Optional[float]:
        m = self.metrics
        return None if m is None or m.last_token_time is None else m.last_token_time - m.arrival_time

    @classmethod
    def from_requests(cls, requests: list[Request]) -> RequestOutput:
        """The output of one prompt's requests (its ``n`` samples, in order). Its metrics span them all: the first
        token of any, the last of all, the time per output token over the longest."""
        completions = [CompletionOutput(r.sample_index, r.text, list(r.output_token_ids), r.cumulative_logprob,
                                        r.logprobs, r.finish_reason, r.stop_reason) for r in requests]
        firsts = [r.first_token_time for r in requests if r.first_token_time is not None]
        lasts = [r.finish_time for r in requests]
        first = min(firsts) if firsts else None
        last = None if None in lasts else max(lasts)
        arrival, n = min(r.arrival_time for r in requests), max(len(r.output_token_ids) for r in requests)
        metrics = RequestMetrics(
            arrival, first, last, None if first is None else first - arrival,
            (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None)
        head = requests[0]
        return cls(str(head.index), head.prompt, head.prompt_token_ids, completions,
                   all(r.finish_reason is not None for r in requests), metrics, head.num_cached_tokens,
                   head.prompt_logprobs)


class LLM:
    """An engine over one model, with vLLM's constructor keywords.

    ``max_model_len=None`` (vLLM's default) is the model's max_position_embeddings, lowered to what the KV cache
    holds (``llm.config.max_model_len`` says what it came to).

    ``model`` is a model config name (``tiny_deepseek_v3``, ``tiny_kimi_k2``, ``deepseek_v3``, ``kimi_k2``), a
    checkpoint directory, or a Hugging Face Hub id (``deepseek-ai/DeepSeek-V3``) already in the local Hugging Face
    cache. vLLM's keywords map to the runner's settings: ``max_num_seqs`` -> ``max_batch_size``,
    ``gpu_memory_utilization`` -> ``kv_cache_memory_fraction``, ``enforce_eager`` -> ``cuda_graphs=false``,
    ``block_size`` -> ``page_size``, ``quantization="fp8"`` -> ``weights=fp8``, ``tensor_parallel_size`` -> the
    torchrun world size (checked), ``speculative_config={"method": "ngram", "num_speculative_tokens": 3}`` -> the
    ``speculative`` group. Further keywords are the runner's settings or group choices, as on the command
    line: ``LLM("tiny_kimi_k2", attention="triton", metadata="per_step", dtype="float32", device="cpu")``.
    """

    def __init__(self, model: str = "tiny_deepseek_v3", tokenizer: Optional[str] = None,
                 trust_remote_code: bool = False, dtype: Any = "auto", seed: int = 0,
                 max_model_len: Optional[int] = None, max_num_seqs: Optional[int] = None,
                 gpu_memory_utilization: Optional[float] = None, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, quantization: Optional[str] = None, kv_cache_dtype: str = "auto",
                 enable_prefix_caching: Optional[bool] = None, max_num_batched_tokens: Optional[int] = None,
                 block_size: Optional[int] = None, speculative_config: Optional[dict] = None,
                 **runner_overrides: Any):
        settings = vllm_overrides(
            trust_remote_code=trust_remote_code, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
            enable_prefix_caching=enable_prefix_caching, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, speculative_config=speculative_config, runner_overrides=runner_overrides)
        self.config: RunConfig = compose_config(model_overrides(model) + [override(k, v) for k, v in settings.items()])
        self.engine = LLMEngine(self.config, fit_max_model_len=max_model_len is None)
        self.config = self.engine.cfg  # with max_model_len as resolved
        if tokenizer is not None and tokenizer != model:
            self.engine.tokenizer = load_tokenizer(resolve_path(tokenizer), trust_remote_code=trust_remote_code)
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        """The tokenizer (transformers'); None for random weights."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults: the checkpoint's generation_config.json recommendations (repetition_penalty,
        temperature, top_p, top_k, min_p, and max_new_tokens as max_tokens) over ``SamplingParams()``;
        ``SamplingParams()`` without one."""
        gc = self.engine.generation_config
        diff = {ours: gc[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if gc.get(theirs) is not None}
        try:
            return SamplingParams(**diff)
        except ConfigError as e:
            raise ConfigError(f"{self.config.model.path}/generation_config.json: {e}") from None

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt, all batched together; outputs in the order of the prompts. A prompt is a string or
        a dict with "prompt", "prompt_token_ids" or "messages" (a conversation); ``chat`` wraps a string prompt as a
        user turn of the chat template. Without ``sampling_params``: ``get_default_sampling_params()``.

        Every prompt is checked before any runs: a bad one raises ``UserError`` and nothing is lost.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self._run([self._encode(i, p, chat) for i, p in enumerate(prompts)], sampling_params, use_tqdm)

    def chat(
        self,
        messages: Union[Conversation, Sequence[Conversation]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} dicts: system prompt, turns) or to each of a list
        of them, formatted with the tokenizer's chat template (or ``chat_template``; ``chat_template_kwargs`` go to
        it); an output's ``prompt`` is the formatted text."""
        one = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if one else list(messages)
        encoded = []
        for i, conversation in enumerate(conversations):
            try:
                encoded.append(encode_chat(self.tokenizer, conversation, chat_template, add_generation_prompt,
                                           chat_template_kwargs))
            except UserError as e:
                raise UserError(f"conversation {i}: {e}") from None
        return self._run(encoded, sampling_params, use_tqdm)

    def _encode(self, index: int, prompt: PromptType, chat: bool) -> tuple[Optional[str], list[int]]:
        spec = parse_prompt(prompt, f"prompt {index}")
        if spec.messages is not None:
            return encode_chat(self.tokenizer, spec.messages)
        if spec.prompt is None:
            return None, spec.prompt_token_ids
        return spec.prompt, encode(self.tokenizer, spec.prompt, chat)

    def _run(self, prompts: list[tuple[Optional[str], list[int]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None], use_tqdm: bool,
             ) -> list[RequestOutput]:
        n = len(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = [sampling_params] * n if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != n:
            raise UserError(f"{n} prompts but {len(params)} sampling params")
        groups = [self.engine.make_requests(i, ids, sp, text) for i, ((text, ids), sp) in enumerate(zip(prompts,
                                                                                                         params))]
        self.engine.run([r for group in groups for r in group], progress=use_tqdm and self.config.progress)
        return [RequestOutput.from_requests(group) for group in groups]


__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]
