"""benchmarks/kv_cache_accuracy.py on the tiny DeepSeek-V3 checkpoint (CPU, attention=torch): the control run is exactly
the reference, the FP8 layouts' numbers are sane and small, the calibrated scales are the reference's amax / 448 (plain
fp8, whose only difference is its scale of 1, is left out to keep the test short)."""
import json
import math

import pytest

from mla_testing.benchmarks import load_benchmark

PROMPTS, PROMPT_LEN, GEN_LEN = 2, 16, 6
LAYOUTS = ["auto", "fp8_calibrated", "fp8_ds_mla"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("kv_cache_accuracy")


def test_bad_arguments_stop_with_one_line(bench, capsys):
    for argv in (["--layouts", "fp4"], ["--prompts", "0"], ["kv_cache_dtype=fp8"], ["device"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert "error:" in capsys.readouterr().err


def test_tiny_model_numbers(bench, dsv3_ckpt, tmp_path):
    out = tmp_path / "acc.json"
    result = bench.main([f"model.path={dsv3_ckpt}", "device=cpu", "attention=torch", "--prompts", str(PROMPTS),
                         "--prompt-len", str(PROMPT_LEN), "--gen-len", str(GEN_LEN), "--layouts", ",".join(LAYOUTS),
                         "--json", str(out)])
    assert json.loads(out.read_text()) == result
    layouts = result["layouts"]
    assert list(layouts) == LAYOUTS
    control = layouts["auto"]  # the same model and prompts again: nothing differs
    assert control["bytes_per_token"] == 160  # fp32 on the CPU, 32 + 8 values
    assert control["layer_rel_err_alone"] == control["layer_rel_err_through"] == [0.0] * 3
    assert (control["kl_mean"], control["kl_max"], control["top1_agreement"], control["greedy_agreement"]) == (
        0.0, 0.0, 1.0, 1.0)
    assert control["first_divergence"] == [GEN_LEN] * PROMPTS
    amax = result["latent_amax"]
    assert len(amax) == 3 and all(1 < a < 10 for a in amax)  # the tiny model's latents: RMS-normalized, rope
    assert layouts["fp8_calibrated"]["scales"] == pytest.approx([a / 448 for a in amax], rel=1e-6)
    assert (layouts["fp8_calibrated"]["bytes_per_token"], layouts["fp8_ds_mla"]["bytes_per_token"]) == (40, 52)
    for kind in LAYOUTS[1:]:
        m = layouts[kind]
        # e4m3 keeps 3 mantissa bits: a layer's own output moves by a few percent (measured 3.5-4.5e-2)
        assert all(0 < e < 0.1 for e in m["layer_rel_err_alone"]), (kind, m["layer_rel_err_alone"])
        assert all(0 < e < 0.3 for e in m["layer_rel_err_through"]), (kind, m["layer_rel_err_through"])
        kl = m["kl_per_position"]
        assert len(kl) == PROMPT_LEN and min(kl) >= 0 and m["kl_max"] >= max(kl)
        assert 0 < m["kl_mean"] < 0.05, (kind, m["kl_mean"])  # measured 1-2e-2 (flat tiny-model distributions)
        assert 0.7 <= m["top1_agreement"] <= 1 and all(0 <= a <= 1 for a in m["top1_per_position"])
        assert 0 <= m["greedy_agreement"] <= 1
        assert all(0 <= f <= GEN_LEN for f in m["first_divergence"]) and not math.isnan(m["kl_mean"])
