"""The on-device sampler, vLLM v1's order of operations, vectorized over the batch.

1. Log probabilities, where asked, of the raw logits (log-softmax before anything below).
2. ``min_tokens``: the EOS and stop ids are masked out (-inf) of a request that has fewer tokens than that.
3. Penalties: ``repetition_penalty`` over the prompt and the output so far (a positive logit divided, a negative one
   multiplied), then ``frequency_penalty`` times each token's count in the output and ``presence_penalty`` once for
   each token in it. The counts are built on the device from the requests' token ids.
4. Greedy requests take the argmax here.
5. The others: temperature, ``min_p`` (tokens below min_p times the most likely one's probability dropped), top-k,
   then top-p over the distribution top-k left (renormalized), then one draw.

``sample_with_probs`` gives the same tokens and, per row, the distribution of step 5 (after steps 2, 3 and 5's
filters), which speculative decoding's verification compares drafts against (``mla_runner.engine.rejection``).

Each step is a few batched tensor operations whatever the batch holds; Python loops run over requests only to
build the small per-request tensors (parameters, the masked ids, the token ids of penalized requests) and over the
seeded requests' generators.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from mla_runner.sampling import SamplingParams


class TokenLogprobs(NamedTuple):
    """One position's log probabilities, on the host: the chosen token's with its rank, and the top k tokens'."""

    token_id: int
    logprob: float
    rank: int  # 1: the most likely; ties rank below (vLLM's count of tokens at least as likely)
    top_ids: list[int]
    top_logprobs: list[float]


class TopLogprobs(NamedTuple):
    """Per row, on the device: the log probability and rank of a chosen token, and the k most likely tokens."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] fp32
    ranks: torch.Tensor  # [R] int64
    top_ids: torch.Tensor  # [R, k] int64
    top_logprobs: torch.Tensor  # [R, k] fp32

    def to_host(self, ks: Sequence[Optional[int]]) -> list[Optional[TokenLogprobs]]:
        """Row i with its first ``ks[i]`` top tokens; None where ``ks[i]`` is None."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [None if k is None else TokenLogprobs(ids[i], lps[i], ranks[i], top_ids[i][:k], top_lps[i][:k])
                for i, k in enumerate(ks)]


class SamplerOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64
    logprobs: Optional[TopLogprobs]  # of every row, with the largest k asked; None when no request asks


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> TopLogprobs:
    """The log probability and rank of ``token_ids[r]`` in each row of ``logprobs`` [R, V], and the top k."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    return TopLogprobs(token_ids, chosen[:, 0], ranks, top_ids, top_lp)


def token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, vocab_size] fp32: how often each token occurs in each row's ids (one host-to-device copy of the ids)."""
    lengths = [len(ids) for ids in token_ids]
    counts = torch.zeros(len(token_ids), vocab_size, device=device)
    total = sum(lengths)
    if total:
        flat = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.long).to(device)
        rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device),
                                       torch.tensor(lengths, device=device), output_size=total)
        counts.view(-1).index_add_(0, rows * vocab_size + flat, torch.ones(total, device=device))
    return counts


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits`` [B, V] with each row's repetition, frequency and presence penalties applied (vLLM's definitions)."""
    B, V = logits.shape
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device)[:, None]

    out_counts = token_counts(output_ids, V, device)
    in_output = out_counts > 0
    repetition = column([p.repetition_penalty for p in params])
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = in_output | (token_counts([ids if p.repetition_penalty != 1.0 else () for ids, p in
                                          zip(prompt_ids, params)], V, device) > 0)
        scale = torch.where(seen, repetition, 1.0)
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    return (logits - column([p.frequency_penalty for p in params]) * out_counts
            - column([p.presence_penalty for p in params]) * in_output)


def mask_stop_ids(logits: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
                  eos_token_ids: Sequence[int]) -> torch.Tensor:
    """``logits`` with the EOS and stop ids at -inf in the rows that have fewer than ``min_tokens`` outputs (ids
    outside the vocabulary, which the model cannot produce anyway, are left out)."""
    V = logits.shape[1]
    rows, cols = [], []
    for i, (p, out) in enumerate(zip(params, output_ids)):
        if len(out) < p.min_tokens:
            ids = [t for t in {*eos_token_ids, *p.stop_token_ids} if t < V]
            rows += [i] * len(ids)
            cols += ids
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    output_ids: Optional[Sequence[Sequence[int]]] = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplerOutput:
    """Next token of each row of ``logits`` [B, V] (fp32), on the logits' device, and their log probabilities where a
    request asks for them; ``logits`` is not changed.

    ``prompt_ids`` / ``output_ids``: each row's prompt and the tokens it has generated so far (read by the penalties
    and ``min_tokens``; None: none); ``eos_token_ids``: what ``min_tokens`` masks besides each row's stop ids.

    Sampling draws one exponential variate per vocabulary entry and takes argmax(p / noise), which is an exact draw
    from p; a request with a seed draws its noise from its own generator, so its tokens do not depend on what else
    is in the batch.
    """
    B, V = logits.shape
    device = logits.device
    no_ids: list[list[int]] = [[] for _ in range(B)]
    prompt_ids = no_ids if prompt_ids is None else prompt_ids
    output_ids = no_ids if output_ids is None else output_ids
    ks = [p.logprobs for p in params]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in ks) else None
    logits = processed_logits(logits, params, prompt_ids, output_ids, eos_token_ids)
    tokens = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        tokens = torch.where(is_greedy, tokens, _draw(torch.softmax(_filtered(logits, params), dim=-1), generators))
    if raw_logprobs is None:
        return SamplerOutput(tokens, None)
    return SamplerOutput(tokens, top_logprobs(raw_logprobs, tokens, max(k for k in ks if k is not None)))


class TargetDistributions(NamedTuple):
    tokens: torch.Tensor  # [R] int64: what ``sample`` would give each row (argmax for greedy rows, else one draw)
    probs: Optional[torch.Tensor]  # [R, V] fp32: the distributions those draws come from; None when all are greedy


def sample_with_probs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    output_ids: Optional[Sequence[Sequence[int]]] = None,
    eos_token_ids: Sequence[int] = (),
) -> TargetDistributions:
    """``sample``'s tokens (the same for the same generator states; no logprobs) and, per row, the distribution a
    sampled row draws from: min_tokens masking, penalties, temperature, min_p, top-k and top-p applied, then softmax
    (a greedy row's is at temperature 1 and unused). What speculative verification compares drafts against
    (``rejection.verify``'s ``target_tokens`` and ``target_probs``)."""
    B = logits.shape[0]
    no_ids: list[list[int]] = [[] for _ in range(B)]
    logits = processed_logits(logits, params, no_ids if prompt_ids is None else prompt_ids,
                              no_ids if output_ids is None else output_ids, eos_token_ids)
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return TargetDistributions(tokens, None)
    probs = torch.softmax(_filtered(logits, params), dim=-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return TargetDistributions(torch.where(is_greedy, tokens, _draw(probs, generators)), probs)


def processed_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                     output_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> torch.Tensor:
    """``logits`` after ``min_tokens`` masking and the penalties (steps 2 and 3), what greedy rows take the argmax
    of."""
    device = logits.device
    logits = mask_stop_ids(logits, params, output_ids, eos_token_ids)
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if penalized:
        rows = torch.tensor(penalized, device=device)
        logits = logits.index_copy(0, rows, apply_penalties(logits[rows], [params[i] for i in penalized],
                                                            [prompt_ids[i] for i in penalized],
                                                            [output_ids[i] for i in penalized]))
    return logits


def _draw(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V]: argmax(p / noise) with exponential noise, a seeded row's from its own
    generator."""
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


def _filtered(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Logits after temperature, min_p, top-k and top-p, -inf where dropped (greedy rows at temperature 1; their
    callers discard them)."""
    B, V = logits.shape
    device = logits.device

    def column(values: list) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    logits = logits / column([p.temperature if not p.greedy else 1.0 for p in params])
    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(logits, dim=-1)
        floor = column([float(p.min_p) for p in params]) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if any(0 < p.top_k < V or p.top_p < 1 for p in params):
        top_k = column([p.top_k if 0 < p.top_k < V else V for p in params])
        top_p = column([float(p.top_p) for p in params])
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        keep = torch.arange(V, device=device)[None, :] < top_k
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
        sorted_p = torch.softmax(sorted_logits, dim=-1)
        keep &= sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the mass before a token is under top_p
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits.masked_fill(~keep,
                                                                                                    float("-inf")))
    return logits
