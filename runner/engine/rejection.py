"""Verification of drafted tokens (speculative decoding), on the device and vectorized over the batch.

Layout (flat, as a verify step computes it): request b drafted ``num_drafts[b]`` = d_b tokens (0..k, its own
number), stored one request after another in ``draft_token_ids`` [N], N = sum d_b; the target step computed
d_b + 1 rows for it, one per draft position and the bonus position, one request after another in the [N + B]
rows of ``target_tokens`` and ``target_probs``. Request b's row j (j < d_b) is the target's distribution of the
token at draft position j given the drafts before it; its row d_b is the bonus position's (all drafts accepted).
Offsets: request b's drafts start at D_b = d_0 + ... + d_{b-1}, its target rows at D_b + b.

Per request, with x_j its drafts, p_j the target's distribution at position j (after the request's temperature,
top-k, top-p: the sampler's, passed in) and q_j the draft's (one-hot at x_j for ngram, and wherever
``draft_probs`` is None):

- greedy: x_j is accepted while it equals the target's argmax t_j; the first that differs is replaced by t_j, or,
  all accepted, the bonus t_{d} follows. 1 to d + 1 tokens, the same the target alone would have generated.
- sampled: x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)) (u_j q_j(x_j) < p_j(x_j), u_j uniform in
  [0, 1)); at the first rejection the token is drawn from normalize(max(0, p_j - q_j)); all accepted, the bonus is
  the sampler's draw from p_d. Each emitted token is then distributed as the target's (Leviathan et al. 2023,
  Chen et al. 2023), whatever q is.
- forced (``speculative.force_acceptance_length``, benchmarks): the number accepted is given
  (``forced_num_accepted``); the emitted tokens are those drafts and then the target's token at the next row
  (``target_tokens``: its argmax, or its draw from p).

docs/speculative.md derives the formulas and states what the tests check.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from mla_runner.engine.sampler import DrawKeys
from mla_runner.kernels.philox import exponential_noise, seed_key, uniform_noise

PAD = -1  # the token id in the unused columns of VerifyOutput.tokens
# the noise streams of a request's key here (the sampler's draws use stream 0)
ACCEPT_STREAM, RECOVER_STREAM = 1, 2


class VerifyOutput(NamedTuple):
    """Per request, on the device."""

    tokens: torch.Tensor  # [B, k + 1] int64: the emitted tokens in the first num_tokens[b] columns, PAD after
    num_tokens: torch.Tensor  # [B] int64: num_accepted + 1
    num_accepted: torch.Tensor  # [B] int64: drafts accepted, 0..num_drafts[b]


class DraftIndex(NamedTuple):
    """Request b's draft position j as a [B, k] grid over the flat layout (columns j >= d_b are padding)."""

    valid: torch.Tensor  # [B, k] bool: j < d_b
    draft_rows: torch.Tensor  # [B, k] int64: D_b + j, clamped to [0, max(N - 1, 0)] where not valid
    target_rows: torch.Tensor  # [B, k] int64: D_b + b + j (where not valid, a row of request b or the next)
    target_starts: torch.Tensor  # [B] int64: D_b + b, request b's first target row (its bonus row: + d_b)


def draft_index(num_drafts: torch.Tensor, num_draft_tokens: int, max_drafts: int) -> DraftIndex:
    """The gathers from the flat layout; ``num_draft_tokens`` (N) and ``max_drafts`` (k) are the host's, so nothing
    here waits for the device."""
    B = num_drafts.shape[0]
    device = num_drafts.device
    starts = torch.cumsum(num_drafts, 0) - num_drafts  # D_b
    j = torch.arange(max_drafts, device=device)
    valid = j[None, :] < num_drafts[:, None]
    draft_rows = (starts[:, None] + j[None, :]).clamp(max=max(num_draft_tokens - 1, 0))
    target_starts = starts + torch.arange(B, device=device)
    target_rows = (target_starts[:, None] + j[None, :]).clamp(max=num_draft_tokens + B - 1)
    return DraftIndex(valid, draft_rows, target_rows, target_starts)


