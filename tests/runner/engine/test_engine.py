"""Engine details on a CPU: chat formatting, KV-cache sizing, stop strings, seeds, bad prompts, and which metadata a
step builds."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.attention.torch_backend import TorchBackend
from mla_runner.engine import ModelRunner
from mla_runner.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def llm(dsv3_ckpt):
    return LLM(str(dsv3_ckpt), dtype="float32", device="cpu", page_size=16, max_model_len=128, progress=False)


def test_chat_applies_the_tokenizer_template(llm):
    tok = llm.tokenizer
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=2), chat=True)[0]
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text != "Hello there"
    assert out.prompt_token_ids == tok(text, add_special_tokens=False).input_ids


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    stop = full.text[3:6]
    assert stop and len(full.text) > 6
    cut = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_stop_strings_found_from_the_newest_tokens_as_from_the_whole_text(llm):
    """The per-step check decodes only the newest tokens (llm_engine.STOP_WINDOW): it must stop at the same step,
    with the same text, as decoding the whole output every step. It searches the text with special tokens kept."""
    engine, tok = llm.engine, llm.tokenizer
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, len(tok), (40,), generator=g).tolist()
        text = engine.detokenize(ids, skip_special_tokens=False)
        a = int(torch.randint(0, max(len(text) - 6, 1), (1,), generator=g))
        stops = [text[a:a + int(torch.randint(1, 7, (1,), generator=g))], "never in the text \x00"]
        params = SamplingParams(stop=stops, skip_special_tokens=False)
        expect = next(((t, full[: min(full.find(s) for s in stops if s in full)])
                       for t in range(1, len(ids) + 1) for full in [engine.detokenize(ids[:t], False)]
                       if any(s in full for s in stops)), None)
        got = next(((t, cut[0]) for t in range(1, len(ids) + 1)
                    for cut in [engine._cut_at_stop_string(SimpleNamespace(output_token_ids=ids[:t], params=params))]
                    if cut is not None), None)
        assert got == expect, (trial, stops)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=123)
    alone = llm.generate("The sea", params)[0].outputs[0].token_ids
    batched = llm.generate(["A long prompt about something else entirely", "The sea"],
                           [SamplingParams(temperature=1.0, max_tokens=8), params])[1].outputs[0].token_ids
    assert alone == batched


def test_bad_prompts_fail_before_any_work(llm):
    with pytest.raises(UserError, match="max_model_len=128"):
        llm.generate([{"prompt_token_ids": [3] * 200}, "fine"])
    with pytest.raises(UserError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [10**6]})
    with pytest.raises(UserError, match="give one of"):
        llm.generate({"text": "no"})


def test_kv_cache_capacity_is_capped_by_free_gpu_memory(monkeypatch):
    runner = SimpleNamespace(cfg=SimpleNamespace(max_batch_size=8, kv_cache_memory_fraction=0.5),
                             max_pages_per_seq=10, device=torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 4000))
    assert ModelRunner._default_num_pages(runner, bytes_per_page=100) == 5  # 1000 free * 0.5 / 100
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**9, 4 * 10**9))
    assert ModelRunner._default_num_pages(runner, bytes_per_page=100) == 80  # all that 8 full requests need


def test_a_cache_smaller_than_one_request_is_a_config_error(dsv3_ckpt):
    with pytest.raises(ConfigError, match="fewer than max_model_len=128"):
        LLM(str(dsv3_ckpt), device="cpu", page_size=16, num_pages=4, max_model_len=128, progress=False)


@pytest.mark.parametrize("overrides,needs", [
    ({"cuda_graphs": True, "attention": "triton"}, "device=cuda"),
    ({"cuda_graphs": True, "attention": "triton", "metadata": "per_step"}, "attention=triton metadata=per_step"),
    ({"cuda_graphs": True, "attention": "torch"}, "(attention=triton metadata=persistent or attention=flashmla)"),
])
def test_cuda_graphs_where_they_cannot_work_is_a_config_error(dsv3_ckpt, overrides, needs, monkeypatch):
    monkeypatch.setattr(ModelRunner, "__init__", lambda *a: pytest.fail("the config error comes before any loading"))
    with pytest.raises(ConfigError, match="cuda_graphs=true needs") as info:
        LLM(str(dsv3_ckpt), device="cpu", page_size=16, max_model_len=128, progress=False, **overrides)
    assert needs in str(info.value)


def test_the_torch_backend_builds_no_work_plan(dsv3_ckpt, monkeypatch):
    """The default CPU run (attention=torch) never runs the persistent plan kernel: it builds what it reads."""
    import mla_runner.kernels.plan_kernels as plan_kernels

    monkeypatch.setattr(plan_kernels, "build_persistent_plan", lambda *a, **k: pytest.fail("a plan was built"))
    llm = LLM(str(dsv3_ckpt), attention="torch", metadata="persistent", dtype="float32", device="cpu",
              page_size=16, max_model_len=128, progress=False)
    assert type(llm.engine.runner.backend) is TorchBackend
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3
