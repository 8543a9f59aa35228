"""task=bench on the CPU (or the GPU where there is one): every mode yields a consistent row, and the roofline
bookkeeping is right."""
from __future__ import annotations

import pytest
import torch

from mla_runner.compose import compose_config
from mla_runner.engine import LLMEngine
from mla_runner.roofline import touched_weight_bytes
from mla_runner.tasks.bench import count_experts, fill_running, run_bench


@pytest.mark.parametrize("mode", ["decode", "kernel", "metadata"])
@pytest.mark.parametrize("attention,metadata", [("torch", "per_step"), ("triton", "persistent"),
                                                ("triton", "per_step")])
def test_bench_modes(tmp_path, mode, attention, metadata):
    cfg = compose_config(["task=bench", f"task.mode={mode}", "task.batch=3", "task.context=70", "task.iters=2",
                          "task.warmup=1", f"attention={attention}", f"metadata={metadata}", "page_size=16",
                          "device=auto", "dtype=float32", "progress=false"])  # the interpreter, or a GPU
    out = run_bench(cfg, tmp_path)
    (row,) = out["rows"]
    strategy = metadata if attention == "triton" else "-"  # the torch backend has no metadata strategy
    assert (row["backend"], row["strategy"], row["mode"], row["batch"]) == (attention, strategy, mode, 3)
    gpu = torch.cuda.is_available()  # (device=auto)
    if mode == "kernel":
        kv_bytes = 3 * 70 * (32 + 8) * 4  # tiny model: 40-wide latent, float32
        assert row["gb_s"] == pytest.approx(kv_bytes / (row["time_us"] * 1e-6) / 1e9)
        if gpu:
            assert row["roofline_fraction"] == pytest.approx(row["floor_us"] / row["time_us"])
    elif mode == "decode":
        assert row["tokens_per_s"] == pytest.approx(3 / (row["step_ms"] * 1e-3)) == row["tokens_per_s_per_gpu"]
        if gpu:
            assert 0 < row["roofline_fraction"] < 1
    if mode != "metadata" and not gpu:  # a CPU's measured rates bound nothing there: no floor, no fraction
        assert not {"roofline_fraction", "floor_us", "floor_ms"} & set(row)
    else:
        assert row["metadata_us"] > 0


def test_decode_bytes_count_the_experts_routed_to():
    engine = LLMEngine(compose_config(["device=auto", "dtype=float32", "weights=bf16", "progress=false",
                                    "page_size=16"]))  # dequantized: 4 bytes per weight below
    fill_running(engine, [40, 3], max_tokens=4)
    unique = count_experts(engine)
    args = engine.args
    moe_layers = args.num_hidden_layers - args.first_k_dense_replace
    assert len(unique) == moe_layers and all(args.num_experts_per_tok <= u <= 2 * args.num_experts_per_tok
                                             for u in unique)
    expert = 3 * args.hidden_size * args.moe_intermediate_size * 4
    model = engine.runner.model
    every_param = sum(p.numel() * 4 for p in model.parameters())
    all_experts = moe_layers * args.n_routed_experts * expert
    embedding = args.vocab_size * args.hidden_size * 4
    expected = every_param - all_experts - embedding + 2 * args.hidden_size * 4 + sum(unique) * expert
    assert touched_weight_bytes(model, 2, unique) == expected


def test_decode_with_mtp_counts_the_tokens_its_steps_emit(tmp_path):
    """k = 2 with forced acceptance length 3 (every draft accepted): each timed step emits 3 tokens a request, and the
    row carries the acceptance figures; the experts are counted from an eager step (count_experts runs one, with its
    router hooks, where the steps are graph replays)."""
    cfg = compose_config(["task=bench", "task.mode=decode", "task.batch=3", "task.context=70", "task.iters=3",
                          "task.warmup=1", "page_size=16", "device=auto", "dtype=float32", "progress=false",
                          "speculative=mtp", "speculative.num_tokens=2", "speculative.force_acceptance_length=3"])
    (row,) = run_bench(cfg, tmp_path)["rows"]
    assert row["tokens_per_step"] == 9 and row["mean_acceptance_length"] == 3.0 and row["acceptance_rate"] == 1.0
    assert row["tokens_per_s"] == pytest.approx(9 / (row["step_ms"] * 1e-3)) == row["tokens_per_s_per_gpu"]
    assert row["tokens_per_s_per_request"] == pytest.approx(row["tokens_per_s"] / 3)


@pytest.mark.parametrize("mode", ["prefill", "throughput"])
def test_serving_modes(tmp_path, mode):
    cfg = compose_config(["task=bench", f"task.mode={mode}", "task.batch=3", "task.context=40", "task.output_len=5",
                          "task.repeats=1", "max_num_batched_tokens=48", "device=auto", "dtype=float32",
                          "progress=false"])  # prompts in chunks: 3 x 40 tokens over a budget of 48
    out = run_bench(cfg, tmp_path)
    (row,) = out["rows"]
    assert out["resolved"]["attention"] == ("triton" if torch.cuda.is_available() else "torch")
    if mode == "prefill":
        assert row["prefill_tokens_per_s"] == pytest.approx(3 * 40 / row["ttft_s"])
    else:
        assert row["tokens_per_s"] == pytest.approx(3 * 5 / row["seconds"])
        assert row["input_tokens_per_s"] == pytest.approx(3 * 40 / row["seconds"])
        assert 0 < row["ttft_s_median"] <= row["seconds"] and row["tpot_s_median"] > 0
    assert ("roofline_fraction" in row) == torch.cuda.is_available()


def test_prefill_flops_count_linear_layers_and_causal_attention():
    from mla_runner.models.config import ModelArgs
    from mla_runner.models.presets import DEEPSEEK_V3_CONFIG
    from mla_runner.roofline import linear_flops_per_token, prefill_flops

    args = ModelArgs.from_dict({**DEEPSEEK_V3_CONFIG, "num_hidden_layers": 4})  # 3 dense + 1 MoE
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    mlp = 3 * 7168 * 18432
    moe = 7168 * 256 + 9 * 3 * 7168 * 2048
    assert linear_flops_per_token(args) == 2 * (4 * mla + 3 * mlp + moe)
    assert linear_flops_per_token(args) / 4 == pytest.approx(1.168e9, rel=1e-3)  # the 1.17 GFLOP
    attention = 2 * 128 * (192 + 128) * (1000 * 1001 / 2) * 4
    assert prefill_flops(args, [1000, 1000]) == pytest.approx(2 * (1000 * linear_flops_per_token(args) + attention))
