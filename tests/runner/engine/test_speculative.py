"""Speculative decoding through the engine (``speculative=ngram``) on the tiny DeepSeek-V3 checkpoint, CPU, float32.

Greedy generation with drafts must give the tokens generation without them gives, token for token: batched, with
mixed prompt lengths and ``max_tokens``, under preemption, with logprobs, and when a stop id, a stop string or EOS
lands inside a run of accepted drafts (the tokens after it are dropped). Forced acceptance must give the configured
acceptance, and the statistics must report it; seeded sampling must repeat and not depend on the batch.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.config import SpeculativeConfig
from mla_runner.engine import llm_engine
from mla_runner.errors import ConfigError
from mla_testing import INTERPRETER
from mla_testing.speculative import (
    check_same,
    completions,
    engines_by_k,
    greedy_params,
    record_steps,
    stop_string_for,
)

# Prompts of 5 to 97 tokens that repeat a pattern (periods 2, 4, 7, and none), so that prompt lookup drafts; chosen,
# out of 32 random ones, for outputs on which prompt lookup's drafts are partly accepted.
PATTERNS = ((5, [197, 122]), (40, [119, 55, 363, 165]), (97, [130, 353, 345, 255, 430, 8, 111]),
            (23, [411, 459, 369, 75, 490, 249, 465, 117, 135, 120, 69, 279, 354, 172, 489, 70, 448, 80, 432, 287, 69,
                  272, 452]))
MAX_TOKENS = (16, 12, 16, 14)
# Small enough that the four requests preempt one another (10 pages of 16 tokens).
SETTINGS = dict(attention="torch", dtype="float32", device="cpu", page_size=16, max_model_len=160,
                max_batch_size=8, num_pages=10, progress=False)


def ngram(k: int, **more) -> dict:
    return {"speculative": "ngram", "speculative.num_tokens": k, "speculative.prompt_lookup_min": 1,
            "speculative.prompt_lookup_max": 3, **more}


PROMPTS = [(pattern * (n // len(pattern) + 1))[:n] for n, pattern in PATTERNS]


def generate(llm: LLM, params: list[SamplingParams], prompts: list[list[int]] = PROMPTS):
    return completions(llm, params, prompts)


def greedy(logprobs: int | None = None) -> list[SamplingParams]:
    return greedy_params(MAX_TOKENS, logprobs)


@pytest.fixture(scope="module")
def baseline(dsv3_ckpt):
    llm = LLM(str(dsv3_ckpt), **SETTINGS)
    return llm, generate(llm, greedy(logprobs=2))


@pytest.fixture(scope="module")
def speculative(dsv3_ckpt):
    """Engines by k, made once."""
    return engines_by_k(lambda k: LLM(str(dsv3_ckpt), **SETTINGS, **ngram(k)))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_drafts_equals_greedy_without(baseline, speculative, k):
    """Four requests of 5 to 97 tokens, max_tokens 12 to 16, preempting one another; one asks for logprobs."""
    llm = speculative(k)
    outs, stats = generate(llm, greedy(logprobs=2)), llm.engine.stats()
    check_same(outs, baseline[1])
    assert [len(o.token_ids) for o in outs] == list(MAX_TOKENS)  # drafts never run past max_tokens
    assert stats["preemptions"] > 0
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]
    assert stats["mean_acceptance_length"] == pytest.approx(
        1 + stats["num_accepted_tokens"] / stats["num_verify_steps"], abs=1e-4)
    assert stats["acceptance_rate"] == pytest.approx(stats["num_accepted_tokens"] / stats["num_draft_tokens"],
                                                     abs=1e-4)
    assert [f"acceptance_rate_{j}" in stats for j in (1, 2, 3, 4)] == [True, k > 1, k > 2, False]


def oracle(continuations: dict[tuple[int, ...], list[int]], wrong_at: tuple[int, ...] = ()):
    """A stand-in for prompt lookup (``llm_engine.ngram_propose``): for a request whose prompt is a key, the drafts
    are its greedy continuation (known from the run without speculation), but for a wrong token at the output
    positions ``wrong_at``; no drafts for other requests. Every draft is then accepted but the wrong ones, so the
    steps' runs are known."""
    def propose(tokens, k, n_min, n_max):
        tokens = tokens.tolist()
        for prompt, continuation in continuations.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                return [(t + 1) % 512 if done + j in wrong_at else t
                        for j, t in enumerate(continuation[done : done + k])]
        return []
    return propose


def test_a_stop_inside_a_drafted_run_ends_at_that_token(baseline, speculative, monkeypatch):
    """A stop id, a stop string and EOS, each at a token the target emits at an accepted draft's position with more
    drafts accepted after it: the request ends there, as it does without speculation, and the rest of the step's
    tokens are dropped. The drafts are the known greedy continuation (``oracle``), so with k = 3 the steps
    emit output positions 0 (the prompt's step), 1-4, 5-8, ...; the stop is the first position of such a run whose
    token first occurs there."""
    base_llm, llm = baseline[0], speculative(3)
    ids, m = baseline[1][0].token_ids, MAX_TOKENS[0]
    pos = next(p for p in range(1, m) if p % 4 != 0 and ids[p] not in ids[:p] and stop_string_for(llm, ids, p))
    token, stop = ids[pos], stop_string_for(llm, ids, pos)
    prompts = [PROMPTS[0]] * 2
    params = [SamplingParams(temperature=0.0, max_tokens=m, stop_token_ids=[token]),
              SamplingParams(temperature=0.0, max_tokens=m, stop=[stop])]
    expected = generate(base_llm, params, prompts)
    monkeypatch.setattr(llm_engine, "ngram_propose", oracle({tuple(PROMPTS[0]): ids}))
    with record_steps(llm) as seen:
        got = generate(llm, params, prompts)
    check_same(got, expected)
    assert got[0].token_ids == ids[: pos + 1] and (got[0].finish_reason, got[0].stop_reason) == ("stop", token)
    assert got[1].stop_reason == stop and got[1].token_ids == ids[: pos + 1]
    for index in (0, 1):  # the step that ended it emitted more than it kept
        assert sum(len(emitted) for _, emitted, _ in seen[index]) > pos + 1

    engines = (base_llm.engine, llm.engine)
    saved = [e.eos_token_ids for e in engines]
    try:
        for e in engines:
            e.eos_token_ids = {token}
        plain = [SamplingParams(temperature=0.0, max_tokens=m)]
        expected = generate(base_llm, plain, prompts[:1])
        with record_steps(llm) as seen:
            got = generate(llm, plain, prompts[:1])
    finally:
        for e, eos in zip(engines, saved):
            e.eos_token_ids = eos
    check_same(got, expected)
    assert got[0].token_ids == ids[: pos + 1] and (got[0].finish_reason, got[0].stop_reason) == ("stop", None)
    assert sum(len(emitted) for _, emitted, _ in seen[0]) > pos + 1


