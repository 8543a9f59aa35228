"""MLA prefill attention (MHA form, ragged requests) and the log-sum-exp merge against the torch references.

Without a CUDA GPU the Triton kernels run under the interpreter, on small shapes (DeepSeek-V3's widths are the
``gpu`` tests). Tolerances: mla_testing.numerics.REL_TOL on the output's relative Frobenius error, LSE_TOL on the
largest absolute error of the log-sum-exp (rows with no key must be -inf on both sides).
"""
import pytest
import torch
import torch.nn.functional as F

from mla_runner.kernels.attention_merge import merge_attention_states, merge_attention_states_reference
from mla_runner.kernels.mla_prefill import PrefillConfig, default_config, mla_prefill_attention, mla_prefill_reference
from mla_testing.numerics import REL_TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}
SMALL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)  # many blocks on short requests


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def make(q_lens, k_lens, H, dn=16, dr=8, dv=16, dtype=torch.float32, seed=0):
    """q [T, H, dn + dr], k_nope and v as views of one [S, H, dn + dv] tensor (kv_b_proj's output), k_pe a view of
    the rope columns of a [S, 32 + dr] tensor (kv_a_proj's output), the cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    T, S = sum(q_lens), sum(k_lens)
    q = torch.randn(T, H, dn + dr, generator=g)
    kv = torch.randn(S, H, dn + dv, generator=g)
    kv_a = torch.randn(S, 32 + dr, generator=g)
    q, kv, kv_a = (t.to(dtype=dtype, device=DEVICE) for t in (q, kv, kv_a))
    return q, kv[..., :dn], kv_a[:, 32:], kv[..., dn:], cu(q_lens), cu(k_lens)


def check(q_lens, k_lens, H, dn=16, dr=8, dv=16, dtype=torch.float32, causal=True, config=None, seed=0):
    q, kn, kr, v, cq, ck = make(q_lens, k_lens, H, dn, dr, dv, dtype, seed)
    assert not kn.is_contiguous() and not v.is_contiguous() and (dr == 0 or not kr.is_contiguous())
    scale = (dn + dr) ** -0.5
    out, lse = mla_prefill_attention(q, kn, kr, v, cq, ck, max(q_lens), scale, causal, config=config)
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck, max(q_lens), scale, causal)
    assert out.shape == (q.shape[0], H, dv) and out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, lse, ref, ref_lse, dtype)
    return out, lse


def assert_close(out, lse, ref, ref_lse, dtype):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with no key differ"
    assert torch.isfinite(out).all()
    has = torch.isfinite(ref_lse)
    if has.any():
        err = rel_err(out[has], ref[has])
        assert err < REL_TOL[dtype], f"rel err {err:.2e} > {REL_TOL[dtype]:.0e}"
        lse_err = (lse[has] - ref_lse[has]).abs().max().item()
        assert lse_err < LSE_TOL[dtype], f"lse err {lse_err:.2e} > {LSE_TOL[dtype]:.0e}"
    assert (out[~has] == 0).all(), "a row with no key must be 0"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k_extra", [0, 11], ids=["q_len==k_len", "after_context"])
def test_prefill_odd_lengths(causal, k_extra):
    # 1-token requests and lengths around the 16-wide blocks; with k_extra, each request's queries come after
    # k_extra cached keys (causal: bottom-right, the diagonal off the block grid)
    q_lens = [1, 7, 33, 65, 1]
    check(q_lens, [n + k_extra for n in q_lens], 3, causal=causal, config=SMALL)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_n", [16, 32])
def test_prefill_every_diagonal_offset(block_n, causal):
    # queries starting 0..block_n keys into their keys (and key counts at every offset from a block's end): the
    # diagonal and the end of the keys cross the key blocks at every offset, so an unmasked range one key too long
    # or a masked range one key too short shows in some request
    config = PrefillConfig(block_m=16, block_n=block_n, num_warps=4, num_stages=1)
    check([21] * (block_n + 1), [21 + d for d in range(block_n + 1)], 1, causal=causal, config=config, seed=14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_dtypes_and_heads(dtype):
    check([7, 40, 1], [20, 40, 1], 16, 32, 16, 32, dtype=dtype, seed=1)
    check([50, 3], [50, 9], 1, 32, 16, 32, dtype=dtype, seed=2)


@pytest.mark.parametrize("dims", [(24, 8, 20), (20, 12, 24), (16, 0, 16)], ids=["24-8-20", "20-12-24", "no_rope"])
def test_prefill_dims_not_powers_of_two(dims):
    dn, dr, dv = dims
    check([7, 33], [7, 45], 3, dn, dr, dv, config=SMALL, seed=3)


@pytest.mark.parametrize("cfg", [(16, 32), (32, 16), (64, 16)], ids=["m16n32", "m32n16", "m64n16"])
def test_prefill_tiles(cfg):
    # query blocks narrower and wider than key blocks: the unmasked / masked split and the key blocks skipped above
    # the diagonal must cover exactly each row's keys
    config = PrefillConfig(block_m=cfg[0], block_n=cfg[1], num_warps=4, num_stages=1)
    check([65, 20, 1], [100, 20, 17], 2, config=config, seed=4)
    check([65, 20], [100, 33], 2, causal=False, config=config, seed=5)


def test_prefill_rows_without_keys():
    # a request with no key (out 0, lse -inf), queries before the first key (q_len > k_len, bottom-right), an empty
    # request among them, and rows past the last request (not written)
    q_lens, k_lens = [5, 9, 0, 4], [0, 3, 6, 4]
    q, kn, kr, v, cq, ck = make(q_lens, k_lens, 3, seed=6)
    T = q.shape[0]
    q = torch.cat([q, torch.randn(2, 3, 24, device=DEVICE)])  # two rows no request owns
    out = torch.full((T + 2, 3, 16), float("nan"), device=DEVICE)
    lse = torch.full((T + 2, 3), float("nan"), device=DEVICE)
    ret = mla_prefill_attention(q, kn, kr, v, cq, ck, 9, 0.3, True, out=out, lse=lse, config=SMALL)
    assert ret[0] is out and ret[1] is lse
    assert out[T:].isnan().all() and lse[T:].isnan().all()
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck, 9, 0.3, True)
    assert_close(out[:T], lse[:T], ref[:T], ref_lse[:T], torch.float32)
    assert torch.isneginf(lse[:5]).all() and (out[:5] == 0).all()  # k_len 0
    assert torch.isneginf(lse[5:11]).all() and torch.isfinite(lse[11:T]).all()  # 9 queries, 3 keys


def test_prefill_into_strided_outputs_and_inputs():
    # out and lse preallocated as views of larger buffers, q a view of a wider tensor: strides are honoured and
    # nothing outside the views is written
    q_full, kn, kr, v, cq, ck = make([33, 7], [40, 7], 3, dr=8, seed=7)
    q = torch.cat([q_full, torch.zeros_like(q_full)], dim=-1)[..., :24]
    o_buf = torch.full((40, 3, 20), float("nan"), device=DEVICE)
    l_buf = torch.full((40, 5), float("nan"), device=DEVICE)
    out, lse = o_buf[:, :, 2:18], l_buf[:, 1:4]
    mla_prefill_attention(q, kn, kr, v, cq, ck, 33, 0.25, out=out, lse=lse)
    ref, ref_lse = mla_prefill_reference(q_full, kn, kr, v, cq, ck, 33, 0.25)
    assert_close(out, lse, ref, ref_lse, torch.float32)
    assert o_buf[:, :, :2].isnan().all() and o_buf[:, :, 18:].isnan().all()
    assert l_buf[:, 0].isnan().all() and l_buf[:, 4].isnan().all()


def test_reference_against_sdpa():
    # the reference itself, one request with q_len == k_len (bottom-right = top-left), against torch's SDPA over the
    # concatenated keys [k_nope | k_pe broadcast to every head]; its lse against a direct logsumexp
    q, kn, kr, v, cq, ck = make([37], [37], 3, seed=8)
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck, 37, 0.3, True)
    k = torch.cat([kn, kr[:, None, :].expand(-1, 3, -1)], dim=-1)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                          scale=0.3).transpose(0, 1)
    assert rel_err(ref, sdpa) < REL_TOL[torch.float32]
    s = torch.einsum("qhd,khd->hqk", q, k) * 0.3
    s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.testing.assert_close(ref_lse, s.logsumexp(-1).T, rtol=0, atol=1e-5)


def test_reference_chunks_queries(monkeypatch):
    from mla_runner.kernels import mla_prefill

    args = make([30, 9], [41, 9], 2, seed=9)
    whole = mla_prefill.mla_prefill_reference(*args, 30, 0.2)
    monkeypatch.setattr(mla_prefill, "MAX_SCORES", 2 * 41 * 4)  # 4 queries a chunk
    chunked = mla_prefill.mla_prefill_reference(*args, 30, 0.2)
    torch.testing.assert_close(whole, chunked, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_all_requests_at_once_equals_one_at_a_time(monkeypatch, causal):
    # small steps take the padded all-requests form, large ones the per-request loop: the same numbers, rows of a
    # request without keys included (out 0, lse -inf)
    from mla_runner.kernels import mla_prefill

    args = make([5, 1, 7, 3], [9, 1, 7, 0], 3, seed=10)
    batched = []
    at_once = mla_prefill._all_requests_at_once
    monkeypatch.setattr(mla_prefill, "_all_requests_at_once", lambda *a: batched.append(1) or at_once(*a))
    together = mla_prefill.mla_prefill_reference(*args, 7, 0.25, causal)
    assert batched == [1]
    monkeypatch.setattr(mla_prefill, "MAX_SCORES", 3 * 17)  # below every query's scores: one request at a time
    alone = mla_prefill.mla_prefill_reference(*args, 7, 0.25, causal)
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    assert bool((together[1][-3:] == float("-inf")).all()) and bool((together[0][-3:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_two_key_sets_is_one_call(dtype):
    # each request's keys split in two (one part empty for some requests): two non-causal calls merged = one call
    # over all the keys; and the chunked-prefill shape: cached context (non-causal) merged with the new tokens
    # attending to themselves (causal) = one causal call over context + new tokens
    q_lens, ctx, new = [7, 33, 1, 12], [20, 0, 9, 31], [7, 33, 1, 0]
    H, dn, dr, dv = 3, 16, 8, 16
    q, kn, kr, v, cq, _ = make(q_lens, [c + n for c, n in zip(ctx, new)], H, dn, dr, dv, dtype, seed=10)
    ck_all = cu([c + n for c, n in zip(ctx, new)])
    starts = ck_all.tolist()
    ctx_idx = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, ctx)]).to(DEVICE)
    new_idx = torch.cat([torch.arange(s + c, s + c + n) for s, c, n in zip(starts, ctx, new)]).to(DEVICE)
    parts = [(kn[i], kr[i], v[i], cu(lens)) for i, lens in ((ctx_idx, ctx), (new_idx, new))]
    scale = 0.3
    # non-causal both sides
    (oa, la), (ob, lb) = (mla_prefill_attention(q, a, b, c, cq, ck, 33, scale, False) for a, b, c, ck in parts)
    out, lse = merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck_all, 33, scale, False)
    assert_close(out, lse, ref, ref_lse, dtype)
    # context non-causal, new tokens causal (request 3 brings no new token for its 12 queries: only its context;
    # the causal call's rows of request 3 have no key)
    q_new = torch.cat([q[s:s + n] for s, n in zip(cq.tolist(), new)])
    keep = torch.cat([torch.arange(s, s + n) for s, n in zip(cq.tolist(), new)]).to(DEVICE)
    oc, lc = mla_prefill_attention(q_new, *parts[1][:3], cu(new), parts[1][3], 33, scale, True)
    ob, lb = torch.zeros_like(oa), torch.full_like(la, float("-inf"))
    ob[keep], lb[keep] = oc, lc
    out, lse = merge_attention_states(oa, la, ob, lb, out=oa, lse=la)  # in place
    assert out is oa and lse is la
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck_all, 33, scale, True)
    assert_close(out[keep], lse[keep], ref[keep], ref_lse[keep], dtype)
    only_ctx = slice(cq[3].item(), cq[4].item())
    full, full_lse = mla_prefill_reference(q, kn, kr, v, cq, ck_all, 33, scale, False)
    assert_close(out[only_ctx], lse[only_ctx], full[only_ctx], full_lse[only_ctx], dtype)


def test_merge_infinities():
    # -inf on either side or both (both: out 0, lse -inf), whatever the empty side's output holds (NaN here);
    # heads over one block of the kernel, a value width that is not a power of two, strided inputs
    g = torch.Generator().manual_seed(11)
    T, H, dv = 5, 37, 20
    oa = torch.randn(T, H, dv + 4, generator=g)[..., :dv].to(DEVICE)
    ob = torch.randn(T, H, dv, generator=g).to(DEVICE)
    la = torch.randn(T, H, generator=g).to(DEVICE) * 3
    lb = torch.randn(T, H, generator=g).to(DEVICE) * 3
    la[0], lb[1] = float("-inf"), float("-inf")
    la[2, :5], lb[2, :5] = float("-inf"), float("-inf")
    oa[0], ob[1] = float("nan"), float("nan")
    out, lse = merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = merge_attention_states_reference(oa, la, ob, lb)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert (out[2, :5] == 0).all() and torch.isneginf(lse[2, :5]).all()
    torch.testing.assert_close(out[0], ob[0])
    torch.testing.assert_close(lse[1], la[1])


def test_input_checks():
    q, kn, kr, v, cq, ck = make([4, 3], [4, 5], 2, seed=12)
    call = lambda **kw: mla_prefill_attention(**{**dict(q=q, k_nope=kn, k_pe=kr, v=v, cu_seqlens_q=cq,
                                                         cu_seqlens_k=ck, max_q_len=4, sm_scale=0.2), **kw})
    out, lse = call()
    assert out.shape == (7, 2, 16) and lse.shape == (7, 2)
    with pytest.raises(ValueError, match="one dtype"):
        call(v=v.half())
    with pytest.raises(ValueError, match="unsupported dtype"):
        call(q=q.double(), k_nope=kn.double(), k_pe=kr.double(), v=v.double())
    with pytest.raises(ValueError, match="k_pe must be"):
        call(k_pe=kr[:, None, :])
    with pytest.raises(ValueError, match="same S"):
        call(k_pe=kr[:-1])
    with pytest.raises(ValueError, match="q.s last dim 20"):
        call(q=q[..., :20])
    with pytest.raises(ValueError, match="contiguous in the last dim"):
        call(k_nope=torch.randn(9, 2, 32, device=DEVICE)[..., ::2])
    with pytest.raises(ValueError, match="int32"):
        call(cu_seqlens_q=cq.long())
    with pytest.raises(ValueError, match="entries"):
        call(cu_seqlens_k=ck[:2])
    with pytest.raises(ValueError, match="max_q_len"):
        call(max_q_len=-1)
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(7, 2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="lse must be"):
        call(lse=torch.empty(7, 2, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="over max_q_len"):
        mla_prefill_reference(q, kn, kr, v, cq, ck, 3, 0.2)
    with pytest.raises(ValueError, match="out_a and out_b"):
        merge_attention_states(out, lse, out[:, :1], lse)
    with pytest.raises(ValueError, match="lse_b must be"):
        merge_attention_states(out, lse, out, lse[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        PrefillConfig(block_m=48, block_n=16, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="num_warps"):
        PrefillConfig(block_m=64, block_n=16, num_warps=3, num_stages=1)


def test_default_config():
    assert default_config(100_000, 2) == PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert default_config(20, 2).block_m == 64
    assert default_config(100_000, 4).block_m == 64  # fp32 on a GPU
    assert default_config(5, 4, on_gpu=False).block_m == 16


# ------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 widths on a GPU (Dn 128, Dr 64, Dv 128, bf16)


def _dsv3_check(q_lens, k_lens, H, causal=True, config=None):
    q, kn, kr, v, cq, ck = make(q_lens, k_lens, H, 128, 64, 128, torch.bfloat16, seed=13)
    scale = 192 ** -0.5
    out, lse = mla_prefill_attention(q, kn, kr, v, cq, ck, max(q_lens), scale, causal, config=config)
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck, max(q_lens), scale, causal)
    assert_close(out, lse, ref, ref_lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [128, 16])
def test_gpu_dsv3_prefill(H):
    _dsv3_check([1000, 4097, 1, 130], [1000, 4097, 1, 130], H)  # whole prompts
    _dsv3_check([1000, 1, 300, 64], [4097, 2000, 300, 0], H)  # chunks after cached context, an empty request
    _dsv3_check([1000, 77], [1500, 77], H, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)])
def test_gpu_dsv3_tiles(cfg):
    _dsv3_check([700, 1, 129], [900, 5, 129], 16, config=PrefillConfig(*cfg))


@pytest.mark.gpu
def test_gpu_dsv3_merge():
    # a long cached context attended in two chunks and merged = one call
    H, q_lens, k_lens = 128, [513, 64], [3000, 2100]
    q, kn, kr, v, cq, ck = make(q_lens, k_lens, H, 128, 64, 128, torch.bfloat16, seed=14)
    scale = 192 ** -0.5
    cut = [1234, 1000]
    a = torch.cat([torch.arange(s, s + c) for s, c in zip(ck.tolist(), cut)]).to(DEVICE)
    b = torch.cat([torch.arange(s + c, s + L) for s, c, L in zip(ck.tolist(), cut, k_lens)]).to(DEVICE)
    oa, la = mla_prefill_attention(q, kn[a], kr[a], v[a], cq, cu(cut), 513, scale, False)
    ob, lb = mla_prefill_attention(q, kn[b], kr[b], v[b], cq, cu([L - c for c, L in zip(cut, k_lens)]), 513,
                                   scale, False)
    out, lse = merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = mla_prefill_reference(q, kn, kr, v, cq, ck, 513, scale, False)
    assert_close(out, lse, ref, ref_lse, torch.bfloat16)
