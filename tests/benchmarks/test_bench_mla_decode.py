"""benchmarks/bench_mla_decode.py: its command line, the kernels of its read and split floors (under Triton's
interpreter without a GPU), and, on a CUDA GPU, its rows."""
import functools
import json
import operator

import pytest
import torch

from mla_runner.kernels.cuda_graph import FLUSHES, graph_time
from mla_runner.roofline import Ceilings
from mla_testing.benchmarks import load_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the floors' kernels: on the GPU, or interpreted


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_mla_decode")


def test_bench_flush_modes_are_checked(bench, capsys):
    # the L2 flush before every timed replay is one of two (kernels.cuda_graph.FLUSHES): anything else is refused
    # before any GPU work, by graph_time and by the command line
    assert FLUSHES == ("write", "read")
    with pytest.raises(ValueError, match="flush must be one of"):
        graph_time(lambda: None, flush="dirty")
    with pytest.raises(SystemExit):
        bench.main(["--flush", "dirty"])
    assert "invalid choice: 'dirty'" in capsys.readouterr().err


@pytest.mark.parametrize("n, grid, block, iters", [(1000, 3, 128, 3), (4096, 4, 256, 4), (777, 5, 64, 3)])
def test_bench_stream_read_reads_every_word_once(bench, n, grid, block, iters):
    # the read floor's kernel (read_floor_us): grid-stride over n int32 words, one xor a program; the xor of the
    # programs' words is the xor of the buffer only if every word is read exactly once
    assert grid * block * iters >= n  # the launch covers the buffer, as read_floor_us sizes it
    src = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    src = src.to(DEVICE)
    out = torch.empty(grid, dtype=torch.int32, device=DEVICE)
    bench._stream_read_kernel()[(grid,)](src, out, n, iters, BLOCK=block)
    assert functools.reduce(operator.xor, out.tolist()) == functools.reduce(operator.xor, src.tolist())