@pytest.mark.parametrize("k,length", [(1, 1.8), (3, 2.5)])
def test_forced_acceptance_length(dsv3_ckpt, monkeypatch, k, length):
    """Every step drafts k tokens (a stand-in drafter: forced acceptance ignores what they are), fewer only where
    max_tokens is near.

    k = 1: every drafting step drafted 1, so the mean acceptance length is L in expectation; it must be within 4
    standard errors (sqrt(0.16 / steps)). k = 3, L = 2.5: each step accepts 1 or 2 drafts, half the time each, at
    most what it drafted: draft 1 is always accepted, draft 3 never, draft 2 half the time (within 4 standard
    errors), and the mean is 1 + (steps with >= 1 draft + half those with >= 2) / steps, as closely."""
    monkeypatch.setattr(llm_engine, "ngram_propose", lambda tokens, room, n_min, n_max: [7] * room)
    llm = LLM(str(dsv3_ckpt), **SETTINGS, **ngram(k, **{"speculative.force_acceptance_length": length}))
    outs = generate(llm, [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)] * 8,
                    [p[:8] for p in PROMPTS] * 2)
    assert all(len(o.token_ids) == 32 for o in outs)
    s = llm.engine.stats()
    steps = s["num_verify_steps"]
    assert steps >= 80
    if k == 1:
        assert abs(s["mean_acceptance_length"] - length) < 4 * math.sqrt(0.8 * 0.2 / steps)
        assert s["acceptance_rate_1"] == pytest.approx(s["mean_acceptance_length"] - 1, abs=1e-3)
    else:
        drafted = llm.engine.runner.verifier.stats.counts()[0]
        assert (s["acceptance_rate_1"], s["acceptance_rate_3"]) == (1.0, 0.0)
        assert abs(s["acceptance_rate_2"] - 0.5) < 4 * math.sqrt(0.25 / drafted[1])
        expected = 1 + (drafted[0] + 0.5 * drafted[1]) / steps
        assert abs(s["mean_acceptance_length"] - expected) < 4 * math.sqrt(0.25 * drafted[1]) / steps


def test_sampling_with_drafts(baseline, speculative):
    """Sampling verifies by rejection sampling: at top_k=1 its distribution is one-hot at the argmax, so the tokens
    are greedy's; a seeded request samples the same tokens alone, again, and beside others."""
    llm = speculative(3)
    before = llm.engine.stats()["num_verify_steps"]
    one_hot = generate(llm, [SamplingParams(temperature=1.0, top_k=1, max_tokens=m) for m in MAX_TOKENS])
    assert [o.token_ids for o in one_hot] == [o.token_ids for o in baseline[1]]
    assert llm.engine.stats()["num_verify_steps"] > before

    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=7)
    alone = generate(llm, [seeded], PROMPTS[2:3])[0].token_ids
    again = generate(llm, [seeded], PROMPTS[2:3])[0].token_ids
    beside = generate(llm, [SamplingParams(temperature=1.0, max_tokens=6), seeded], PROMPTS[1:3])[1].token_ids
    assert alone == again == beside and len(alone) == 12


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")
def test_triton_verify_steps_equal_greedy_without_drafts(baseline, dsv3_ckpt, monkeypatch):
    """The verify step through the Triton kernel (the interpreter), its absorbed chunk metadata with per-request
    q_len: one request verifying 3 drafts a step (one of them wrong) beside one decoding without drafts."""
    expected = [baseline[1][3].token_ids, baseline[1][0].token_ids]
    monkeypatch.setattr(llm_engine, "ngram_propose", oracle({tuple(PROMPTS[3]): expected[0]}, wrong_at=(6,)))
    llm = LLM(str(dsv3_ckpt), **{**SETTINGS, "attention": "triton", "num_pages": 40}, **ngram(3))
    outs = generate(llm, [SamplingParams(temperature=0.0, max_tokens=m) for m in (12, 3)], [PROMPTS[3], PROMPTS[0]])
    assert [o.token_ids for o in outs] == [expected[0][:12], expected[1][:3]]
    s = llm.engine.stats()
    assert 0 < s["num_accepted_tokens"] < s["num_draft_tokens"]


def test_a_backend_without_absorbed_q_len_over_1_is_refused():
    cfg = SimpleNamespace(speculative=SpeculativeConfig(method="ngram"), attention=SimpleNamespace(name="flashmla"),
                          metadata=SimpleNamespace(strategy="persistent"))
    with pytest.raises(ConfigError, match="q_len > 1 in absorbed form, which attention=flashmla does not run"):
        llm_engine.check_speculative_engine(cfg, torch.device("cuda"))
