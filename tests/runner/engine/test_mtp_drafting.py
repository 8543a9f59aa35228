"""MTP drafting through the engine (``speculative=mtp``) on the tiny DeepSeek-V3 checkpoint, CPU, float32.

The drafts themselves must be the MTP layer's: every step's drafts (k = 3, chained on the layer's own output) equal
those of an independent torch reference (``mla_testing.mtp.Reference``, nothing shared with the runner's model code)
run from scratch over the request's tokens, through chunked prefill, preemption and prefix-cache hits; for one
request the draft logits too. Greedy generation with the drafts must give the tokens generation without them gives,
token for token, at k = 1, 2 and 3: batched with mixed prompt lengths and ``max_tokens``, under preemption, with
logprobs, with chunked prefill, and when a stop id, a stop string or EOS lands inside a run of accepted drafts.

The tiny checkpoint's MTP layer is random: its drafts are never accepted there. ``agreeing_ckpt`` is a copy whose MTP
layer agrees with its target about three times in four at draft 1 (a trained one agrees 85-90% of the time), so that
runs of accepted drafts occur: the target's attention and MLP outputs scaled by ``SHRINK`` (the residual stream, and
so the next token, is then mostly the current token's embedding), the MTP layer's eh_proj the identity on the
embedding plus ``SHRINK`` times its random weights on the hidden state, its shared_head.norm the target's final norm.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.errors import ConfigError
from mla_testing import INTERPRETER
from mla_testing.mtp import Reference, edit_tensors
from mla_testing.oracle import rel_err
from mla_testing.speculative import (
    check_same,
    completions,
    engines_by_k,
    greedy_params,
    record_steps,
    stop_string_for,
)

SHRINK = 0.03
MTP = "model.layers.3."  # the tiny checkpoint's MTP layer
_rng = random.Random(1)
PROMPTS = [[int(_rng.random() * 512) for _ in range(n)] for n in (10, 33, 47, 15)]
MAX_TOKENS = (24, 20, 24, 22)
# 6 pages of 16 tokens: the four requests preempt one another
SETTINGS = dict(attention="torch", dtype="float32", device="cpu", page_size=16, max_model_len=96, max_batch_size=8,
                num_pages=6, progress=False)
TOL = 1e-4  # draft logits against the fp32 reference; measured about 1e-6


def mtp(k: int, **more) -> dict:
    return {"speculative": "mtp", "speculative.num_tokens": k, **more}


@pytest.fixture(scope="module")
def agreeing_ckpt(dsv3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(shutil.copytree(dsv3_ckpt, tmp_path_factory.mktemp("agreeing") / "ckpt"))

    def edit(t: dict[str, torch.Tensor]) -> None:
        for name in t:
            if name.endswith(("o_proj.weight_scale_inv", "down_proj.weight_scale_inv")):  # FP8: scale the scales
                t[name] = t[name] * SHRINK
        w = t[MTP + "eh_proj.weight"].float()
        h = w.shape[0]
        t[MTP + "eh_proj.weight"] = torch.cat([torch.eye(h), SHRINK * w[:, h:]], dim=1).bfloat16()
        t[MTP + "shared_head.norm.weight"] = t["model.norm.weight"].clone()

    edit_tensors(root, edit)
    return root


def generate(llm: LLM, params: list[SamplingParams], prompts: list[list[int]] = PROMPTS):
    return completions(llm, params, prompts)


def greedy(logprobs: int | None = None) -> list[SamplingParams]:
    return greedy_params(MAX_TOKENS, logprobs)


@pytest.fixture(scope="module")
def baseline(agreeing_ckpt):
    llm = LLM(str(agreeing_ckpt), **SETTINGS)
    return llm, generate(llm, greedy(logprobs=2))


@pytest.fixture(scope="module")
def speculative(agreeing_ckpt):
    """Engines on the agreeing checkpoint by k, made once."""
    return engines_by_k(lambda k: LLM(str(agreeing_ckpt), **SETTINGS, **mtp(k)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_mtp_drafts_equals_greedy_without(baseline, speculative, k):
    """Four requests of 10 to 47 tokens, max_tokens 20 to 24, preempting one another; one asks for logprobs. Drafts
    are partly accepted, some steps emit several tokens, and every request stops at exactly its max_tokens."""
    llm = speculative(k)
    with record_steps(llm) as seen:
        outs = generate(llm, greedy(logprobs=2))
    stats = llm.engine.stats()
    check_same(outs, baseline[1])
    assert [len(o.token_ids) for o in outs] == list(MAX_TOKENS)
    assert stats["preemptions"] > 0
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]
    assert max(len(tokens) for s in seen.values() for _, tokens, _ in s) == k + 1
    assert all(len(drafts) <= k for s in seen.values() for _, _, drafts in s)
    assert stats["mean_acceptance_length"] == pytest.approx(
        1 + stats["num_accepted_tokens"] / stats["num_verify_steps"], abs=1e-4)
    assert stats["acceptance_rate"] == pytest.approx(stats["num_accepted_tokens"] / stats["num_draft_tokens"],
                                                     abs=1e-4)
    assert [f"acceptance_rate_{j}" in stats for j in (1, 2, 3, 4)] == [True, k > 1, k > 2, False]


@pytest.mark.parametrize("ckpt", ["dsv3_ckpt", "agreeing_ckpt"])
def test_drafts_equal_the_reference_through_chunks_preemption_and_prefix_hits(request, ckpt):
    """k = 3 with a 24-token budget (prompts in chunks beside decoding requests), six pages (preemption), then one of
    the prompts again (its pages from the prefix cache): every draft of every step equals the reference's chain.
    The random MTP layer drafts wrong every time (its cache then holds only the target's positions); the agreeing
    one has drafts accepted, so the first pass covers several positions of a verify step."""
    root = request.getfixturevalue(ckpt)
    llm = LLM(str(root), **SETTINGS, **mtp(3, max_num_batched_tokens=24))
    with record_steps(llm) as seen:
        generate(llm, greedy())
        generate(llm, greedy()[1:2], PROMPTS[1:2])
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0
    assert (stats["num_accepted_tokens"] > 0) == (ckpt == "agreeing_ckpt")
    reference = Reference(root)
    checked = 0
    for records in seen.values():
        for ids, _, drafts in records:
            if drafts:
                assert drafts == reference.drafts(ids, len(drafts))[0], f"after {len(ids)} tokens"
                checked += 1
    assert checked >= 30 and any(len(d) == 3 for r in seen.values() for *_, d in r)


def test_draft_logits_equal_the_reference(dsv3_ckpt):
    """One request at a time, k = 3, pages of 4 tokens, prompts in chunks of 8: the logits of every draft equal the
    reference's, one pass at a time. The first prompt (28 tokens) fills its 7 pages, so the chained passes after it
    run past the request's pages into the scratch pages. The second shares its first 24 tokens, then differs: it
    takes 5 pages from the prefix cache, not the sixth, whose MTP entry at its last position read the first prompt's
    25th token."""
    llm = LLM(str(dsv3_ckpt), **{**SETTINGS, "page_size": 4, "num_pages": 24}, **mtp(3, max_num_batched_tokens=8))
    head, logits = llm.engine.runner.model.mtp, []
    compute = head.compute_logits
    head.compute_logits = lambda y: logits.append(compute(y)) or logits[-1]
    try:
        with record_steps(llm) as seen:
            for prompt in (PROMPTS[2][:28], PROMPTS[2][:24] + PROMPTS[3][:6]):
                generate(llm, [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)], [prompt])
    finally:
        del head.compute_logits
    runner = llm.engine.runner
    assert runner.kv.mtp_cache[runner.num_pages + 1 :].any(), "no chained pass wrote a scratch page"
    assert llm.engine.scheduler.blocks.hits == 20
    reference = Reference(dsv3_ckpt)
    records = [(ids, drafts) for ids, _, drafts in seen[0] if drafts]
    # 3 drafts after each of the first 12 tokens, then as many as max_tokens leaves room for: 2, 1, none. A step
    # after a verify step runs all 3 passes (one fixed step: drafts past the room are dropped), none where no request
    # has room
    assert [len(d) for _, d in records] == ([3] * 12 + [2, 1]) * 2 and len(logits) == 2 * 14 * 3
    for ids, drafts in records:
        want_drafts, want_logits = reference.drafts(ids, len(drafts))
        got = torch.cat(logits[: len(drafts)])
        del logits[:3]
        assert drafts == want_drafts and rel_err(got, want_logits) < TOL, f"after {len(ids)} tokens"


def test_a_stop_inside_a_drafted_run_ends_at_that_token(baseline, speculative, monkeypatch):
    """A stop id, a stop string and EOS, each at a token the target emits at an accepted draft's position with more
    tokens of the same step after it: the request ends there, as it does without speculation, and the rest of the
    step's tokens are dropped. The position is found from a run of the same requests without a stop."""
    base_llm, llm = baseline[0], speculative(3)
    prompts, m = [PROMPTS[1]] * 2, MAX_TOKENS[1]
    plain = [SamplingParams(temperature=0.0, max_tokens=m)] * 2
    with record_steps(llm) as seen:
        ids = generate(llm, plain, prompts)[0].token_ids
    runs, done = [], 0  # the output positions of each step's tokens
    for _, tokens, _ in seen[0]:
        runs.append(range(done, done + len(tokens)))
        done += len(tokens)
    pos = next(p for run in runs if len(run) >= 3 for p in run[:-1]
               if p > run[0] and ids[p] not in ids[:p] and stop_string_for(llm, ids, p))
    token, stop = ids[pos], stop_string_for(llm, ids, pos)
    params = [SamplingParams(temperature=0.0, max_tokens=m, stop_token_ids=[token]),
              SamplingParams(temperature=0.0, max_tokens=m, stop=[stop])]
    expected = generate(base_llm, params, prompts)
    with record_steps(llm) as seen:
        got = generate(llm, params, prompts)
    check_same(got, expected)
    assert got[0].token_ids == ids[: pos + 1] and (got[0].finish_reason, got[0].stop_reason) == ("stop", token)
    assert got[1].stop_reason == stop and got[1].token_ids == ids[: pos + 1]
    for index in (0, 1):  # the step that ended it emitted more than it kept
        assert sum(len(tokens) for _, tokens, _ in seen[index]) > pos + 1

    for engine in (base_llm.engine, llm.engine):
        monkeypatch.setattr(engine, "eos_token_ids", {token})
    expected = generate(base_llm, plain[:1], prompts[:1])
    with record_steps(llm) as seen:
        got = generate(llm, plain[:1], prompts[:1])
    check_same(got, expected)
    assert got[0].token_ids == ids[: pos + 1] and (got[0].finish_reason, got[0].stop_reason) == ("stop", None)
    assert sum(len(tokens) for _, tokens, _ in seen[0]) > pos + 1


def test_chunked_prefill_with_mtp_equals_greedy_without(agreeing_ckpt):
    """A 16-token budget: every prompt but the shortest in chunks, beside requests that decode and verify."""
    chunked = {**SETTINGS, "max_num_batched_tokens": 16}
    expected = generate(LLM(str(agreeing_ckpt), **chunked), greedy())
    llm = LLM(str(agreeing_ckpt), **chunked, **mtp(2))
    check_same(generate(llm, greedy()), expected)
    assert llm.engine.stats()["num_accepted_tokens"] > 0


def test_sampling_with_mtp_drafts(baseline, speculative, agreeing_ckpt):
    """At top_k = 1 the target distribution is one-hot at its argmax, so rejection sampling of the one-hot drafts
    gives greedy's tokens; a seeded request samples the same tokens alone, again, and beside another (in a cache
    that holds both with their drafts: drafts cut for want of pages would draw from its generator otherwise)."""
    one_hot = generate(speculative(2), [SamplingParams(temperature=1.0, top_k=1, max_tokens=m) for m in MAX_TOKENS])
    assert [o.token_ids for o in one_hot] == [o.token_ids for o in baseline[1]]
    llm = LLM(str(agreeing_ckpt), **{**SETTINGS, "num_pages": 12}, **mtp(2))
    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=7)
    alone = generate(llm, [seeded], PROMPTS[2:3])[0].token_ids
    again = generate(llm, [seeded], PROMPTS[2:3])[0].token_ids
    beside = generate(llm, [SamplingParams(temperature=1.0, max_tokens=6), seeded], PROMPTS[1:3])[1].token_ids
    assert alone == again == beside and len(alone) == 12


