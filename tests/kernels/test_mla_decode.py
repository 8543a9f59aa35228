"""MLA decode kernels (persistent split-KV decode + merge) against the torch reference.

Without a CUDA GPU the Triton kernels run under the interpreter. Tolerances: mla_testing.numerics.REL_TOL (fp32
1e-4, fp16 5e-3, bf16 2e-2 on the relative Frobenius error).
"""
import dataclasses

import pytest
import torch

from mla_runner.kernels.metadata import PersistentMetadataBuilder
from mla_runner.kernels.mla_decode import default_config, mla_decode, uses_tma
from mla_runner.kernels.reference import mla_attention_reference
from mla_runner.kernels.synthetic import make_problem
from mla_testing.numerics import REL_TOL, build_metadata, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(seq_lens, q_lens, H, page, *, strategy="persistent", dtype=torch.float32, kv_lora_rank=512,
             rope_dim=64, seed=0, max_batch=None, nan_tail=False, **builder_kw):
    """Decode with poisoned output; check active rows against the reference and padding rows untouched."""
    pb = make_problem(seq_lens, q_lens, H, page, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, dtype=dtype,
                      device=DEVICE, seed=seed, nan_tail=nan_tail)
    _, meta = build_metadata(
        strategy, pb.seq_lens, pb.qo_indptr, pb.block_table, pb.seq_lens_host, pb.q_lens_host, num_heads=H,
        max_batch=max_batch or len(seq_lens), max_q_len=max(max(q_lens), 1), max_pages_per_seq=pb.max_pages,
        page_size=page, device=DEVICE, kv_lora_rank=kv_lora_rank, **builder_kw)
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
    out, meta = run_case([1, 64, 37, 200], [1, 1, 1, 1], H, page)
    q = torch.empty(1, H, 576, device=DEVICE)
    kv = torch.empty(1, page, 576, device=DEVICE)
    cfg = default_config(H, 4, 512, q.is_cuda)
    assert uses_tma(q, kv, meta, 512, cfg) == (page >= 16)  # fp32 blocks are 16 tokens


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
    from mla_runner.kernels.mla_merge import mla_merge

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


@pytest.mark.parametrize("strategy", ["persistent", "per_step"])
def test_decode_mixed_q_len(strategy):
    # the longest q is not the last request; causal within the new tokens
    plan = dict(num_parts=3, min_chunk=1) if strategy == "persistent" else dict(num_kv_splits=3)
    run_case([70, 200, 5, 33], [2, 4, 1, 3], 5, 16, strategy=strategy, **plan)


def test_decode_padding_slots():
    # CUDA-graph padding: seq_len 0 / q_len 0 slots mid-batch and at the end, never written, never hang
    run_case([40, 0, 90, 0, 0], [1, 1, 2, 0, 1], 8, 16, max_batch=8)
    run_case([0, 0], [1, 1], 8, 16)


def test_decode_skips_out_of_bounds_requests():
    # a request past its block-table row or over max_q_len is dropped on the GPU (no host sync): its rows stay
    # unwritten, the others are exact, and the builder's check() reports it
    H, page = 4, 16
    pb = make_problem([40, 100, 30, 70, 0], [1, 1, 2, 1, 0], H, page, dtype=torch.float32, device=DEVICE)
    builder = PersistentMetadataBuilder(num_heads=H, max_batch=5, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=page, device=DEVICE, num_parts=3, min_chunk=1)
    seq_lens = pb.seq_lens.clone()
    seq_lens[1] = pb.max_pages * page + 7
    meta = builder.build(seq_lens, pb.qo_indptr, pb.block_table)
    out = torch.full((pb.q.shape[0], H, 512), float("nan"), device=DEVICE)
    mla_decode(pb.q, pb.kv_cache, meta, 576 ** -0.5, 512, out=out)
    ref = mla_attention_reference(pb.q, pb.kv_cache, pb.qo_indptr, pb.seq_lens, pb.block_table, 576 ** -0.5, 512)
    kept = torch.tensor([True, False, False, False, True], device=DEVICE)  # tokens: 0 | 1 | 2, 3 | 4
    assert torch.isnan(out[~kept]).all()
    assert rel_err(out[kept], ref[kept]) < REL_TOL[torch.float32]
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # check() reads the flag's host copy, refreshed by the build asynchronously
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
    builder = PersistentMetadataBuilder(num_heads=4, max_batch=2, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=16, device=DEVICE)
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
    from mla_runner.kernels.mla_decode import DecodeConfig

    pb = make_problem([70, 3, 200], [2, 1, 1], 5, 16, dtype=dtype, device=DEVICE, seed=4)
    builder = PersistentMetadataBuilder(num_heads=5, max_batch=3, max_q_len=2, max_pages_per_seq=pb.max_pages,
                                        page_size=16, device=DEVICE, num_parts=3, min_chunk=1)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    out = mla_decode(pb.q, pb.kv_cache, meta, 0.05, 512, config=DecodeConfig(**cfg))
    ref = mla_attention_reference(pb.q, pb.kv_cache, pb.qo_indptr, pb.seq_lens, pb.block_table, 0.05, 512)
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_reference_chunks_long_prefills(monkeypatch):
    """The reference takes queries in chunks (long prefills): the same output with a tiny chunk budget."""
    from mla_runner.kernels import reference

    p = make_problem([50, 7], [50, 3], 3, 16, kv_lora_rank=32, rope_dim=8, dtype=torch.float32)
    whole = reference.mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.2, 32)
    monkeypatch.setattr(reference, "MAX_SCORES", 3 * 50 * 4)  # 4 query rows per chunk
    chunked = reference.mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, 0.2, 32)
    assert torch.allclose(whole, chunked, rtol=1e-6, atol=1e-6)
