"""Helpers of the engine's speculative-decoding tests (n-gram and MTP drafting): engines by number of drafts,
completions, greedy settings, the comparison of two runs' outputs, a recorder of each step's tokens and drafts, a stop
string ending at a token."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import pytest

from mla_runner import LLM, SamplingParams


def engines_by_k(make: Callable[[int], LLM]) -> Callable[[int], LLM]:
    """``make(k)``'s engine for each number of drafts k, made on first use and kept (a module fixture's value)."""
    made: dict[int, LLM] = {}

    def get(k: int) -> LLM:
        if k not in made:
            made[k] = make(k)
        return made[k]
    return get


def completions(llm: LLM, params: list[SamplingParams], prompts: list[list[int]]):
    """The first completion of each prompt (given as token ids)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [out.outputs[0] for out in outs]


def greedy_params(max_tokens: Sequence[int], logprobs: int | None = None) -> list[SamplingParams]:
    """Greedy settings, one per ``max_tokens``; the second request asks for ``logprobs``."""
    return [SamplingParams(temperature=0.0, max_tokens=m, logprobs=logprobs if i == 1 else None)
            for i, m in enumerate(max_tokens)]


def check_same(got, expected) -> None:
    """Two runs' completions are the same: tokens, finish and stop reasons, text, and logprobs (the emitted token
    first, then the top k, with their ranks; values within 1e-4)."""
    for a, b in zip(got, expected):
        assert (a.token_ids, a.finish_reason, a.stop_reason, a.text) == (b.token_ids, b.finish_reason,
                                                                         b.stop_reason, b.text)
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or (), b.logprobs or ()):
            assert list(x) == list(y)
            assert [v.logprob for v in x.values()] == pytest.approx([v.logprob for v in y.values()], abs=1e-4)
            assert [v.rank for v in x.values()] == [v.rank for v in y.values()]


@contextmanager
def record_steps(llm: LLM):
    """Per request index, each step that emitted tokens as (the request's tokens through the last emitted one, the
    tokens the step emitted, the drafts it made for the next step: none without MTP drafting)."""
    runner, seen = llm.engine.runner, defaultdict(list)
    execute = runner.execute

    def recording(batch):
        out = execute(batch)
        for req, tokens, drafts in zip(batch.requests, out.tokens, out.drafts):
            if tokens:
                seen[req.index].append((req.token_ids + tokens, tokens, drafts))
        return out

    runner.execute = recording
    try:
        yield seen
    finally:
        del runner.execute


def stop_string_for(llm: LLM, ids: list[int], pos: int) -> str | None:
    """A string whose first occurrence in the text of ``ids`` ends inside token ``pos``'s text."""
    text, before = llm.engine.detokenize(ids, False), llm.engine.detokenize(ids[:pos], False)
    upto = llm.engine.detokenize(ids[: pos + 1], False)
    for width in (1, 2, 3, 4):
        stop = upto[-width:]
        if len(upto) > len(before) and text.startswith(upto) and text.find(stop) == len(upto) - width:
            return stop
    return None
