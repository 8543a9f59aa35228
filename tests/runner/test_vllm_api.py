"""vLLM's offline API on the tiny DeepSeek-V3 checkpoint: a vLLM-style script runs unchanged, and each vLLM field
(stop ids, min_tokens, max_tokens=None, stop strings on special tokens, generation_config.json, Hub ids) against a
plain greedy reference: the same prompt generated with none of them."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.config import GenerateTaskConfig
from mla_runner.errors import ConfigError, UserError
from mla_runner.prompts import encode_chat, parse_prompt
from mla_runner.tasks.generate import _request

PROMPT = [273, 56, 93, 175]  # greedy on the tiny DeepSeek-V3 reaches EOS (id 1) at its 9th token
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


def test_stop_token_ids_and_min_tokens(llm, ref):
    k = new_token(ref, 2)
    t = ref[k]
    j = next((i for i in range(k + 2, N) if ref[i] == t), None)
    outs = run(llm, [SamplingParams(max_tokens=N, stop_token_ids=[t], **GREEDY),
                     SamplingParams(max_tokens=N, stop_token_ids=[t], include_stop_str_in_output=True, **GREEDY),
                     SamplingParams(max_tokens=N, stop_token_ids=[t], min_tokens=k + 2, **GREEDY)])
    decode = llm.tokenizer.decode
    assert (outs[0].token_ids, outs[0].finish_reason, outs[0].stop_reason) == (ref[: k + 1], "stop", t)
    assert outs[0].text == decode(ref[:k], skip_special_tokens=True)
    assert outs[1].text == decode(ref[: k + 1], skip_special_tokens=True)
    expect = (ref[: j + 1], "stop", t) if j is not None else (ref[:N], "length", None)
    assert (outs[2].token_ids, outs[2].finish_reason, outs[2].stop_reason) == expect


def test_eos_stop_strings_on_special_tokens_and_min_tokens(llm, ref):
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
    assert (outs[4].token_ids, outs[4].finish_reason) == (ref[: e + 3], "length")  # EOS at e is no stop yet


def test_max_tokens_none_stops_at_the_context(llm):
    ids = torch.randint(2, 500, (112,), generator=torch.Generator().manual_seed(1)).tolist()
    out = run(llm, [SamplingParams(max_tokens=None, **GREEDY)], {"prompt_token_ids": ids})[0]
    assert (len(out.token_ids), out.finish_reason) == (128 - 112, "length")


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


def test_a_hub_id_from_the_local_cache_with_its_generation_config(llm, ref, dsv3_ckpt, tmp_path, monkeypatch):
    """config.json gives its EOS ids as a list; generation_config.json adds one (a stop id: vLLM's
    generation_config="auto") and sets the default sampling."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"not a model|download it first \(huggingface-cli download org/missing\)"):
        LLM("org/missing", device="cpu", progress=False)
    b = new_token(ref, 1)
    a = new_token(ref, b + 1)  # config.json's extra EOS, after generation_config's
    config = {**json.loads((dsv3_ckpt / "config.json").read_text()), "eos_token_id": [1, ref[a]]}
    gen = {"eos_token_id": [1, ref[b]], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 3}
    snapshot = fake_hub_cache(tmp_path, dsv3_ckpt, config, gen)
    hub = LLM("org/tiny", dtype="float32", device="cpu", max_model_len=128, block_size=16, progress=False)
    assert Path(hub.config.model.path) == snapshot
    defaults = hub.get_default_sampling_params()
    assert defaults == SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=3)
    outs = run(hub, [SamplingParams(temperature=0.0, max_tokens=N),
                     SamplingParams(temperature=0.0, max_tokens=N, min_tokens=b + 2),
                     SamplingParams(max_tokens=a + 1, **GREEDY)])
    ends = [first_at(ref, {1, ref[a], ref[b]}), first_at(ref, {1, ref[a], ref[b]}, b + 1)]
    assert ends[0] == b and ends[1] <= a
    assert (outs[0].token_ids, outs[0].stop_reason) == (ref[: b + 1], ref[b])
    assert (outs[1].token_ids, outs[1].stop_reason) == (ref[: ends[1] + 1], ref[b] if ref[ends[1]] == ref[b] else None)
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


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_cache_dtype": "fp8"}, "the FP8 KV cache is not supported yet"),
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
    req = _request(llm.engine, 0, spec, defaults, task)
    text, ids = encode_chat(llm.tokenizer, line["messages"])
    assert (req.prompt, req.prompt_token_ids) == (text, ids)
    assert (req.params.max_tokens, req.params.stop_token_ids, req.params.stop) == (None, [3], ["x"])
    for bad, what in (({"stop_token_ids": [1.5]}, "'stop_token_ids' must be a list of integers"),
                      ({"min_tokens": True}, "'min_tokens' must be an integer"),
                      ({"skip_special_tokens": 0}, "'skip_special_tokens' must be true or false")):
        with pytest.raises(UserError, match=what):
            parse_prompt({"prompt": "p", **bad}, "line")
    for bad in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}):
        with pytest.raises(UserError, match="'messages' must be a non-empty list"):
            parse_prompt(bad, "line")
    with pytest.raises(UserError, match="give one of"):
        parse_prompt({"prompt": "p", "messages": line["messages"]}, "line")