def verify(
    draft_token_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    target_tokens: torch.Tensor,
    max_drafts: int,
    target_probs: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    is_greedy: Optional[torch.Tensor] = None,
    keys: Optional[DrawKeys] = None,
    forced_accepted: Optional[torch.Tensor] = None,
) -> VerifyOutput:
    """Accept or reject each request's drafts and emit its tokens for this step (module docstring).

    ``draft_token_ids`` [N] int64; ``num_drafts`` [B] int64 (each <= ``max_drafts``, k); ``target_tokens`` [N + B]
    int64: the sampler's token at every target row (a greedy request's argmax; a sampled request's draw from that
    row's distribution, of which only the bonus row's is used). ``target_probs`` [N + B, V] fp32: each row's
    distribution after the request's sampling settings; None when every request is greedy (then ``is_greedy`` and
    ``draft_probs`` are not read). ``is_greedy`` [B] bool: the requests verified by argmax (what their rows of
    ``target_probs`` hold is not used); None: none. ``draft_probs`` [N, V]: the draft model's distributions of its
    drafts; None: one-hot (ngram, or a drafter that takes its argmax). ``keys``: per request, its seed and its output
    length before the step, the key of its draws here (``kernels.philox``: stream 1 for the acceptance tests, 2 for
    the recovered token), so that its tokens do not depend on the batch; needed where something is sampled.
    ``forced_accepted`` [B] int64: accept that many drafts instead of comparing (forced_num_accepted).

    Every shape is known on the host and no value is read back: nothing waits for the device.
    """
    B, N = num_drafts.shape[0], draft_token_ids.shape[0]
    device = draft_token_ids.device
    index = draft_index(num_drafts, N, max_drafts)
    drafts = draft_token_ids[index.draft_rows] if N else torch.zeros_like(index.draft_rows)  # [B, k]
    sampled = target_probs is not None and forced_accepted is None
    if sampled and keys is None:
        raise ValueError("verify needs the requests' keys to sample")
    seeds = positions = None
    if sampled:
        seeds = torch.tensor([seed_key(s) for s in keys.seeds], dtype=torch.long).to(device, non_blocking=True)
        positions = torch.tensor(list(keys.positions), dtype=torch.long).to(device, non_blocking=True)

    if forced_accepted is not None:
        num_accepted = torch.minimum(forced_accepted.to(num_drafts.dtype), num_drafts)
    else:
        accept = drafts == target_tokens[index.target_rows]  # greedy
        if sampled:
            uniform = uniform_noise(seeds, positions, max_drafts, stream=ACCEPT_STREAM)
            p_target = target_probs[index.target_rows, drafts]  # [B, k]: p_j(x_j)
            p_draft = draft_probs[index.draft_rows, drafts] if draft_probs is not None and N else 1.0
            accept_sampled = uniform * p_draft < p_target
            accept = accept_sampled if is_greedy is None else torch.where(is_greedy[:, None], accept, accept_sampled)
        # the run of accepted drafts from position 0: a cumulative product stops at the first rejection
        num_accepted = (accept & index.valid).long().cumprod(dim=1).sum(dim=1)

    # the token after the accepted drafts: the target's at the first rejected draft's row, or at the bonus row
    rows = index.target_starts + num_accepted
    last = target_tokens[rows]
    if sampled:
        recovered = _recover(target_probs, draft_probs, drafts, index, num_accepted, rows, seeds, positions)
        rejected = num_accepted < num_drafts
        if is_greedy is not None:
            rejected &= ~is_greedy
        last = torch.where(rejected, recovered, last)

    columns = torch.arange(max_drafts + 1, device=device)[None, :]
    drafts = torch.cat([drafts, drafts.new_full((B, 1), PAD)], dim=1)
    accepted = num_accepted[:, None]
    tokens = torch.where(columns < accepted, drafts, torch.where(columns == accepted, last[:, None], PAD))
    return VerifyOutput(tokens, num_accepted + 1, num_accepted)