@pytest.mark.parametrize("kind", ["fp8", "fp8_ds_mla"])
def test_an_fp8_cache_holds_the_mtp_layer_too(agreeing_ckpt, kind):
    """The MTP layer's slice of the cache takes the run's layout (and for fp8 its own per-tensor scale), its bytes
    counted with the main layers'; greedy with drafts equals greedy without over the same FP8 cache."""
    settings = {**SETTINGS, "kv_cache_dtype": kind, "num_pages": 12}
    params = [SamplingParams(temperature=0.0, max_tokens=8)] * 2
    expected = generate(LLM(str(agreeing_ckpt), **settings), params, PROMPTS[:2])
    llm = LLM(str(agreeing_ckpt), **settings, **mtp(2))
    runner = llm.engine.runner
    attn = runner.model.mtp.block.self_attn
    assert attn.kv_cache.data_ptr() == runner.kv.mtp_cache.data_ptr() and attn.kv_layout == runner.kv.layout
    cache = runner.kv.mtp_cache
    assert (cache.dtype, cache.shape[1:]) == (runner.kv.cache.dtype, runner.kv.cache.shape[2:])
    assert (attn.kv_scale is not None) == (kind == "fp8") and runner.resolved["kv_bytes_per_token"] == 4 * (
        runner.kv.layout.bytes_per_token)
    check_same(generate(llm, params, PROMPTS[:2]), expected)


