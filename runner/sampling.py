"""Sampling parameters of a request, named as in vLLM (the sampler itself: mla_runner.engine.sampler)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mla_runner.errors import ConfigError


def check_sampling_values(where: str, temperature: float, top_p: float, top_k: int, max_tokens: int) -> None:
    """The checks shared by ``SamplingParams`` and the generate task's defaults; ``where`` prefixes the field."""
    if temperature < 0:
        raise ConfigError(f"{where}.temperature={temperature} is not valid: it must be >= 0")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{where}.top_p={top_p} is not valid: it must be in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"{where}.top_k={top_k} is not valid: it must be >= 0 (0 disables it)")
    if max_tokens < 1:
        raise ConfigError(f"{where}.max_tokens={max_tokens} is not valid: it must be >= 1")


@dataclass
class SamplingParams:
    """Per-request sampling settings, named as in vLLM. ``temperature=0`` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    max_tokens: int = 16
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        check_sampling_values("SamplingParams", self.temperature, self.top_p, self.top_k, self.max_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

