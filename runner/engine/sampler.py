"""The on-device sampler, vLLM v1's order of operations, vectorized over the batch.

1. Log probabilities, where asked, of the raw logits (log-softmax before anything below).
2. ``min_tokens``: the EOS and stop ids are masked out (-inf) of a request that has fewer tokens than that.
3. Penalties: ``repetition_penalty`` over the prompt and the output so far (a positive logit divided, a negative one
   multiplied), then ``frequency_penalty`` times each token's count in the output and ``presence_penalty`` once for
   each token in it. ``sample`` builds the counts on the device from the requests' token ids; the decode sampler
   keeps them there between steps (``mla_runner.engine.decode_sampler``).
4. Greedy requests take the argmax here.
5. The others: temperature, ``min_p`` (tokens below min_p times the most likely one's probability dropped), top-k,
   then top-p over the distribution top-k left (renormalized), then one draw, keyed by the request's seed and the
   output position (``DrawKeys``, ``kernels.philox``).

Steps 3-5 are ``choose``, which reads device tensors only (``SamplingTensors``, the counts) and runs only the steps
the batch needs (``Steps``), so the decode sampler captures it in CUDA graphs. ``sample_with_probs`` gives the same
tokens and, per row, the distribution of step 5 (after steps 2, 3 and 5's filters), which speculative decoding's
verification compares drafts against (``mla_runner.engine.rejection``).

Each step is a few batched tensor operations whatever the batch holds; Python loops run over requests only to
build the small per-request tensors (parameters and keys, the masked ids, the token ids of penalized requests).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from mla_runner.kernels.philox import exponential_noise, seed_key
from mla_runner.sampling import SamplingParams


class DrawKeys(NamedTuple):
    """Per row, the key of its random draws: its request's seed (the one it was given, else one the engine made
    for it) and the output position it draws, so that a request's draws repeat whatever else runs beside it."""

    seeds: Sequence[int]
    positions: Sequence[int]


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


class SamplingTensors(NamedTuple):
    """Each row's settings, on the device: [R] columns of two packed tensors (one copy to the device each), or of
    the decode sampler's persistent buffers (``mla_runner.engine.decode_sampler``)."""

    temperature: torch.Tensor  # fp32, 1 in greedy rows
    top_p: torch.Tensor  # fp32, 1: off
    min_p: torch.Tensor  # fp32, 0: off
    repetition: torch.Tensor  # fp32, 1: off
    frequency: torch.Tensor  # fp32, 0: off
    presence: torch.Tensor  # fp32, 0: off
    greedy: torch.Tensor  # int64, 1 for a greedy row
    top_k: torch.Tensor  # int64, the vocabulary size where off
    seeds: torch.Tensor  # int64: the key of the row's noise (kernels.philox) ...
    positions: torch.Tensor  # int64: ... at the output position the row draws

    @staticmethod
    def host_rows(params: Sequence[SamplingParams], keys: DrawKeys, vocab_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows as two host tensors, [R, 6] fp32 and [R, 4] int64, in the order of the fields."""
        floats = torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                p.frequency_penalty, p.presence_penalty] for p in params], dtype=torch.float32)
        ints = torch.tensor([[int(p.greedy), p.top_k if 0 < p.top_k < vocab_size else vocab_size, seed_key(seed),
                              position] for p, seed, position in zip(params, keys.seeds, keys.positions)],
                            dtype=torch.int64)
        return floats.view(-1, 6), ints.view(-1, 4)

    @classmethod
    def of(cls, floats: torch.Tensor, ints: torch.Tensor) -> SamplingTensors:
        return cls(*floats.unbind(1), *ints.unbind(1))

    @classmethod
    def build(cls, params: Sequence[SamplingParams], keys: DrawKeys, vocab_size: int, device: torch.device
              ) -> SamplingTensors:
        floats, ints = cls.host_rows(params, keys, vocab_size)
        return cls.of(floats.to(device, non_blocking=True), ints.to(device, non_blocking=True))


class Steps(NamedTuple):
    """Which of the optional steps a batch needs (the host decides from the settings; a graph per combination)."""

    penalties: bool
    sampled: bool  # some row is not greedy
    min_p: bool
    top_k_p: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab_size: int) -> Steps:
        sampled = [p for p in params if not p.greedy]
        return cls(any(p.penalized for p in params), bool(sampled), any(p.min_p > 0 for p in sampled),
                   any(0 < p.top_k < vocab_size or p.top_p < 1 for p in sampled))


def penalize(logits: torch.Tensor, t: SamplingTensors, output_counts: torch.Tensor, in_prompt: torch.Tensor
             ) -> torch.Tensor:
    """``logits`` [R, V] with each row's repetition, frequency and presence penalties (vLLM's definitions):
    ``output_counts`` [R, V] how often each token is in the row's output, ``in_prompt`` [R, V] bool whether it is in
    its prompt. A row with neutral settings comes out bit for bit as it went in."""
    in_output = output_counts > 0
    scale = torch.where(in_output | in_prompt, t.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / scale, logits * scale)
    return (logits - t.frequency[:, None] * output_counts.to(logits.dtype)
            - t.presence[:, None] * in_output.to(logits.dtype))


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``penalize`` with the counts made from the rows' token ids (one copy of them to the device)."""
    B, V = logits.shape
    device = logits.device
    t = SamplingTensors.build(params, DrawKeys([0] * B, [0] * B), V, device)
    prompts = [ids if p.repetition_penalty != 1.0 else () for ids, p in zip(prompt_ids, params)]
    return penalize(logits, t, token_counts(output_ids, V, device), token_counts(prompts, V, device) > 0)


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
    keys: DrawKeys,
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    output_ids: Optional[Sequence[Sequence[int]]] = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplerOutput:
    """Next token of each row of ``logits`` [B, V] (fp32), on the logits' device, and their log probabilities where a
    request asks for them; ``logits`` is not changed.

    ``keys``: per row, its request's seed and the output position it draws (the key of its noise).
    ``prompt_ids`` / ``output_ids``: each row's prompt and the tokens it has generated so far (read by the penalties
    and ``min_tokens``; None: none); ``eos_token_ids``: what ``min_tokens`` masks besides each row's stop ids.
    """
    B, V = logits.shape
    ks = [p.logprobs for p in params]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in ks) else None
    tokens, _ = _sample_rows(logits, params, keys, prompt_ids, output_ids, eos_token_ids, with_probs=False)
    if raw_logprobs is None:
        return SamplerOutput(tokens, None)
    return SamplerOutput(tokens, top_logprobs(raw_logprobs, tokens, max(k for k in ks if k is not None)))


