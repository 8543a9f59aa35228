"""MLA decode kernels (persistent split-KV decode + merge) against the torch reference.

Without a CUDA GPU the Triton kernels run under the interpreter (set before the kernels are imported).
Tolerances: kernels.testing.REL_TOL (fp32 1e-4, fp16 5e-3, bf16 2e-2 on the relative Frobenius error).
"""
import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.metadata import make_metadata_builder  # noqa: E402
from kernels.mla_decode import mla_decode  # noqa: E402
from kernels.reference import mla_attention_reference  # noqa: E402
from kernels.testing import REL_TOL, make_problem, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(seq_lens, q_lens, H, page, *, strategy="persistent", dtype=torch.float32, kv_lora_rank=512,
             rope_dim=64, seed=0, max_batch=None, nan_tail=False, **builder_kw):
    """Decode with poisoned output; check active rows against the reference and padding rows untouched."""
    pb = make_problem(seq_lens, q_lens, H, page, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, dtype=dtype,
                      device=DEVICE, seed=seed, nan_tail=nan_tail)
    builder = make_metadata_builder(
        strategy, num_heads=H, max_batch=max_batch or len(seq_lens), max_q_len=max(max(q_lens), 1),
        max_pages_per_seq=pb.max_pages, page_size=page, device=DEVICE, kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim, **builder_kw)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table, pb.seq_lens_host, pb.q_lens_host)
    sm_scale = (kv_lora_rank + rope_dim) ** -0.5
    T = pb.q.shape[0]
    out = torch.full((T, H, kv_lora_rank), float("nan"), dtype=dtype, device=DEVICE)
    ret = mla_decode(pb.q, pb.kv_cache, meta, sm_scale, kv_lora_rank, out=out)
    assert ret is out
    ref = mla_attention_reference(pb.q, pb.kv_cache, pb.qo_indptr, pb.seq_lens, pb.block_table, sm_scale,
                                  kv_lora_rank)
    active = torch.zeros(T, dtype=torch.bool)
    qo = pb.qo_indptr.tolist()
    for b, L in enumerate(seq_lens):
        if L > 0:
            active[qo[b]:qo[b + 1]] = True
    active = active.to(DEVICE)
    assert torch.isnan(out[~active]).all(), "padding rows were written"
    assert torch.isfinite(out[active]).all(), "active rows not written or not finite"
    if active.any():
        err = rel_err(out[active], ref[active])
        assert err < REL_TOL[dtype], f"rel err {err:.2e} > {REL_TOL[dtype]:.0e}"
    return out, meta


@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("H", [1, 5, 8, 16])
def test_decode_heads_pages(H, page):
    # lengths 1, a page multiple, and an odd length; pages >= the block take the descriptor path
    import kernels.mla_decode as md

    run_case([1, 64, 37, 200], [1, 1, 1, 1], H, page)
    assert md.mla_decode.last_used_tma == (page >= 16)  # fp32 blocks are 16 tokens


