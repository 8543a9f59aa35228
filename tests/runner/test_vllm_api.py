"""vLLM's offline API on the tiny DeepSeek-V3 checkpoint: a vLLM-style script runs unchanged, and each vLLM field
(stop ids, min_tokens, max_tokens=None, stop strings on special tokens, generation_config.json, Hub ids, n, the
penalties, logprobs and prompt logprobs) against a plain reference: the same prompt generated with none of them, or
transformers' model on the whole sequence (``dsv3_oracle``)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.compose import compose_config
from mla_runner.config import GenerateTaskConfig
from mla_runner.errors import ConfigError, UserError
from mla_runner.prompts import encode_chat, parse_prompt
from mla_runner.tasks.generate import _requests, _result, run_generate

PROMPT = [273, 56, 93, 175]  # greedy on the tiny DeepSeek-V3 reaches EOS (id 1) at its 9th token
LONG = torch.randint(2, 500, (30,), generator=torch.Generator().manual_seed(2)).tolist()  # prompt logprobs' prompt
N = 12  # tokens of the reference
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(dsv3_ckpt):
    return LLM(model=str(dsv3_ckpt), tokenizer=str(dsv3_ckpt), trust_remote_code=True, dtype="float32", seed=0,
               max_model_len=128, max_num_seqs=8, gpu_memory_utilization=0.5, enforce_eager=True,
               tensor_parallel_size=1, quantization=None, kv_cache_dtype="auto", enable_prefix_caching=True,
               max_num_batched_tokens=256, block_size=16, device="cpu", progress=False)


@pytest.fixture(scope="module")
def ref(llm) -> list[int]:
    """The plain greedy continuation of PROMPT, through its first EOS and beyond."""
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=N, **GREEDY), use_tqdm=False)
    return out[0].outputs[0].token_ids


def first_at(ref: list[int], ids: set[int], start: int = 0) -> int:
    return next(i for i in range(start, len(ref)) if ref[i] in ids)


def new_token(ref: list[int], after: int) -> int:
    """An index past ``after`` whose token appears there first (not EOS)."""
    return next(i for i in range(after + 1, len(ref)) if ref[i] not in ref[:i] and ref[i] != 1)


def run(llm: LLM, params: list[SamplingParams], prompt=None):
    prompts = [prompt or {"prompt_token_ids": PROMPT}] * len(params)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@torch.no_grad()
def log_softmax_of(oracle, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ``ids``, in one forward over the whole sequence."""
    return torch.log_softmax(oracle(torch.tensor([ids])).logits[0].double(), -1)


@torch.no_grad()
def oracle_greedy(oracle, prompt: list[int], max_tokens: int, banned: set[int] = frozenset(), min_tokens: int = 0,
                  stop: set[int] = frozenset()) -> list[int]:
    """transformers' greedy continuation, from scratch each token: ``banned`` masked out while fewer than
    ``min_tokens`` are out, a token of ``stop`` ends it from min_tokens on."""
    out: list[int] = []
    while len(out) < max_tokens:
        logits = oracle(torch.tensor([prompt + out])).logits[0, -1]
        if len(out) < min_tokens:
            logits[list(banned)] = float("-inf")
        out.append(int(logits.argmax()))
        if out[-1] in stop and len(out) >= min_tokens:
            break
    return out


def assert_logprobs(entry: dict, logprobs: torch.Tensor, token: int, k: int, tok) -> None:
    """One position's {token id: Logprob}: the chosen token first, then the k most likely, each with its logprob,
    rank and text as ``logprobs`` (the reference's log-softmax at that position) gives them."""
    order = logprobs.argsort(descending=True).tolist()
    assert next(iter(entry)) == token and set(entry) == {token, *order[:k]}
    for t, p in entry.items():
        assert p.logprob == pytest.approx(float(logprobs[t]), abs=1e-4)
        assert (p.rank, p.decoded_token) == (order.index(t) + 1, tok.decode([t]))