def _recover(target_probs: torch.Tensor, draft_probs: Optional[torch.Tensor], drafts: torch.Tensor,
             index: DraftIndex, num_accepted: torch.Tensor, rows: torch.Tensor,
             seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B]: a draw from normalize(max(0, p_j - q_j)) at each request's first rejected position j (rows where nothing
    was rejected draw too; the caller discards them)."""
    position = num_accepted.clamp(max=max(drafts.shape[1] - 1, 0))
    p = target_probs[rows]  # [B, V]
    x = drafts.gather(1, position[:, None]) if drafts.shape[1] else torch.zeros_like(rows)[:, None]
    if draft_probs is not None and draft_probs.shape[0]:
        q = draft_probs[index.draft_rows.gather(1, position[:, None])[:, 0]]
    else:  # one-hot at the draft
        q = torch.zeros_like(p).scatter_(1, x, 1.0)
    residual = (p - q).clamp(min=0)
    # p == q (up to rounding) leaves nothing: the draft could not have been rejected there; p keeps the draw valid
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p)
    noise = exponential_noise(seeds, positions, residual.shape[1], stream=RECOVER_STREAM)  # positive: no 0 / 0
    return (residual / noise).argmax(dim=1)  # argmax(w / E) with E ~ Exp(1): a draw proportional to w


def forced_num_accepted(acceptance_length: float, num_drafts: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B] int64: how many drafts each request accepts under ``speculative.force_acceptance_length`` = L.

    A verify step emits the accepted drafts and one token of the target's, so L - 1 drafts are accepted on average:
    floor(L - 1), and one more with probability frac(L - 1) (the least-variance choice, as ATOM, vLLM and SGLang
    make), never more than the request drafted. Over many steps of requests that drafted k, the mean tokens per step
    is L exactly in expectation. Deterministic given ``generator``.
    """
    whole = math.floor(acceptance_length - 1)
    frac = acceptance_length - 1 - whole
    u = torch.rand(num_drafts.shape, device=num_drafts.device, generator=generator)
    return torch.minimum(whole + (u < frac).long(), num_drafts)


class AcceptanceStats:
    """Counts over a run's verify steps, kept on the device (``add`` never waits for it) or, for a step verified on
    the host, there (``add_host``); ``summary`` reads both.

    Per draft position j: how many request-steps drafted a token there (d > j) and how many accepted it
    (accepted > j); the acceptance rate at j is their ratio. The mean acceptance length is the tokens emitted per
    request-step that drafted at least one token: 1 + accepted / such steps (vLLM's definition).
    """

    def __init__(self, max_drafts: int, device: torch.device | str = "cpu"):
        self.drafted = torch.zeros(max_drafts, dtype=torch.long, device=device)
        self.accepted = torch.zeros(max_drafts, dtype=torch.long, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # request-steps with >= 1 draft
        # the same three, counted by add_host
        self.host_drafted, self.host_accepted, self.host_steps = [0] * max_drafts, [0] * max_drafts, 0

    def add(self, num_drafts: torch.Tensor, num_accepted: torch.Tensor) -> None:
        j = torch.arange(self.drafted.shape[0], device=self.drafted.device)
        self.drafted += (num_drafts[:, None] > j).sum(dim=0)
        self.accepted += (num_accepted[:, None] > j).sum(dim=0)
        self.steps += (num_drafts > 0).sum()

    def add_host(self, num_drafts: Sequence[int], num_accepted: Sequence[int]) -> None:
        for d, a in zip(num_drafts, num_accepted):
            for j in range(d):
                self.host_drafted[j] += 1
            for j in range(a):
                self.host_accepted[j] += 1
        self.host_steps += sum(d > 0 for d in num_drafts)

    def counts(self) -> tuple[list[int], list[int], int]:
        """Per draft position the tokens drafted and accepted there, and the request-steps that drafted."""
        drafted = [a + b for a, b in zip(self.drafted.tolist(), self.host_drafted)]
        accepted = [a + b for a, b in zip(self.accepted.tolist(), self.host_accepted)]
        return drafted, accepted, int(self.steps) + self.host_steps

    def summary(self) -> dict[str, float | list[float]]:
        """``acceptance_rate_per_position`` (NaN at a position never drafted), ``mean_acceptance_length`` (NaN before
        any draft), ``num_draft_tokens``, ``num_accepted_tokens``, ``num_verify_steps`` (request-steps that drafted)."""
        drafted, accepted, steps = self.counts()
        return {
            "acceptance_rate_per_position": [a / d if d else math.nan for a, d in zip(accepted, drafted)],
            "mean_acceptance_length": 1 + sum(accepted) / steps if steps else math.nan,
            "num_draft_tokens": sum(drafted),
            "num_accepted_tokens": sum(accepted),
            "num_verify_steps": steps,
        }
