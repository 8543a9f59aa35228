"""Prompt logprobs (``SamplingParams.prompt_logprobs``): which positions of a step give them, and their values.

The logits at prompt position i give the logprob of prompt token i + 1. A step computes a request's positions
[num_computed, num_computed + num_new); of those, the ones whose logprobs the request asks for and does not have yet
(a preempted request computes its prompt again) are turned into logits ``PROMPT_LOGPROB_ROWS`` at a time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mla_runner.engine.request import Request
from mla_runner.engine.sampler import TokenLogprobs, top_logprobs
from mla_runner.engine.scheduler import ScheduledBatch

# Prompt positions whose logits one pass makes: [rows, vocab] fp32, 0.5 GiB at DeepSeek-V3's vocabulary, however
# long the step's chunks are.
PROMPT_LOGPROB_ROWS = 1024


def prompt_logprob_rows(batch: ScheduledBatch) -> tuple[list[int], list[int], list[int]]:
    """The prompt positions of this step whose logits give a prompt token's logprobs, where a request asks for them
    and has not had them: their rows in the step's hidden states (each request's new tokens in turn), the prompt token
    after each, and its request's index."""
    rows, targets, owners, offset = [], [], [], 0
    for i, (req, n) in enumerate(zip(batch.requests, batch.num_new)):
        if req.prompt_logprobs is not None:
            start, prompt = req.num_computed, req.prompt_token_ids
            lo, hi = max(start, len(req.prompt_logprobs) - 1), min(start + n, len(prompt) - 1)
            rows += range(offset + lo - start, offset + hi - start)
            targets += prompt[lo + 1 : hi + 1]
            owners += [i] * max(0, hi - lo)
        offset += n
    return rows, targets, owners


def prompt_logprobs(logits_of: Callable[[int, int], torch.Tensor], targets: list[int], owners: list[int],
                    reqs: list[Request], device: torch.device) -> list[list[TokenLogprobs]]:
    """Per request, the logprobs of its prompt tokens ``targets`` (in order); ``logits_of(lo, hi)`` gives the logits
    of positions [lo, hi) of them."""
    ks = [reqs[i].params.prompt_logprobs for i in owners]
    k, target = max(ks), torch.tensor(targets, device=device)
    out: list[list[TokenLogprobs]] = [[] for _ in reqs]
    for lo in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        hi = min(lo + PROMPT_LOGPROB_ROWS, len(targets))
        logprobs = torch.log_softmax(logits_of(lo, hi).float(), dim=-1)
        for owner, entry in zip(owners[lo:hi], top_logprobs(logprobs, target[lo:hi], k).to_host(ks[lo:hi])):
            out[owner].append(entry)
    return out
