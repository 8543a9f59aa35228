"""Sampling parameters of a request, named and checked as in vLLM (the sampler itself: mla_runner.engine.sampler),
and ``Logprob``, one entry of the log probabilities a request asks for."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mla_runner.errors import ConfigError


def check_sampling_values(where: str, temperature: float, top_p: float, top_k: int, max_tokens: Optional[int]) -> None:
    """The checks shared by ``SamplingParams`` and the generate task's defaults; ``where`` prefixes the field."""
    if temperature < 0:
        raise ConfigError(f"{where}.temperature={temperature} is not valid: it must be >= 0")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{where}.top_p={top_p} is not valid: it must be in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"{where}.top_k={top_k} is not valid: it must be >= 0 (0 disables it)")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"{where}.max_tokens={max_tokens} is not valid: it must be >= 1")


@dataclass
class Logprob:
    """vLLM's ``Logprob``: a token's log probability at one position, its rank there (1: the most likely) and its
    text (the token decoded alone; None without a tokenizer)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class SamplingParams:
    """Per-request sampling settings, named and meant as in vLLM. ``temperature=0`` is greedy.

    - ``n``: samples of the prompt, each its own request (vLLM's parallel sampling: each computes the prompt unless
      the prefix cache holds it already); with a seed, sample i draws from ``seed + i``, so the samples differ and
      each is reproducible. One ``RequestOutput`` holds them, ``CompletionOutput.index`` 0 to n - 1.
    - ``max_tokens``: None generates up to the context (``max_model_len``).
    - ``min_p``: drop the tokens less likely than ``min_p`` times the most likely one (after temperature, before
      top-k and top-p).
    - ``presence_penalty`` / ``frequency_penalty`` (-2 to 2): subtracted from the logit of every token generated so
      far, once / once per occurrence. ``repetition_penalty`` (> 0; 1 disables it): the logit of every token in the
      prompt or generated so far is divided by it where positive, multiplied where negative. They apply to greedy
      requests too (before the argmax).
    - ``stop``: strings that end the output; they are searched in the text decoded with special tokens kept, so a
      special token's text (``<|im_end|>``) works as one. The stop string is cut off the text unless
      ``include_stop_str_in_output``; ``stop_reason`` names it.
    - ``stop_token_ids``: token ids that end the output like EOS: the token stays in ``token_ids``, its text is left out
      of ``text`` unless ``include_stop_str_in_output``; ``stop_reason`` is the id.
    - ``min_tokens``: until this many tokens are generated, the EOS ids (config.json's and generation_config.json's,
      even under ``ignore_eos``) and ``stop_token_ids`` are masked out of the logits, as vLLM does, and no stop
      string ends the output.
    - ``logprobs``: None, or k >= 0: each output position gets ``{token_id: Logprob}`` for the sampled token and the
      k most likely ones, and ``cumulative_logprob`` sums the sampled tokens' log probabilities. ``prompt_logprobs``:
      the same for each prompt token (the first position has none: None); such a prompt is computed, never taken
      from the prefix cache. Both are of the model's own distribution, the log-softmax of its logits before
      penalties, masks, temperature, min-p, top-k and top-p (vLLM's default ``logprobs_mode="raw_logprobs"``).
    - ``skip_special_tokens``: leave special tokens out of ``text``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Optional[int] = 16
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check_type(name, getattr(self, name), (int, float), "a number")
        for name in ("n", "top_k", "min_tokens"):
            _check_type(name, getattr(self, name), (int,), "an integer")
        for name in ("max_tokens", "seed", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), (int,), "an integer or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_type(name, getattr(self, name), (bool,), "True or False")
        check_sampling_values("SamplingParams", self.temperature, self.top_p, self.top_k, self.max_tokens)
        if self.n < 1:
            raise ConfigError(f"SamplingParams.n={self.n} is not valid: it must be >= 1")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"SamplingParams.min_p={self.min_p} is not valid: it must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"SamplingParams.{name}={getattr(self, name)} is not valid: it must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"SamplingParams.repetition_penalty={self.repetition_penalty} is not valid: it must be "
                              "> 0 (1 disables it)")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"SamplingParams.{name}={getattr(self, name)} is not valid: it must be None or >= 0 "
                                  "(the top tokens given besides the chosen one)")
        if not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"SamplingParams.stop={self.stop!r} is not valid: it must be a string or a list of "
                              "strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r} is not valid: it must be a list "
                              "of token ids (integers >= 0)")
        if self.min_tokens < 0:
            raise ConfigError(f"SamplingParams.min_tokens={self.min_tokens} is not valid: it must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ConfigError(f"SamplingParams.min_tokens={self.min_tokens} is not valid: it must be <= max_tokens="
                              f"{self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any of the three penalties is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"SamplingParams.{name}={value!r} is not valid: it must be {what}")