def test_the_mtp_layers_cache_and_its_scratch_pages(dsv3_ckpt):
    """One slice more than the three main layers' (the same pages and slots), then one scratch page per batch slot
    for k = 3 over pages of 16 (the chained passes write 2 positions past the target's)."""
    llm = LLM(str(dsv3_ckpt), **SETTINGS, **mtp(3))
    runner = llm.engine.runner
    pages = runner.num_pages + 1
    assert runner.kv.cache.shape[:2] == (3, pages) and runner.kv.mtp_cache.shape[0] == pages + 8
    assert runner.kv.pool.shape[0] == 3 * pages + pages + 8
    assert runner.model.mtp.block.self_attn.kv_cache.data_ptr() == runner.kv.pool[3 * pages].data_ptr()
    assert runner.graphs is None and runner.resolved["kv_bytes_per_token"] == 4 * 40 * 4  # 4 layers, 40 fp32 values


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")
def test_triton_mtp_steps_equal_greedy_without_drafts(baseline, agreeing_ckpt):
    """The target's verify steps and the MTP layer's passes through the Triton kernel (the interpreter), with their
    absorbed chunk metadata: two requests, k = 3; greedy as without drafts, the drafts the reference's."""
    llm = LLM(str(agreeing_ckpt), **{**SETTINGS, "attention": "triton", "num_pages": 12}, **mtp(3))
    with record_steps(llm) as seen:
        outs = generate(llm, [SamplingParams(temperature=0.0, max_tokens=m) for m in (10, 4)], PROMPTS[2:0:-1])
    assert [o.token_ids for o in outs] == [baseline[1][2].token_ids[:10], baseline[1][1].token_ids[:4]]
    assert llm.engine.stats()["num_accepted_tokens"] > 0
    reference = Reference(agreeing_ckpt)
    for ids, _, drafts in (r for records in seen.values() for r in records if r[2]):
        assert drafts == reference.drafts(ids, len(drafts))[0]


def test_mtp_needs_an_mtp_layer(kimi_ckpt):
    with pytest.raises(ConfigError, match=r"^speculative=mtp needs a model with an MTP layer and .* has none"):
        LLM(str(kimi_ckpt), dtype="float32", device="cpu", speculative="mtp", progress=False)