@pytest.mark.parametrize("n, pieces, words, block", [(1000, 3, 40, 64), (777, 5, 0, 32), (4096, 4, 300, 256)])
def test_bench_split_floor_moves_every_byte(bench, n, pieces, words, block):
    # the split floor's kernels (split_floor_us): piece p reads words [p * per, (p + 1) * per) once and writes
    # `words` partial words (its xor + the word's index); the sum kernel adds the pieces' partials up
    stream_piece, sum_pieces = bench._split_floor_kernels()
    src = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    per = -(-n // pieces)
    part = torch.full((max(pieces * words, 1),), float("nan"), device=DEVICE)
    out = torch.full((max(words, 1),), float("nan"), device=DEVICE)
    stream_piece[(pieces,)](src.to(DEVICE), part, n, per, words, BLOCK=block, CB=16)
    if words == 0:
        assert part.isnan().all()  # nothing written
        return
    xors = [functools.reduce(operator.xor, src[p * per:(p + 1) * per].tolist(), 0) for p in range(pieces)]
    want = torch.tensor(xors, dtype=torch.int32).float()[:, None] + torch.arange(words, dtype=torch.float32)
    torch.testing.assert_close(part.view(pieces, words).cpu(), want, rtol=0, atol=0)
    sum_pieces[(-(-words // 64),)](part, out, words, P=pieces, CB=64)
    torch.testing.assert_close(out.cpu(), want.sum(0), rtol=1e-6, atol=1e-3)


def test_bench_split_floor_command_writes_its_own_file(bench, monkeypatch, tmp_path, capsys):
    # --split-floor prints its table and writes mla_split_floor.json by default (not over a bench run's
    # mla_decode.json)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "GPU")
    rows = [dict(pieces=0, partials="read floor", us=14.5), dict(pieces=64, partials="fp32", us=22.4)]
    monkeypatch.setattr(bench, "run_split_floor", lambda flush: rows)
    assert bench.main(["--split-floor", "--flush", "read"]) == {"split_floor": rows}
    assert json.loads((tmp_path / "mla_split_floor.json").read_text()) == {"flush": "read", "split_floor": rows}
    assert not (tmp_path / "mla_decode.json").exists()
    out = capsys.readouterr().out
    assert "read flush" in out and "22.4" in out


def test_bench_only_and_heads_filter_the_cases(bench, monkeypatch):
    # --only a,b keeps the cases whose name contains a or b, --heads 16,128 those head counts; a bad head list is a
    # usage error
    seen = {}
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "measure_ceilings", lambda device: Ceilings(3000.0, 700.0, "GPU"))

    def fake_run(shapes, *a, **k):
        seen["names"] = {s.get("name", "uniform") for s in shapes}
        seen["heads"] = {s["H"] for s in shapes}
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run_kernel_bench", fake_run)
    with pytest.raises(SystemExit):
        bench.main(["--only", "skewed,1x32k,random"])
    assert seen["names"] == {"skewed", "1x32k+63x512", "64 random in [1,8k]"}
    assert seen["heads"] == {16, 64, 128}
    with pytest.raises(SystemExit):
        bench.main(["--heads", "16,128", "--only", "uniform"])
    assert (seen["names"], seen["heads"]) == ({"uniform"}, {16, 128})
    with pytest.raises(SystemExit) as e:
        bench.main(["--heads", "sixteen"])
    assert e.value.code == 2


def test_bench_writes_mla_decode_json_with_the_ceilings_under_their_names(bench, monkeypatch, tmp_path):
    # the default output is mla_decode.json in the current directory, its ceilings under the names the tables and
    # the results in docs/bench-h100/ use (mla_runner.roofline's Ceilings renamed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "measure_ceilings", lambda device: Ceilings(3000.0, 700.0, "GPU"))
    row = dict(name="uniform", H=16, B=1, L=4096, q_len=1, impl="triton", kv_MB=4.7, us=10.0, GBps=470.0,
               TFLOPs=1.0, floor_us=1.6, pct_floor=16.0, read_us=5.0, num_parts=1, flashmla_us=None)
    monkeypatch.setattr(bench, "run_kernel_bench", lambda shapes, *a, **k: [dict(row) for _ in shapes])
    result = bench.main(["--quick", "--heads", "16", "--only", "uniform", "--no-metadata"])
    saved = json.loads((tmp_path / "mla_decode.json").read_text())
    assert saved["ceilings"] == {"copy_GBps": 3000.0, "matmul_bf16_TFLOPs": 700.0, "device": "GPU"}
    assert saved["ceilings"] == result["ceilings"] and saved["flush"] == "write"
    cases = [s for s in bench.kernel_shapes(True) if s["H"] == 16 and "name" not in s]
    assert len(saved["kernel"]) == len(cases) == 8 and saved["kernel"][0] == row


def test_bench_register_summary(bench):
    # the tile sweep's registers and spills, from the kernels Triton compiled for a config (none known: "?")
    k = lambda regs, spills: type("K", (), dict(n_regs=regs, n_spills=spills))()
    assert bench.register_summary([k(168, 0)]) == "regs=168 spills=0"
    assert bench.register_summary([k(168, 0), k(128, 4), k(168, 0)]) == "regs=128-168 spills=0-4"
    assert bench.register_summary([]) == "regs=? spills=?"
    assert bench.register_summary([object()]) == "regs=? spills=?"
    assert bench.compiled_kernels(object()) == {}


@pytest.mark.gpu
def test_kernel_bench_rows_and_the_per_layer_column(bench, capsys):
    # run_kernel_bench on two small shapes with a 3-layer graph: the derived columns follow from the times, the
    # per-layer time is a time (a graph of 3 layers, each reading its own cache, is not 3x one replay's floor)
    ceilings = dict(copy_GBps=3000.0, matmul_bf16_TFLOPs=700.0, device="test")
    shapes = [dict(H=64, lens=[1024, 300], q_len=1, L=1024), dict(H=16, lens=[2048], q_len=2, L=2048)]
    rows = bench.run_kernel_bench(shapes, ceilings, layers=3)
    for r, s in zip(rows, shapes, strict=True):
        nbytes = sum(s["lens"]) * 576 * 2
        assert r["GBps"] == pytest.approx(nbytes / r["us"] / 1e3)
        assert r["floor_us"] == pytest.approx(max(nbytes / 3e6, sum(2 * s["H"] * s["q_len"] * L * 1088
                                                                    for L in s["lens"]) / 700e6))
        assert r["layers"] == 3 and 0 < r["layer_us"] < 3 * r["us"]
        # the read floor: a plain read of the same bytes timed the same way, under the call, above an empty replay
        assert 1.0 < r["read_us"] < r["us"] and 0 < r["read_layer_us"] < r["layer_us"], r
        fm = r["flashmla_us"]
        assert fm is None or isinstance(fm, float), fm  # FlashMLA: no 16-head kernel, or not installed
        assert (r.get("flashmla_layer_us") is None) == (fm is None)
    bench.print_tables(dict(ceilings=ceilings, kernel=rows))
    assert "us/layer" in capsys.readouterr().out


@pytest.mark.gpu
def test_kernel_bench_with_a_read_flush(bench):
    # --flush read: L2 emptied by reading 256 MB before every replay (left clean) instead of zeroing it (left
    # dirty); the same small call (1.5 MB of KV) times within a factor of two either way
    ceilings = dict(copy_GBps=3000.0, matmul_bf16_TFLOPs=700.0, device="test")
    shape = [dict(H=64, lens=[1024, 300], q_len=1, L=1024)]
    write, = bench.run_kernel_bench(shape, ceilings, flashmla=False)
    read, = bench.run_kernel_bench(shape, ceilings, flashmla=False, flush="read")
    assert 0.5 < read["us"] / write["us"] < 2.0, (read["us"], write["us"])