@pytest.mark.parametrize("page", [1, 16, 64])
def test_decode_ignores_unwritten_rows(page):
    # NaN in the rows past each request's end (its last page's unwritten rows): the masked tail block
    # (fetched whole through a tensor descriptor when it lies in one page) must not let them through
    run_case([37, 200, 5, 64], [1, 2, 1, 1], 4, page, dtype=torch.bfloat16, nan_tail=True, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_dtypes(dtype):
    run_case([130, 7, 64, 1], [1, 1, 1, 1], 8, 16, dtype=dtype, seed=1)


def test_decode_one_long_among_short():
    # the long request is cut over several parts, short ones share a part
    out, meta = run_case([900, 3, 5, 2, 9, 1], [1] * 6, 4, 16, num_parts=4, min_chunk=1)
    assert meta.num_splits.tolist()[0] > 1
    # a cap on the parts of one request (the slices grow instead)
    out, meta = run_case([900, 3, 5, 2, 9, 1], [1] * 6, 4, 16, num_parts=8, min_chunk=1, max_kv_splits=3)
    assert 1 < max(meta.num_splits.tolist()) <= 3
    # more splits than the merge kernel loads at once (32)
    out, meta = run_case([3000, 3, 5], [1] * 3, 2, 16, num_parts=40, min_chunk=1, seed=5, plan_block=16)
    assert meta.num_splits.tolist()[0] > 32


@pytest.mark.parametrize("tiles", [(8, 512, 2), (1, 256, 16), (4, 128, 4), (2, 512, 1)])
def test_merge_tiles_agree(tiles):
    # every merge tile shape gives the reference, for a request cut in many parts (more than a load's splits)
    # and short requests cut in two beside it; rows of requests not cut are left alone
    from kernels.mla_merge import mla_merge

    out, meta = run_case([2000, 130, 70, 5], [1, 2, 1, 1], 3, 16, num_parts=24, min_chunk=1, plan_block=16,
                         split_cost=0)
    splits = meta.num_splits.tolist()
    assert splits[0] > 16 and max(splits[1:]) > 1 and min(splits) == 1, splits
    again = out.clone()
    unsplit = [i for i, n in enumerate(meta.qo_indptr.tolist()[:-1]) if splits[i] == 1]
    again[:, :, :] = float("nan")
    for i in unsplit:
        again[meta.qo_indptr[i]:meta.qo_indptr[i + 1]] = out[meta.qo_indptr[i]:meta.qo_indptr[i + 1]]
    mla_merge(again, meta, tiles=tiles)
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-6)


def test_bench_flush_modes_are_checked(capsys):
    # the L2 flush before every timed replay is one of two (kernels.cuda_graph.FLUSHES): anything else is refused
    # before any GPU work, by graph_time and by the command line
    from kernels.bench import main
    from kernels.cuda_graph import FLUSHES, graph_time

    assert FLUSHES == ("write", "read")
    with pytest.raises(ValueError, match="flush must be one of"):
        graph_time(lambda: None, flush="dirty")
    with pytest.raises(SystemExit):
        main(["--flush", "dirty"])
    assert "invalid choice: 'dirty'" in capsys.readouterr().err


@pytest.mark.parametrize("n, grid, block, iters", [(1000, 3, 128, 3), (4096, 4, 256, 4), (777, 5, 64, 3)])
def test_bench_stream_read_reads_every_word_once(n, grid, block, iters):
    # the read floor's kernel (kernels.bench.read_floor_us): grid-stride over n int32 words, one xor a program; the
    # xor of the programs' words is the xor of the buffer only if every word is read exactly once
    import functools
    import operator

    from kernels.bench import _stream_read_kernel

    assert grid * block * iters >= n  # the launch covers the buffer, as read_floor_us sizes it
    src = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    out = torch.empty(grid, dtype=torch.int32)
    _stream_read_kernel()[(grid,)](src, out, n, iters, BLOCK=block)
    assert functools.reduce(operator.xor, out.tolist()) == functools.reduce(operator.xor, src.tolist())


