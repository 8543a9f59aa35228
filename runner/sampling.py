"""Sampling parameters and the on-device sampler (greedy, temperature, top-k, top-p, per-request seed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from runner.errors import ConfigError


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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[Optional[torch.Generator]],
) -> torch.Tensor:
    """Next token of each row of ``logits`` [B, V] (fp32), on the logits' device.

    Sampling draws one exponential variate per vocabulary entry and takes argmax(p / noise), which is an
    exact draw from p; a request with a seed draws its noise from its own generator, so its tokens do not
    depend on what else is in the batch.
    """
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    B, V = logits.shape
    device = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_k < V).any() or (top_p < 1).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=device)[None, :]
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep = (rank < top_k[:, None]) & (mass_before < top_p[:, None])
        sorted_p = sorted_p.masked_fill(~keep, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(is_greedy, greedy_tokens, sampled)
