"""Sampling parameters of a request, named and checked as in vLLM (the sampler itself: mla_runner.engine.sampler)."""
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
class SamplingParams:
    """Per-request sampling settings, named as in vLLM. ``temperature=0`` is greedy.

    - ``max_tokens``: None generates up to the context (``max_model_len``).
    - ``stop``: strings that end the output; they are searched in the text decoded with special tokens kept, so a
      special token's text (``<|im_end|>``) works as one. The stop string is cut off the text unless
      ``include_stop_str_in_output``; ``stop_reason`` names it.
    - ``stop_token_ids``: token ids that end the output like EOS: the token stays in ``token_ids``, its text is left out
      of ``text`` unless ``include_stop_str_in_output``; ``stop_reason`` is the id.
    - ``min_tokens``: no EOS, stop id or stop string ends the output before this many tokens (only ``max_tokens`` and
      the context do). The EOS and stop ids are not masked out of the logits as vLLM does: one may be sampled before
      then, it is kept as an ordinary token and generation goes on.
    - ``skip_special_tokens``: leave special tokens out of ``text``.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    max_tokens: Optional[int] = 16
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p"):
            _check_type(name, getattr(self, name), (int, float), "a number")
        for name in ("top_k", "min_tokens"):
            _check_type(name, getattr(self, name), (int,), "an integer")
        if self.max_tokens is not None:
            _check_type("max_tokens", self.max_tokens, (int,), "an integer or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_type(name, getattr(self, name), (bool,), "True or False")
        check_sampling_values("SamplingParams", self.temperature, self.top_p, self.top_k, self.max_tokens)
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


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"SamplingParams.{name}={value!r} is not valid: it must be {what}")