@pytest.mark.parametrize("n, pieces, words, block", [(1000, 3, 40, 64), (777, 5, 0, 32), (4096, 4, 300, 256)])
def test_bench_split_floor_moves_every_byte(n, pieces, words, block):
    # the split floor's kernels (kernels.bench.split_floor_us): piece p reads words [p * per, (p + 1) * per) once and
    # writes `words` partial words (its xor + the word's index); the sum kernel adds the pieces' partials up
    import functools
    import operator

    from kernels.bench import _split_floor_kernels

    stream_piece, sum_pieces = _split_floor_kernels()
    src = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    per = -(-n // pieces)
    part = torch.full((max(pieces * words, 1),), float("nan"))
    out = torch.full((max(words, 1),), float("nan"))
    stream_piece[(pieces,)](src, part, n, per, words, BLOCK=block, CB=16)
    if words == 0:
        assert part.isnan().all()  # nothing written
        return
    xors = [functools.reduce(operator.xor, src[p * per:(p + 1) * per].tolist(), 0) for p in range(pieces)]
    want = torch.tensor(xors, dtype=torch.int32).float()[:, None] + torch.arange(words, dtype=torch.float32)
    torch.testing.assert_close(part.view(pieces, words), want, rtol=0, atol=0)
    sum_pieces[(-(-words // 64),)](part, out, words, P=pieces, CB=64)
    torch.testing.assert_close(out, want.sum(0), rtol=1e-6, atol=1e-3)


def test_bench_split_floor_command_writes_its_own_file(monkeypatch, tmp_path, capsys):
    # --split-floor prints its table and writes mla_split_floor.json by default (not over a bench run's mla_bench.json)
    import json

    from kernels import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "GPU")
    rows = [dict(pieces=0, partials="read floor", us=14.5), dict(pieces=64, partials="fp32", us=22.4)]
    monkeypatch.setattr(bench, "run_split_floor", lambda flush: rows)
    assert bench.main(["--split-floor", "--flush", "read"]) == {"split_floor": rows}
    assert json.loads((tmp_path / "mla_split_floor.json").read_text()) == {"flush": "read", "split_floor": rows}
    assert not (tmp_path / "mla_bench.json").exists()
    out = capsys.readouterr().out
    assert "read flush" in out and "22.4" in out


def test_bench_only_and_heads_filter_the_cases(monkeypatch):
    # --only a,b keeps the cases whose name contains a or b, --heads 16,128 those head counts; a bad head list is a
    # usage error
    from kernels import bench

    seen = {}
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "measure_ceilings", lambda: {})

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


@pytest.mark.parametrize("strategy", ["persistent", "per_step"])
def test_decode_mixed_q_len(strategy):
    # the longest q is not the last request; causal within the new tokens
    run_case([70, 200, 5, 33], [2, 4, 1, 3], 5, 16, strategy=strategy, num_parts=3, min_chunk=1)


def test_decode_padding_slots():
    # CUDA-graph padding: seq_len 0 / q_len 0 slots mid-batch and at the end, never written, never hang
    run_case([40, 0, 90, 0, 0], [1, 1, 2, 0, 1], 8, 16, max_batch=8)
    run_case([0, 0], [1, 1], 8, 16)


def test_decode_skips_out_of_bounds_requests():
    # a request past its block-table row or over max_q_len is dropped on the GPU (no host sync): its rows stay
    # unwritten, the others are exact, and the builder's check() reports it
    H, page = 4, 16
    pb = make_problem([40, 100, 30, 70, 0], [1, 1, 2, 1, 0], H, page, dtype=torch.float32, device=DEVICE)
    builder = make_metadata_builder("persistent", num_heads=H, max_batch=5, max_q_len=1,
                                    max_pages_per_seq=pb.max_pages, page_size=page, device=DEVICE, num_parts=3,
                                    min_chunk=1)
    seq_lens = pb.seq_lens.clone()
    seq_lens[1] = pb.max_pages * page + 7
    meta = builder.build(seq_lens, pb.qo_indptr, pb.block_table)
    out = torch.full((pb.q.shape[0], H, 512), float("nan"), device=DEVICE)
    mla_decode(pb.q, pb.kv_cache, meta, 576 ** -0.5, 512, out=out)
    ref = mla_attention_reference(pb.q, pb.kv_cache, pb.qo_indptr, pb.seq_lens, pb.block_table, 576 ** -0.5, 512)
    kept = torch.tensor([True, False, False, False, True], device=DEVICE)  # tokens: 0 | 1 | 2, 3 | 4
    assert torch.isnan(out[~kept]).all()
    assert rel_err(out[kept], ref[kept]) < REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="dropped requests"):
        builder.check()


def test_decode_small_odd_dims():
    # the tiny test models: kv_lora_rank 32, rope 8 (D = 40, not a power of two)
    run_case([17, 3, 50], [1, 3, 2], 5, 16, kv_lora_rank=32, rope_dim=8, seed=2)
    run_case([17, 100], [1, 1], 4, 1, kv_lora_rank=24, rope_dim=0, seed=3, num_parts=3, min_chunk=1)


def test_strategies_agree():
    lens, qls = [300, 2, 64, 129], [1, 2, 1, 1]
    a, _ = run_case(lens, qls, 8, 64, strategy="persistent", num_parts=3, min_chunk=1)
    b, meta = run_case(lens, qls, 8, 64, strategy="per_step", num_kv_splits=3)
    assert meta.max_merges > 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_decode_allocates_output_and_checks_inputs():
    pb = make_problem([10, 20], [1, 1], 4, 16, dtype=torch.float32, device=DEVICE)
    builder = make_metadata_builder("persistent", num_heads=4, max_batch=2, max_q_len=1,
                                    max_pages_per_seq=pb.max_pages, page_size=16, device=DEVICE)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    out = mla_decode(pb.q, pb.kv_cache, meta, 0.1, 512)
    assert out.shape == (2, 4, 512) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        mla_decode(pb.q.half(), pb.kv_cache, meta, 0.1, 512)
    with pytest.raises(ValueError, match="heads"):
        mla_decode(pb.q[:, :2].contiguous(), pb.kv_cache, meta, 0.1, 512)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode(pb.q, pb.kv_cache, meta, 0.1, 256)
    with pytest.raises(ValueError, match="max_q_len"):
        mla_decode(torch.cat([pb.q, pb.q]), pb.kv_cache, meta, 0.1, 512)
    with pytest.raises(ValueError, match="out must be"):
        mla_decode(pb.q, pb.kv_cache, meta, 0.1, 512, out=torch.empty(2, 4, 500, device=DEVICE))
    with pytest.raises(ValueError, match="65535 a launch takes"):  # parts are the grid's second axis
        mla_decode(pb.q, pb.kv_cache, dataclasses.replace(meta, num_parts=65536), 0.1, 512)


@pytest.mark.parametrize("cfg,dtype", [
    (dict(block_h=16, block_n=16, num_warps=4, num_stages=1, use_tma=False), torch.float32),
    (dict(block_h=32, block_n=32, num_warps=4, num_stages=1), torch.float32),
    # (bf16: an fp32 block of 128 x 576 would not fit a GPU's shared memory)
    (dict(block_h=16, block_n=128, num_warps=4, num_stages=1), torch.bfloat16)])
def test_decode_config_variants(cfg, dtype):
    """Tile variants (no tensor descriptors, blocks wider than a page or plan unit) compute the same thing."""
    from kernels.mla_decode import DecodeConfig

    pb = make_problem([70, 3, 200], [2, 1, 1], 5, 16, dtype=dtype, device=DEVICE, seed=4)
    builder = make_metadata_builder("persistent", num_heads=5, max_batch=3, max_q_len=2,
                                    max_pages_per_seq=pb.max_pages, page_size=16, device=DEVICE, num_parts=3,
                                    min_chunk=1)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    out = mla_decode(pb.q, pb.kv_cache, meta, 0.05, 512, config=DecodeConfig(**cfg))
    ref = mla_attention_reference(pb.q, pb.kv_cache, pb.qo_indptr, pb.seq_lens, pb.block_table, 0.05, 512)
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_reference_chunks_long_prefills(monkeypatch):
    """The reference takes queries in chunks (long prefills): the same output with a tiny chunk budget."""
    from kernels import reference

    p = make_problem([50, 7], [50, 3], 3, 16, kv_lora_rank=32, rope_dim=8, dtype=torch.float32)
    whole = reference.mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.2, 32)
    monkeypatch.setattr(reference, "MAX_SCORES", 3 * 50 * 4)  # 4 query rows per chunk
    chunked = reference.mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.2, 32)
    assert torch.allclose(whole, chunked, rtol=1e-6, atol=1e-6)