def test_a_vllm_script_runs_unchanged(llm):
    assert (llm.config.max_batch_size, llm.config.page_size, llm.config.cuda_graphs) == (8, 16, False)
    assert (llm.config.kv_cache_memory_fraction, llm.config.model.trust_remote_code) == (0.5, True)
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer and llm.get_default_sampling_params() == SamplingParams()
    params = SamplingParams(temperature=0.0, top_p=0.95, max_tokens=3, min_tokens=1, stop_token_ids=[],
                            skip_special_tokens=True, include_stop_str_in_output=False, ignore_eos=True)
    outputs = llm.generate(["Hello, my name is", "The capital of France is"], params)
    for i, output in enumerate(outputs):
        c = output.outputs[0]
        assert (output.request_id, output.finished, c.finish_reason, c.stop_reason) == (str(i), True, "length", None)
        assert output.prompt_token_ids == tok(output.prompt).input_ids and len(c.token_ids) == 3
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.cumulative_logprob is None and c.logprobs is None and output.prompt_logprobs is None
        m = output.metrics
        assert m.arrival_time <= m.first_token_time <= m.last_token_time
        assert output.time_to_first_token == m.time_to_first_token == m.first_token_time - m.arrival_time
        assert output.latency == m.last_token_time - m.arrival_time
        assert m.time_per_output_token == pytest.approx((m.last_token_time - m.first_token_time) / 2)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    one = llm.chat(conversation, params, use_tqdm=False)
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and one[0].prompt == text
    assert one[0].prompt_token_ids == tok(text, add_special_tokens=False).input_ids
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ suffix }}"
    two = llm.chat([conversation, conversation[:2]], params, use_tqdm=False, chat_template=template,
                   chat_template_kwargs={"suffix": "A:"})
    assert [o.prompt for o in two] == ["Be brief.|Hi|Hello.|Bye|A:", "Be brief.|Hi|A:"]
    same = llm.generate({"prompt_token_ids": tok(two[0].prompt, add_special_tokens=False).input_ids}, params)
    assert two[0].outputs[0].token_ids == same[0].outputs[0].token_ids
    every = SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, seed=1, max_tokens=4, min_tokens=2,
                           stop=["zzz"], stop_token_ids=[7], ignore_eos=False, presence_penalty=0.5,
                           frequency_penalty=0.5, repetition_penalty=1.1, logprobs=2, prompt_logprobs=1,
                           skip_special_tokens=False, include_stop_str_in_output=True)
    for output in llm.generate(["Hello, my name is", "The capital of France is"], every):
        assert [c.index for c in output.outputs] == [0, 1] and output.finished
        assert len(output.prompt_logprobs) == len(output.prompt_token_ids) and output.prompt_logprobs[0] is None
        for c in output.outputs:
            assert len(c.logprobs) == len(c.token_ids) and 2 <= len(c.token_ids) <= 4
            assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))


def test_stop_token_ids_and_min_tokens(llm, ref, dsv3_oracle):
    """Below min_tokens the stop id and EOS are masked out of the logits (under ignore_eos too, as in vLLM): the
    reference is transformers' greedy with them masked."""
    k = new_token(ref, 2)
    t = ref[k]
    outs = run(llm, [SamplingParams(max_tokens=N, stop_token_ids=[t], **GREEDY),
                     SamplingParams(max_tokens=N, stop_token_ids=[t], include_stop_str_in_output=True, **GREEDY),
                     SamplingParams(max_tokens=N, stop_token_ids=[t], min_tokens=k + 2, **GREEDY)])
    decode = llm.tokenizer.decode
    assert (outs[0].token_ids, outs[0].finish_reason, outs[0].stop_reason) == (ref[: k + 1], "stop", t)
    assert outs[0].text == decode(ref[:k], skip_special_tokens=True)
    assert outs[1].text == decode(ref[: k + 1], skip_special_tokens=True)
    masked = oracle_greedy(dsv3_oracle, PROMPT, N, banned={t, 1}, min_tokens=k + 2, stop={t})
    assert masked[:k] == ref[:k] and masked[k] != t and t not in masked[: k + 1] and 1 not in masked[: k + 2]
    expect = (masked, "stop", t) if masked[-1] == t else (masked, "length", None)
    assert (outs[2].token_ids, outs[2].finish_reason, outs[2].stop_reason) == expect


