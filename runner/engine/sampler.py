"""The on-device sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

from typing import Optional

import torch

from mla_runner.sampling import SamplingParams


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
