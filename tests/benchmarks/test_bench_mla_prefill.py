"""benchmarks/bench_mla_prefill.py: its FLOP count, its command line, and its loop on tiny shapes (under Triton's
interpreter without a GPU; the real rows are the GPU's)."""
import pytest

from mla_testing.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_mla_prefill")


def test_attended_pairs_count_what_the_causal_mask_keeps(bench):
    # ordinary causal: L (L + 1) / 2; a chunk of 3 after 5 cached keys: 6 + 7 + 8; non-causal: q * k
    assert bench.attended_pairs([4], [4]) == 10
    assert bench.attended_pairs([3], [8]) == 6 + 7 + 8
    assert bench.attended_pairs([3, 2], [8, 2], causal=False) == 24 + 4
    assert bench.attention_flops(16, [4], [4]) == 2 * 16 * (192 + 128) * 10


def test_bad_arguments_stop_with_one_line(bench, capsys):
    for argv in (["--lens", "a,b"], ["--heads", "0"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert "error:" in capsys.readouterr().err


def test_cpu_smoke_run_times_every_shape(bench, tmp_path):
    result = bench.main(["--device", "cpu", "--no-sdpa", "--json", str(tmp_path / "out.json")])
    rows = result["rows"]
    assert [(r["H"], r["L"]) for r in rows] == [(2, 48), (2, 96)]
    for r in rows:
        flops = bench.attention_flops(r["H"], [r["L"]] * r["B"], [r["L"]] * r["B"])
        assert r["us"] > 0 and r["TFLOPs"] == pytest.approx(flops / (r["us"] * 1e-6) / 1e12, rel=1e-6)
    assert (tmp_path / "out.json").is_file()