def test_min_tokens_masks_what_would_be_sampled(llm, ref):
    """At a low temperature nearly every sample starts with the greedy token (0.23 above the next logit); made a stop
    id under min_tokens=1, none can."""
    first = ref[0]
    free = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=16, temperature=0.02, seed=0, max_tokens=1),
                        use_tqdm=False)[0]
    masked = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=16, temperature=0.02, seed=0, max_tokens=1,
                                                                      min_tokens=1, stop_token_ids=[first]),
                          use_tqdm=False)[0]
    assert sum(c.token_ids == [first] for c in free.outputs) >= 12
    assert all(c.token_ids[0] != first for c in masked.outputs)


def test_eos_stop_strings_on_special_tokens_and_min_tokens(llm, ref, dsv3_oracle):
    tok = llm.tokenizer
    e = ref.index(tok.eos_token_id)
    text = tok.decode(ref[:e], skip_special_tokens=True)
    stop = text[5:8]
    cut = text.find(stop)
    outs = run(llm, [SamplingParams(temperature=0.0, max_tokens=N),
                     SamplingParams(max_tokens=N, stop=[tok.eos_token], **GREEDY),
                     SamplingParams(max_tokens=N, stop=[tok.eos_token], skip_special_tokens=False,
                                    include_stop_str_in_output=True, **GREEDY),
                     SamplingParams(max_tokens=N, stop=[stop], include_stop_str_in_output=True, **GREEDY),
                     SamplingParams(temperature=0.0, max_tokens=e + 3, min_tokens=e + 2)])
    assert (outs[0].token_ids, outs[0].finish_reason, outs[0].stop_reason) == (ref[: e + 1], "stop", None)
    assert (outs[1].token_ids, outs[1].text, outs[1].stop_reason) == (ref[: e + 1], text, tok.eos_token)
    assert outs[2].text == tok.decode(ref[: e + 1], skip_special_tokens=False) and outs[2].text.endswith(tok.eos_token)
    assert (outs[3].text, outs[3].stop_reason, outs[3].finish_reason) == (text[: cut + len(stop)], stop, "stop")
    masked = oracle_greedy(dsv3_oracle, PROMPT, e + 3, banned={1}, min_tokens=e + 2, stop={1})
    assert masked[:e] == ref[:e] and 1 not in masked[: e + 2]  # EOS at e is masked out
    assert outs[4].token_ids == masked


def test_max_tokens_none_stops_at_the_context(llm):
    ids = torch.randint(2, 500, (112,), generator=torch.Generator().manual_seed(1)).tolist()
    out = run(llm, [SamplingParams(max_tokens=None, **GREEDY)], {"prompt_token_ids": ids})[0]
    assert (len(out.token_ids), out.finish_reason) == (128 - 112, "length")