class TargetDistributions(NamedTuple):
    tokens: torch.Tensor  # [R] int64: what ``sample`` would give each row (argmax for greedy rows, else one draw)
    probs: Optional[torch.Tensor]  # [R, V] fp32: the distributions those draws come from; None when all are greedy


def sample_with_probs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: DrawKeys,
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    output_ids: Optional[Sequence[Sequence[int]]] = None,
    eos_token_ids: Sequence[int] = (),
) -> TargetDistributions:
    """``sample``'s tokens (the same for the same keys; no logprobs) and, per row, the distribution a sampled row
    draws from: min_tokens masking, penalties, temperature, min_p, top-k and top-p applied, then softmax (a greedy
    row's is at temperature 1 and unused). What speculative verification compares drafts against
    (``rejection.verify``'s ``target_tokens`` and ``target_probs``)."""
    return TargetDistributions(*_sample_rows(logits, params, keys, prompt_ids, output_ids, eos_token_ids,
                                             with_probs=True))


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], keys: DrawKeys,
                 prompt_ids: Optional[Sequence[Sequence[int]]], output_ids: Optional[Sequence[Sequence[int]]],
                 eos_token_ids: Sequence[int], with_probs: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Steps 2-5 from host lists: min_tokens' mask, then ``choose`` with the penalties' counts made here."""
    B, V = logits.shape
    device = logits.device
    no_ids: list[list[int]] = [[] for _ in range(B)]
    prompt_ids = no_ids if prompt_ids is None else prompt_ids
    output_ids = no_ids if output_ids is None else output_ids
    logits = mask_stop_ids(logits, params, output_ids, eos_token_ids)
    steps = Steps.of(params, V)
    t = SamplingTensors.build(params, keys, V, device)
    counts = in_prompt = None
    if steps.penalties:
        counts = token_counts([ids if p.penalized else () for ids, p in zip(output_ids, params)], V, device)
        in_prompt = token_counts([ids if p.repetition_penalty != 1.0 else () for ids, p in zip(prompt_ids, params)],
                                 V, device) > 0
    return choose(logits, t, steps, counts, in_prompt, with_probs)


def choose(logits: torch.Tensor, t: SamplingTensors, steps: Steps, output_counts: Optional[torch.Tensor] = None,
           in_prompt: Optional[torch.Tensor] = None, with_probs: bool = False
           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Steps 3-5 on device tensors alone (what the decode sampler captures in a CUDA graph): the penalties where
    ``steps.penalties`` (``output_counts``, ``in_prompt``: see ``penalize``), the argmax for greedy rows, and for the
    others temperature, min_p, top-k, top-p and one draw. The tokens [R] int64 and, with ``with_probs`` and some
    row sampled, the distributions they are drawn from [R, V] (else None).

    The draw is argmax(p / E) with E ~ Exp(1) per vocabulary entry, an exact draw from p; E comes from the row's
    key (``kernels.philox``), so a request's tokens depend on its seed and position only: not on the rest of the
    batch, nor on whether the step ran eager or in a graph.
    """
    if steps.penalties:
        logits = penalize(logits, t, output_counts, in_prompt)
    tokens = logits.argmax(dim=-1)
    if not steps.sampled:
        return tokens, None
    probs = torch.softmax(_filtered(logits, t, steps), dim=-1)
    noise = exponential_noise(t.seeds, t.positions, logits.shape[1])
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(t.greedy.bool(), tokens, drawn), probs if with_probs else None


def _filtered(logits: torch.Tensor, t: SamplingTensors, steps: Steps) -> torch.Tensor:
    """Logits after temperature, min_p, top-k and top-p, -inf where dropped (greedy rows at temperature 1; their
    callers discard them)."""
    V = logits.shape[1]
    logits = logits / t.temperature[:, None]
    if steps.min_p:
        probs = torch.softmax(logits, dim=-1)
        floor = t.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if steps.top_k_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        keep = torch.arange(V, device=logits.device)[None, :] < t.top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
        sorted_p = torch.softmax(sorted_logits, dim=-1)
        # the mass before a token is under top_p (top_p = 1 keeps all: the cumulative sum may round past 1)
        keep &= (sorted_p.cumsum(dim=-1) - sorted_p < t.top_p[:, None]) | (t.top_p[:, None] >= 1)
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits.masked_fill(~keep,
                                                                                                    float("-inf")))
    return logits
