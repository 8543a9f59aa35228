"""benchmarks/bench_fused_moe.py: its eager baselines and its command line (the timings themselves need a GPU)."""
import pytest
import torch

from mla_runner.kernels.fused_moe import fused_moe_reference
from mla_testing.benchmarks import load_benchmark
from mla_testing.numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_fused_moe")


def random_moe(T, hidden, inter, E, k, seed=0):
    """x, w13, w2 scaled for O(1) outputs, k distinct experts per token (fp32; as tests/kernels/test_fused_moe.py's
    make_moe with random routing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    w13 = torch.randn(E, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(E, hidden, inter, generator=g) * inter ** -0.5
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    weights = torch.rand(T, k, generator=g) + 0.1
    return [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]


def test_eager_baseline_of_the_benchmark(bench):
    """The bench's eager loop (models/moe.py approach) computes the same thing."""
    x, w13, w2, weights, ids = random_moe(9, 72, 40, 12, 3)
    assert rel_err(bench.eager_moe_loop(x, w13, w2, weights, ids),
                   fused_moe_reference(x, w13, w2, weights, ids)) < 1e-5


def test_the_command_line(bench, monkeypatch, capsys):
    # --sweep sweeps the fused MoE's configs, so it is a usage error with --routing; each mode runs its benchmark;
    # without a GPU the command stops with one line saying so
    with pytest.raises(SystemExit) as e:
        bench.main(["--routing", "--sweep"])
    assert e.value.code == 2 and "without --routing" in capsys.readouterr().err
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_bench", lambda sweep: ["fused", sweep])
    monkeypatch.setattr(bench, "bench_routing", lambda: ["routing"])
    assert bench.main([]) == ["fused", False]
    assert bench.main(["--sweep"]) == ["fused", True]
    assert bench.main(["--routing"]) == ["routing"]
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench_fused_moe.py needs a CUDA GPU"):
        bench.main([])