def test_mtp_speculative_config_drafts_with_the_mtp_layer(dsv3_ckpt, kimi_ckpt, ref):
    """vLLM's ``deepseek_mtp`` method: the MTP layer drafts 2 tokens a step and greedy gives the plain reference;
    a model without an MTP layer is a one-line config error."""
    llm = LLM(str(dsv3_ckpt), dtype="float32", device="cpu", progress=False, max_model_len=128,
              speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 2})
    assert (llm.config.speculative.method, llm.config.speculative.num_tokens) == ("mtp", 2)
    assert run(llm, [SamplingParams(max_tokens=N, **GREEDY)])[0].token_ids == ref
    assert llm.engine.stats()["num_draft_tokens"] >= 2 * (N - 3)
    with pytest.raises(ConfigError, match="^speculative=mtp needs a model with an MTP layer") as info:
        LLM(str(kimi_ckpt), dtype="float32", device="cpu", progress=False,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    assert "\n" not in str(info.value)


def test_max_model_len_none_is_the_model_context_capped_by_the_kv_cache(dsv3_ckpt):
    """vLLM's default: the model's max_position_embeddings (5120 for the tiny model), here capped by a KV cache of
    8 pages of 16 tokens."""
    small = LLM(str(dsv3_ckpt), dtype="float32", device="cpu", block_size=16, num_pages=8, progress=False)
    assert small.config.max_model_len == small.engine.runner.resolved["max_model_len"] == 128
    with pytest.raises(UserError, match="has 128 tokens, max_model_len=128 leaves no room"):
        small.generate({"prompt_token_ids": [5] * 128}, use_tqdm=False)


def test_n_samples_are_seeded_distinct_and_each_its_own_request(llm):
    """Sample i of a seeded request draws from seed + i (vLLM's): the samples differ, a rerun repeats them, and each
    equals a request of its own with that seed."""
    params = SamplingParams(n=3, seed=11, temperature=1.0, max_tokens=4, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out[0].outputs]
    assert len({tuple(t) for t in samples}) == 3
    again = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples
    alone = run(llm, [dataclasses.replace(params, n=1, seed=11 + i) for i in range(3)])
    assert [c.token_ids for c in alone] == samples
    unseeded = llm.generate({"prompt_token_ids": PROMPT}, dataclasses.replace(params, seed=None), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in unseeded.outputs}) == 3


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(llm, dsv3_oracle):
    """Sampled with penalties and top-k, the logprobs are still those of the raw model: transformers' log-softmax of
    the whole sequence at each position, for the sampled or prompt token, its rank and the top k."""
    params = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, seed=3, max_tokens=6, logprobs=4,
                            prompt_logprobs=3, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": LONG}, params, use_tqdm=False)[0]
    c, tok, P = out.outputs[0], llm.tokenizer, len(LONG)
    full = log_softmax_of(dsv3_oracle, LONG + c.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == P
    for j in range(1, P):
        assert_logprobs(out.prompt_logprobs[j], full[j - 1], LONG[j], 3, tok)
    assert len(c.logprobs) == len(c.token_ids) == 6
    for i, token in enumerate(c.token_ids):
        assert_logprobs(c.logprobs[i], full[P - 1 + i], token, 4, tok)
    expected = sum(float(full[P - 1 + i, t]) for i, t in enumerate(c.token_ids))
    assert math.isclose(c.cumulative_logprob, expected, abs_tol=1e-3)


def test_prompt_logprobs_in_chunks_and_in_one_token_steps(llm, monkeypatch):
    """The prompt computed in one step, in chunks of 8 (a token budget of 8), and one token a step beside three
    decoding requests (a budget of 4: all steps of one token each) gives the same prompt logprobs (of a prefix of
    the prompt: the model is causal); a prompt logprobs request takes nothing from the prefix cache."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY)
    whole = llm.generate({"prompt_token_ids": LONG}, params, use_tqdm=False)[0]
    plain = llm.generate({"prompt_token_ids": LONG}, SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)[0]
    assert (whole.num_cached_tokens, plain.num_cached_tokens) == (0, 16)  # LONG's first page is cached by now
    monkeypatch.setattr(llm.engine.scheduler, "max_num_batched_tokens", 8)
    chunked = llm.generate({"prompt_token_ids": LONG}, params, use_tqdm=False)[0]
    monkeypatch.setattr(llm.engine.scheduler, "max_num_batched_tokens", 4)
    others = [{"prompt_token_ids": [10 + i]} for i in range(3)]
    beside = llm.generate(others + [{"prompt_token_ids": LONG[:8]}],
                          [SamplingParams(max_tokens=8, **GREEDY)] * 3 + [params], use_tqdm=False)[-1]
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
    for out, n in ((chunked, len(LONG)), (beside, 8)):
        assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
        for got, want in zip(out.prompt_logprobs[1:], whole.prompt_logprobs[1:n]):
            assert list(got) == list(want)
            assert [p.logprob for p in got.values()] == pytest.approx([p.logprob for p in want.values()], abs=1e-4)


def test_batched_equals_one_at_a_time_with_every_new_field(llm):
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": LONG}, {"prompt_token_ids": LONG[:9]}]
    params = [
        SamplingParams(n=2, seed=1, temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, presence_penalty=0.5,
                       frequency_penalty=0.3, repetition_penalty=1.2, logprobs=2, prompt_logprobs=1, min_tokens=3,
                       max_tokens=5, stop_token_ids=[7]),
        SamplingParams(seed=2, temperature=0.0, repetition_penalty=1.5, frequency_penalty=-0.5, logprobs=0,
                       max_tokens=4, ignore_eos=True),
        SamplingParams(seed=3, temperature=1.3, min_p=0.1, presence_penalty=-1.0, prompt_logprobs=2, min_tokens=4,
                       max_tokens=5),
    ]
    batched = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, together in zip(prompts, params, batched):
        alone = llm.generate(prompt, p, use_tqdm=False)[0]
        assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in together.outputs]
        for a, b in zip(alone.outputs, together.outputs):
            assert (a.finish_reason, a.stop_reason, a.index) == (b.finish_reason, b.stop_reason, b.index)
            assert (a.cumulative_logprob is None) == (b.cumulative_logprob is None) == (p.logprobs is None)
            if p.logprobs is not None:
                assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
                assert [list(e) for e in a.logprobs] == [list(e) for e in b.logprobs]
        assert (alone.prompt_logprobs is None) == (p.prompt_logprobs is None)
        if p.prompt_logprobs is not None:
            assert [e and list(e) for e in alone.prompt_logprobs] == [e and list(e) for e in together.prompt_logprobs]


def fake_hub_cache(root: Path, ckpt: Path, config: dict, generation_config: dict) -> Path:
    """The local Hugging Face cache layout of ``org/tiny``: the checkpoint's files in a snapshot, refs/main naming
    it; config.json and generation_config.json as given."""
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (snapshot / f.name).symlink_to(f)
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "generation_config.json").write_text(json.dumps(generation_config))
    return snapshot


def test_a_hub_id_from_the_local_cache_with_its_generation_config(llm, ref, dsv3_ckpt, dsv3_oracle, tmp_path,
                                                                  monkeypatch):
    """config.json gives its EOS ids as a list; generation_config.json adds one (a stop id: vLLM's
    generation_config="auto") and sets the default sampling."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"not a model|download it first \(huggingface-cli download org/missing\)"):
        LLM("org/missing", device="cpu", progress=False)
    b = new_token(ref, 1)
    a = new_token(ref, b + 1)  # config.json's extra EOS, after generation_config's
    config = {**json.loads((dsv3_ckpt / "config.json").read_text()), "eos_token_id": [1, ref[a]]}
    gen = {"eos_token_id": [1, ref[b]], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 3,
           "repetition_penalty": 1.05, "min_p": 0.01}
    snapshot = fake_hub_cache(tmp_path, dsv3_ckpt, config, gen)
    hub = LLM("org/tiny", dtype="float32", device="cpu", max_model_len=128, block_size=16, progress=False)
    assert Path(hub.config.model.path) == snapshot
    defaults = hub.get_default_sampling_params()
    assert defaults == SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=3, repetition_penalty=1.05,
                                      min_p=0.01)
    outs = run(hub, [SamplingParams(temperature=0.0, max_tokens=N),
                     SamplingParams(temperature=0.0, max_tokens=N, min_tokens=b + 2),
                     SamplingParams(max_tokens=a + 1, **GREEDY)])
    ends = [first_at(ref, {1, ref[a], ref[b]}), first_at(ref, {1, ref[a], ref[b]}, b + 1)]
    assert ends[0] == b and ends[1] <= a
    assert (outs[0].token_ids, outs[0].stop_reason) == (ref[: b + 1], ref[b])
    stops = {1, ref[a], ref[b]}  # masked below min_tokens: config.json's EOS ids and generation_config.json's
    masked = oracle_greedy(dsv3_oracle, PROMPT, N, banned=stops, min_tokens=b + 2, stop=stops)
    assert masked[:b] == ref[:b] and not stops.intersection(masked[: b + 2])
    assert (outs[1].token_ids, outs[1].stop_reason) == (masked, ref[b] if masked[-1] == ref[b] else None)
    assert (outs[2].token_ids, outs[2].finish_reason) == (ref[: a + 1], "length")  # ignore_eos: neither stops it
    sampled = hub.generate({"prompt_token_ids": PROMPT}, use_tqdm=False)[0].outputs[0]  # generation_config's defaults
    assert len(sampled.token_ids) <= 3


