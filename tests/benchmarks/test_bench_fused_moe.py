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


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_peer_of_the_benchmark(bench, dtype, tol):
    """The prefill bench's torch._grouped_mm peer runs the same grouped GEMMs: around them, the same MoE (an
    expert with no rows, a dropped pair)."""
    x, w13, w2, weights, ids = random_moe(11, 64, 32, 6, 2)
    ids[ids == 4] = 5
    ids[3, 1] = -1
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    try:
        out = bench.grouped_mm_moe(x, w13, w2, weights, ids)
    except (RuntimeError, NotImplementedError) as exc:  # no kernel for this device / dtype: the bench skips it too
        pytest.skip(f"torch._grouped_mm: {exc}")
    assert rel_err(out, fused_moe_reference(x, w13, w2, weights, ids)) < tol


def test_the_command_line(bench, monkeypatch, capsys):
    # --sweep sweeps the fused MoE's configs, so it is a usage error with --routing, as is --prefill with
    # --routing; each mode runs its benchmark; without a GPU the command stops with one line saying so
    with pytest.raises(SystemExit) as e:
        bench.main(["--routing", "--sweep"])
    assert e.value.code == 2 and "without --routing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--routing", "--prefill"])
    assert e.value.code == 2 and "pick one" in capsys.readouterr().err
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_bench", lambda sweep: ["fused", sweep])
    monkeypatch.setattr(bench, "bench_routing", lambda: ["routing"])
    monkeypatch.setattr(bench, "bench_align", lambda: ["align"])
    monkeypatch.setattr(bench, "bench_prefill", lambda sweep: ["prefill", sweep])
    assert bench.main([]) == ["fused", False]
    assert bench.main(["--sweep"]) == ["fused", True]
    assert bench.main(["--routing"]) == ["routing"]
    assert bench.main(["--prefill"]) == ["align", "prefill", False]
    assert bench.main(["--prefill", "--sweep"]) == ["align", "prefill", True]
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench_fused_moe.py needs a CUDA GPU"):
        bench.main([])


def test_prefill_tables_on_the_cpu(bench, monkeypatch, capsys):
    """The --prefill code on tiny shapes, each timing replaced by one call: the fused paths agree with the eager loops
    the table compares them with (bf16 2e-2; W8A8 against the FP8 loop, which rounds at other places, 5e-2), and
    the align table says what impl=None picks."""
    from mla_runner.kernels import cuda_graph
    from mla_runner.kernels.moe_align import align_impl

    def once(fn, **kw):
        fn()
        return 1.0

    monkeypatch.setattr(bench.triton.testing, "do_bench", once)
    monkeypatch.setattr(cuda_graph, "graph_time", once)
    rows = bench.bench_align(tokens=(3, 600), experts=(256,), k=8, dev="cpu")
    assert [r["picks"] for r in rows] == ["triton", "sort"] == [align_impl(24, 256), align_impl(4800, 256)]
    shapes = {"tiny": dict(E=6, k=2, hidden=256, inter=128)}
    (row,) = bench.bench_prefill(tokens=(9,), name="tiny", shapes=shapes, dev="cpu", sweep=True)
    assert row["T"] == 9 and row["err_bf16"] < 2e-2 and row["err_w8a8"] < 5e-2, row
    assert capsys.readouterr().out.count("| 9 | 1.00 |") == 1
