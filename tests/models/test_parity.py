"""Our model (FP8 checkpoint through our loader, paged cache, reference attention) against transformers' oracle
(fp32 dequantized copy) on the tiny checkpoints of both flavours: logits, chosen experts, greedy tokens."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mla_runner.models.loader import load_model, load_tokenizer
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG
from mla_runner.models.tiny import make_tiny_checkpoint
from mla_testing.oracle import ExpertRecorder, PagedRunner, load_oracle, oracle_forward, rel_err

TOL = 1e-4  # fp32; measured agreement is about 1e-6
PROMPTS = [
    "Once upon a time there was",
    "What is the capital of France? The capital",
    "The engine schedules requests in batches, writes their positions and pages, and runs",
    "Numbers like 1, 2, 3",
]
NEW_TOKENS = 12


@pytest.fixture(params=["dsv3", "kimi"])
def flavour(request: pytest.FixtureRequest) -> SimpleNamespace:
    name = request.param
    ckpt = request.getfixturevalue(f"{name}_ckpt")
    return SimpleNamespace(
        model=request.getfixturevalue(f"{name}_model"),
        oracle=request.getfixturevalue(f"{name}_oracle"),
        prompts=[load_tokenizer(ckpt)(p).input_ids for p in PROMPTS],
    )


def assert_same_experts(ours: dict[int, torch.Tensor], theirs: dict[int, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys() and ours
    for layer in ours:
        assert torch.equal(ours[layer], theirs[layer]), f"layer {layer} routed tokens to other experts"


def test_prefill_logits_and_experts(flavour: SimpleNamespace) -> None:
    runner = PagedRunner(flavour.model, page_size=4)
    recorder = ExpertRecorder(flavour.model.model.layers)
    try:
        for i, prompt in enumerate(flavour.prompts):
            expected_logits, expected_experts = oracle_forward(flavour.oracle, prompt)
            logits = runner.step({i: prompt})[i]
            assert rel_err(logits, expected_logits) < TOL
            assert_same_experts(recorder.take(), expected_experts)
    finally:
        recorder.close()


def test_decode_steps_and_greedy_tokens(flavour: SimpleNamespace) -> None:
    """Prefill, then one token per step through the paged cache (page size 4: pages are crossed); each step's
    logits and experts match the oracle on the whole sequence, and greedy picks the oracle's token."""
    recorder = ExpertRecorder(flavour.model.model.layers)
    try:
        for i, prompt in enumerate(flavour.prompts):
            runner = PagedRunner(flavour.model, page_size=4, seed=i)
            logits = runner.step({i: prompt})[i][-1]
            recorder.take()
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                token = int(logits.argmax())
                ids.append(token)
                logits = runner.step({i: [token]})[i][-1]
                expected_logits, expected_experts = oracle_forward(flavour.oracle, ids)
                assert token == int(expected_logits[-2].argmax()), f"prompt {i}: greedy token differs at {len(ids)}"
                assert rel_err(logits, expected_logits[-1]) < TOL
                assert_same_experts(recorder.take(), {l: e[-1:] for l, e in expected_experts.items()})
            assert len(set(ids[len(prompt) :])) >= NEW_TOKENS // 3, "continuation degenerated into repeats"
    finally:
        recorder.close()


def test_batched_requests_equal_one_at_a_time(flavour: SimpleNamespace) -> None:
    """Requests of different lengths in one forward, mixing prefill, chunked prefill and decode."""
    a, b, c = flavour.prompts[:3]
    steps = [
        {"a": a, "b": b[:3]},
        {"a": [5], "b": b[3:], "c": c},
        {"a": [7], "b": [11], "c": [13]},
    ]
    batched = PagedRunner(flavour.model, page_size=4, seed=1)
    alone = {r: PagedRunner(flavour.model, page_size=4, seed=2) for r in "abc"}
    for step in steps:
        together = batched.step(step)
        for req, tokens in step.items():
            torch.testing.assert_close(together[req], alone[req].step({req: tokens})[req], rtol=1e-5, atol=1e-5)


def test_bf16_run_tracks_fp32(dsv3_ckpt: Path, dsv3_model: torch.nn.Module) -> None:
    """The run-dtype path: bf16 weights and cache stay close to fp32 on every token whose routing agrees
    (bf16 rounding may flip a near-tied expert choice, which changes that token's output outright)."""
    bf16 = load_model(dsv3_ckpt, dtype=torch.bfloat16, progress=False)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    gate = bf16.model.layers[1].mlp.gate.weight  # fp32, holding the checkpoint's bf16 values
    assert gate.dtype == torch.float32 and torch.equal(gate, gate.bfloat16().float())
    prompt = list(range(3, 40))
    recorders = ExpertRecorder(bf16.model.layers), ExpertRecorder(dsv3_model.model.layers)
    try:
        logits = PagedRunner(bf16).step({0: prompt})[0]
        reference = PagedRunner(dsv3_model).step({0: prompt})[0]
        experts, reference_experts = (r.take() for r in recorders)
    finally:
        for r in recorders:
            r.close()
    assert logits.dtype == torch.float32
    same_route = torch.stack([(experts[l] == reference_experts[l]).all(-1) for l in experts]).all(0)
    assert same_route.float().mean() > 0.9
    assert rel_err(logits[same_route], reference[same_route]) < 0.05


def test_plain_q_proj_without_q_lora(tmp_path: Path) -> None:
    """q_lora_rank null (DeepSeek-V2-Lite style q_proj) matches the oracle too."""
    config = {**TINY_DEEPSEEK_V3_CONFIG, "q_lora_rank": None}
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", config, seed=3)
    model = load_model(ckpt, dtype=torch.float32, progress=False)
    oracle = load_oracle(ckpt, tmp_path / "oracle")
    prompt = list(range(5, 30))
    expected, _ = oracle_forward(oracle, prompt)
    assert rel_err(PagedRunner(model).step({0: prompt})[0], expected) < TOL


def test_stacked_experts_share_memory_with_the_experts(dsv3_model):
    from mla_runner.models.moe import MoE

    moe = next(layer.mlp for layer in dsv3_model.model.layers if isinstance(layer.mlp, MoE))
    inter = moe.experts[0].gate_proj.weight.shape[0]
    for i, expert in enumerate(moe.experts):
        assert expert.gate_proj.weight.data_ptr() == moe.w13[i].data_ptr()
        assert expert.up_proj.weight.data_ptr() == moe.w13[i, inter:].data_ptr()
        assert expert.down_proj.weight.data_ptr() == moe.w2[i].data_ptr()