@pytest.mark.parametrize("kwargs,field", [
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": ["7"]}, "stop_token_ids"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"), ({"stop": [1]}, "stop"),
])
def test_bad_sampling_values_are_one_line_errors(kwargs, field):
    with pytest.raises(ConfigError, match=f"^SamplingParams.{field}=") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_vllm_speculative_config_sets_the_speculative_group(dsv3_ckpt):
    llm = LLM(str(dsv3_ckpt), dtype="float32", device="cpu", progress=False, max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4})
    spec = llm.config.speculative
    assert (spec.method, spec.num_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == ("ngram", 2, 4, 4)


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype='fp8_e5m2' is not supported"),
    ({"speculative_config": {"method": "eagle"}}, "speculative_config method='eagle' is not supported"),
    ({"speculative_config": {"method": "ngram", "draft_tp": 2}}, "speculative_config key 'draft_tp' is not"),
    ({"quantization": "awq"}, "quantization='awq' is not supported"),
    ({"tensor_parallel_size": 2}, "started as one process .* torchrun --nproc-per-node 2"),
    ({"tensor_parallel_size": 0}, "it must be a positive integer"),
    ({"swap_space": 4}, r"LLM\(swap_space=...\): not supported"),
    ({"pipeline_parallel_size": 2}, "not supported"),
    ({"num_gpu_blocks_override": 100}, "equivalent is num_pages"),
    ({"colour": "blue"}, "no keyword 'colour'.*mla_runner.config.RunConfig"),
    ({"max_num_seqs": 4, "max_batch_size": 4}, "both max_num_seqs= and max_batch_size="),
])
def test_bad_llm_keywords_are_one_line_errors_before_loading(dsv3_ckpt, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        LLM(str(dsv3_ckpt), device="cpu", progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_tensor_parallel_size_must_be_the_launched_world(dsv3_ckpt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="tensor_parallel_size=1 but this script was started as 2 processes"):
        LLM(str(dsv3_ckpt), device="cpu", progress=False)


def test_prompt_lines_with_messages_and_the_new_fields(llm):
    line = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "max_tokens": None,
            "stop_token_ids": [3], "min_tokens": 1, "include_stop_str_in_output": True, "skip_special_tokens": False}
    spec = parse_prompt(line, "line")
    defaults = SamplingParams(temperature=0.0, stop=["x"])
    task = GenerateTaskConfig(stop=["x"])
    (req,) = _requests(llm.engine, 0, spec, defaults, task)
    text, ids = encode_chat(llm.tokenizer, line["messages"])
    assert (req.prompt, req.prompt_token_ids) == (text, ids)
    assert (req.params.max_tokens, req.params.stop_token_ids, req.params.stop) == (None, [3], ["x"])
    new_fields = {"prompt_token_ids": PROMPT, "n": 1, "min_p": 0.05, "presence_penalty": 0.5,
                  "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logprobs": 1, "prompt_logprobs": 0,
                  "max_tokens": 2}
    (req,) = _requests(llm.engine, 1, parse_prompt(new_fields, "line"), defaults, task)
    assert (req.params.min_p, req.params.repetition_penalty, req.params.logprobs) == (0.05, 1.1, 1)
    llm.engine.run([req], progress=False)
    row = json.loads(json.dumps(_result(req, 1)))  # the completions file's line
    assert row["prompt_logprobs"][0] is None and len(row["prompt_logprobs"]) == len(PROMPT) == 4
    first, token = row["logprobs"][0], req.output_token_ids[0]
    assert next(iter(first)) == str(token) and first[str(token)]["logprob"] == req.logprobs[0][token].logprob
    assert row["cumulative_logprob"] == req.cumulative_logprob == sum(e[t].logprob for e, t in zip(
        req.logprobs, req.output_token_ids))
    for bad, what in (({"stop_token_ids": [1.5]}, "'stop_token_ids' must be a list of integers"),
                      ({"min_tokens": True}, "'min_tokens' must be an integer"),
                      ({"skip_special_tokens": 0}, "'skip_special_tokens' must be true or false"),
                      ({"n": 1.5}, "'n' must be an integer"),
                      ({"logprobs": 1.5}, "'logprobs' must be an integer or null"),
                      ({"repetition_penalty": "x"}, "'repetition_penalty' must be a number")):
        with pytest.raises(UserError, match=what):
            parse_prompt({"prompt": "p", **bad}, "line")
    for bad in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}):
        with pytest.raises(UserError, match="'messages' must be a non-empty list"):
            parse_prompt(bad, "line")
    with pytest.raises(UserError, match="give one of"):
        parse_prompt({"prompt": "p", "messages": line["messages"]}, "line")


def test_n_in_a_prompts_file_gives_a_line_per_sample_and_resumes_by_sample(dsv3_ckpt, tmp_path):
    """A line with n = 3 gives three lines, ``sample`` 0-2, sample i drawn from the line's seed + i (its tokens equal
    a line of its own with that seed); a line with n = 1 has no ``sample``; an error line stands for the whole prompt.
    Resumed after losing two sample lines, the run computes those two alone and the file ends as before."""
    prompts = tmp_path / "prompts.jsonl"
    sampled = {"prompt_token_ids": PROMPT, "temperature": 1.0, "ignore_eos": True}
    lines = [{**sampled, "n": 3, "seed": 5}, {**sampled, "n": 0}, {**sampled, "seed": 6}, {**sampled, "seed": 7}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    overrides = [f"model.path={dsv3_ckpt}", "device=cpu", "dtype=float32", "progress=false", "task.max_tokens=5",
                 f"task.prompts={prompts}"]
    out = tmp_path / "run"
    out.mkdir()
    metrics = run_generate(compose_config(overrides), out)["metrics"]
    assert (metrics["requests"], metrics["errors"]) == (5, 1)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    by_key = {(r["index"], r.get("sample")): r for r in rows if "error" not in r}
    assert sorted(by_key, key=str) == sorted([(0, 0), (0, 1), (0, 2), (2, None), (3, None)], key=str)
    error = next(r["error"] for r in rows if r["index"] == 1)
    assert error == "line 2: SamplingParams.n=0 is not valid: it must be >= 1"
    assert by_key[(0, 1)]["token_ids"] == by_key[(2, None)]["token_ids"]  # seed 5 + 1 = line 2's seed
    assert by_key[(0, 2)]["token_ids"] == by_key[(3, None)]["token_ids"]
    assert by_key[(0, 0)]["token_ids"] != by_key[(0, 1)]["token_ids"]
    kept = [r for r in rows if (r["index"], r.get("sample")) not in {(0, 0), (0, 2)}]
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    metrics = run_generate(compose_config([*overrides, "task.resume=true"]), out)["metrics"]
    assert (metrics["requests"], metrics["errors"]) == (2, 0)
    again = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {(r["index"], r.get("sample")): r["token_ids"] for r in again if "error" not in r} == {
        k: r["token_ids"] for k, r in by_key.items()}
