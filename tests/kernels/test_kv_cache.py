"""FP8 latent KV caches (kernels.kv_cache): the write and gather kernels against the torch references, and the decode
kernel reading FP8 caches.

Without a CUDA GPU the Triton kernels run under the interpreter. Tolerances:
- write: the stored bytes equal ``quantize_reference``'s (torch's casts) exactly; gather: equal to
  ``dequantize_reference`` exactly (fp32 and bf16 outputs);
- decode on an FP8 cache against the reference on the dequantized cache (the same numbers in): REL_TOL[q dtype]
  (interpreter: ~4e-7 fp32, ~3e-3 bf16, the bf16 output's rounding);
- against the reference on the original cache: FP8_TOL, e4m3's rounding of random normal latents (measured 3.2e-2 to
  3.8e-2 here, both layouts).
"""
import pytest
import torch

from mla_runner.kernels.kv_cache import (
    KVCacheLayout,
    dequantize_reference,
    gather_latent,
    per_tensor_scale,
    quantize_reference,
    write_latent,
)
from mla_runner.kernels.metadata import PersistentMetadataBuilder
from mla_runner.kernels.mla_decode import DecodeConfig, default_config, mla_decode, uses_tma
from mla_runner.kernels.reference import mla_attention_reference
from mla_runner.kernels.synthetic import make_problem
from mla_testing.numerics import REL_TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_TOL = 6e-2
KINDS = ["fp8", "fp8_ds_mla"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, as integers of its element size (NaN compares equal to itself)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def random_latent(T: int, D: int, dtype, seed: int = 0) -> torch.Tensor:
    """Normal values scaled per token from 1e-6 to 1e3 (subnormal e4m3 through clipping), one all-zero token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g) * torch.logspace(-6, 3, T)[:, None]
    x[T // 3] = 0
    return x.to(dtype).to(DEVICE)


def fp8_cache(pb, kind: str, dtype, page: int):
    """The problem's cache written into an FP8 ``kind`` cache, its rows of tokens past each request's end left
    NaN (e4m3 byte 0xFF; fp8_ds_mla scales NaN too): (cache, layout, scale)."""
    P, R, D = pb.kv_cache.shape[0], 512, pb.kv_cache.shape[-1]
    layout = KVCacheLayout(kind, R, D - R, dtype)
    cache = layout.allocate(P, page, DEVICE)
    cache.view(torch.uint8).fill_(0xFF)
    scale = per_tensor_scale(pb.kv_cache.float().abs().max().item(), DEVICE) if kind == "fp8" else None
    slots = [int(pb.block_table[b, j // page]) * page + j % page for b, L in enumerate(pb.seq_lens_host)
             for j in range(L)]
    slots = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    write_latent(cache, pb.kv_cache.view(-1, D)[slots], slots, layout, scale)
    return cache, layout, scale


def test_layout_sizes():
    bf16 = KVCacheLayout("auto", 512, 64, torch.bfloat16)
    fp8 = KVCacheLayout("fp8", 512, 64)
    ds = KVCacheLayout("fp8_ds_mla", 512, 64)
    assert (bf16.bytes_per_token, fp8.bytes_per_token, ds.bytes_per_token) == (1152, 576, 656)
    assert (bf16.width, fp8.width, ds.width) == (576, 576, 656)
    assert (fp8.storage_dtype, ds.storage_dtype) == (torch.float8_e4m3fn, torch.uint8)
    assert ds.num_groups == 4 and fp8.num_groups == 0
    tiny = KVCacheLayout("fp8_ds_mla", 32, 8)
    assert tiny.width == 32 + 4 + 16 and tiny.num_groups == 1
    cache = ds.allocate(3, 16, DEVICE)
    assert cache.shape == (3, 16, 656) and cache.dtype == torch.uint8 and not cache.any()


@pytest.mark.parametrize("kind", ["auto", "fp8", "fp8_ds_mla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(512, 64), (32, 8)])
def test_write_and_gather_match_references(kind, dtype, dims):
    R, P = dims
    layout = KVCacheLayout(kind, R, P, dtype)
    T, page, pages = 37, 16, 5
    latent = random_latent(T, R + P, dtype, seed=R)
    g = torch.Generator().manual_seed(1)
    slots = torch.randperm(pages * page, generator=g)[:T].to(DEVICE)
    slots[5] = -1  # skipped
    scale = per_tensor_scale(100.0, DEVICE) if kind == "fp8" else None  # the 1e3 tokens clip at 448 * scale
    cache = layout.allocate(pages, page, DEVICE)
    cache.view(torch.uint8).fill_(0xA5)
    before = cache.clone()
    write_latent(cache, latent, slots, layout, scale)
    rows = cache.view(-1, layout.width)
    ok = slots >= 0
    ref = quantize_reference(latent, layout, scale)
    assert torch.equal(bits(rows[slots[ok]]), bits(ref[ok]))
    untouched = torch.ones(pages * page, dtype=torch.bool, device=DEVICE)
    untouched[slots[ok]] = False
    assert torch.equal(bits(rows[untouched]), bits(before.view(-1, layout.width)[untouched]))

    for out_dtype in (torch.float32, torch.bfloat16):
        got = gather_latent(cache, slots, layout, scale, out_dtype)
        want = dequantize_reference(rows[slots.clamp_min(0)], layout, scale, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got[ok], want[ok])
        assert (got[~ok] == 0).all()
    buf = torch.full((T, R + P), float("nan"), device=DEVICE)
    assert gather_latent(cache, slots, layout, scale, torch.float32, out=buf) is buf
    assert torch.equal(buf, gather_latent(cache, slots, layout, scale, torch.float32))
    # the round trip: within half an e4m3 step of each value (2^-4 relative; 2^-10 scale among the subnormals)
    back, x = gather_latent(cache, slots[ok], layout, scale, torch.float32), latent[ok].float()
    if kind == "fp8":
        s = scale.item()
        kept = x.abs() <= 448 * s
        assert torch.equal(back[~kept], (x[~kept].sign() * 448 * s))  # saturated
        bound = torch.maximum(x.abs() * 2 ** -4, torch.full_like(x, s * 2 ** -10))
        assert ((back - x).abs()[kept] <= bound[kept]).all()
    elif kind == "fp8_ds_mla":
        s = rows[slots[ok], R:R + 4 * layout.num_groups].contiguous().view(torch.float32)
        s = s.repeat_interleave(128, -1)[:, :R]
        assert ((back - x)[:, :R].abs() <= torch.maximum(x[:, :R].abs() * 2 ** -4, s * 2 ** -10)).all()
        assert ((back - x)[:, R:].abs() <= x[:, R:].abs() * 2 ** -8).all()  # rope: bf16
    else:
        assert torch.equal(back, x)


def test_e4m3_rounding_ties_and_saturation():
    """Ties round to even (normal and subnormal), the carry moves the exponent, and the fp8 layout saturates."""
    layout = KVCacheLayout("fp8", 8, 0, torch.float32)
    vals = [1.0625, 1.1875, 15.5, 2 ** -10, 3 * 2 ** -10, -(2 ** -11), 7.5 * 2 ** -9, 500.0, -1e6, 447.0, 0.0, -0.0,
            240.0, 1.96875, 2 ** -6 * 1.0625, 2 ** -6 * 0.9375]
    latent = torch.tensor(vals, device=DEVICE).view(-1, 8)
    cache = layout.allocate(1, 2, DEVICE)
    write_latent(cache, latent, torch.arange(2, device=DEVICE), layout, per_tensor_scale(448.0, DEVICE))
    want = latent.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(bits(cache.view(2, 8)), bits(want))


def test_ds_mla_scales_are_powers_of_two():
    layout = KVCacheLayout("fp8_ds_mla", 512, 64, torch.float32)
    latent = random_latent(20, 576, torch.float32, seed=3)
    latent[4, 128:256] = 0  # one all-zero group in a token
    latent[5, :128] = 448.0 * 2 ** -3  # amax exactly 448 s: s = 2^-3, not 2^-2
    latent[6, 256:384] = 448.0 * 2 ** -3 * 1.01
    cache = layout.allocate(2, 16, DEVICE)
    write_latent(cache, latent, torch.arange(20, device=DEVICE), layout)
    rows = cache.view(-1, 656)[:20]
    s = rows[:, 512:528].contiguous().view(torch.float32)  # [20, 4]
    e = torch.log2(s)
    assert torch.equal(e, e.round())
    amax = latent[:, :512].abs().view(20, 4, 128).amax(-1)
    assert (amax <= 448 * s).all()
    big = amax > 1e-4
    assert (amax[big] > 224 * s[big]).all()  # the smallest such power of two
    assert s[4, 1] == 2.0 ** -22 and s[5, 0] == 2.0 ** -3 and s[6, 2] == 2.0 ** -2
    rope = rows[:, 528:].contiguous().view(torch.bfloat16)
    assert torch.equal(bits(rope), bits(latent[:, 512:].to(torch.bfloat16)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_fp8_cache(kind, page, dtype):
    # odd lengths over several pages, q_len up to 3 (causal within the new tokens), a padding slot, a request cut over
    # parts (merged), NaN in the unwritten rows of each last page
    lens, qls, H = [37, 200, 0, 5, 64], [1, 2, 1, 1, 3], 4
    pb = make_problem(lens, qls, H, page, dtype=dtype, device=DEVICE, seed=page)
    cache, layout, scale = fp8_cache(pb, kind, dtype, page)
    meta = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=3, max_pages_per_seq=pb.max_pages,
                                     page_size=page, device=DEVICE, num_parts=3, min_chunk=1).build(
        pb.seq_lens, pb.qo_indptr, pb.block_table)
    assert meta.max_merges > 0
    sm_scale = 576 ** -0.5
    T = pb.q.shape[0]
    out = torch.full((T, H, 512), float("nan"), dtype=dtype, device=DEVICE)
    mla_decode(pb.q, cache, meta, sm_scale, 512, out=out, kv_scale=scale)
    args = (pb.qo_indptr, pb.seq_lens, pb.block_table, sm_scale, 512)
    deq = mla_attention_reference(pb.q.float(), cache, *args, kv_layout=layout, kv_scale=scale)
    orig = mla_attention_reference(pb.q.float(), pb.kv_cache.float(), *args)
    active = torch.ones(T, dtype=torch.bool, device=DEVICE)
    active[3] = False  # the padding slot's token (tokens by request: 0 | 1, 2 | 3 | 4 | 5-7)
    assert torch.isnan(out[~active]).all(), "padding rows were written"
    assert torch.isfinite(out[active]).all()
    assert rel_err(out[active], deq[active]) < REL_TOL[dtype]
    assert rel_err(out[active], orig[active]) < FP8_TOL
    if DEVICE == "cpu":  # the interpreter runs the descriptor path where the default tiles fit a page
        assert uses_tma(pb.q, cache, meta, 512, default_config(3 * H, pb.q.element_size(), 512, False)) == (
            page >= (16 if dtype == torch.float32 else 32))


@pytest.mark.parametrize("kind", KINDS)
def test_decode_fp8_small_dims_and_tiles(kind):
    """The tiny models' 32 + 8 (one fp8_ds_mla group, smaller than 128), and tiles without descriptors, wider than a
    page."""
    pb = make_problem([17, 3, 50], [1, 3, 2], 5, 16, kv_lora_rank=32, rope_dim=8, dtype=torch.float32, device=DEVICE,
                      seed=2)
    layout = KVCacheLayout(kind, 32, 8, torch.float32)
    cache = layout.allocate(pb.kv_cache.shape[0], 16, DEVICE)
    scale = per_tensor_scale(4.0, DEVICE) if kind == "fp8" else None
    n = pb.kv_cache.shape[0] * 16
    write_latent(cache, pb.kv_cache.view(n, 40), torch.arange(n, device=DEVICE), layout, scale)
    meta = PersistentMetadataBuilder(num_heads=5, max_batch=3, max_q_len=3, max_pages_per_seq=pb.max_pages,
                                     page_size=16, device=DEVICE, kv_lora_rank=32, num_parts=2, min_chunk=1).build(
        pb.seq_lens, pb.qo_indptr, pb.block_table)
    ref = mla_attention_reference(pb.q, cache, pb.qo_indptr, pb.seq_lens, pb.block_table, 0.15, 32, kv_layout=layout,
                                  kv_scale=scale)
    out = mla_decode(pb.q, cache, meta, 0.15, 32, kv_scale=scale)
    assert rel_err(out, ref) < REL_TOL[torch.float32]
    pb5 = make_problem([70, 3, 200], [2, 1, 1], 5, 16, dtype=torch.bfloat16, device=DEVICE, seed=4)
    cache, layout, scale = fp8_cache(pb5, kind, torch.bfloat16, 16)
    meta = PersistentMetadataBuilder(num_heads=5, max_batch=3, max_q_len=2, max_pages_per_seq=pb5.max_pages,
                                     page_size=16, device=DEVICE, num_parts=3, min_chunk=1).build(
        pb5.seq_lens, pb5.qo_indptr, pb5.block_table)
    ref = mla_attention_reference(pb5.q, cache, pb5.qo_indptr, pb5.seq_lens, pb5.block_table, 0.05, 512,
                                  kv_layout=layout, kv_scale=scale)
    for cfg in (DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1, use_tma=False),
                DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=1)):
        out = mla_decode(pb5.q, cache, meta, 0.05, 512, config=cfg, kv_scale=scale)
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


def test_bad_inputs_are_refused():
    fp8 = KVCacheLayout("fp8", 512, 64)
    ds = KVCacheLayout("fp8_ds_mla", 512, 64)
    latent = torch.randn(4, 576, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        KVCacheLayout("fp8_e5m2")
    with pytest.raises(ValueError, match="rope_dim even"):
        KVCacheLayout("fp8_ds_mla", 512, 63)
    with pytest.raises(ValueError, match="per-tensor scale"):
        write_latent(fp8.allocate(1, 16, DEVICE), latent, slots, fp8)
    with pytest.raises(ValueError, match="only for the fp8 layout"):
        write_latent(ds.allocate(1, 16, DEVICE), latent, slots, ds, per_tensor_scale(device=DEVICE))
    with pytest.raises(ValueError, match=r"\[pages, page_size, 656\] torch.uint8"):
        write_latent(fp8.allocate(1, 16, DEVICE), latent, slots, ds)
    with pytest.raises(ValueError, match=r"latent must be \[T, 576\]"):
        write_latent(ds.allocate(1, 16, DEVICE), latent[:, :512], slots, ds)
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        write_latent(ds.allocate(1, 16, DEVICE), latent, slots.float(), ds)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[4\]"):
        write_latent(ds.allocate(1, 16, DEVICE), latent, slots[:3], ds)
    with pytest.raises(ValueError, match=r"\[1\] float32"):
        write_latent(fp8.allocate(1, 16, DEVICE), latent, slots, fp8, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype"):
        gather_latent(ds.allocate(1, 16, DEVICE), slots, ds, out_dtype=torch.float16)

    pb = make_problem([10, 20], [1, 1], 4, 16, dtype=torch.bfloat16, device=DEVICE)
    meta = PersistentMetadataBuilder(num_heads=4, max_batch=2, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                     page_size=16, device=DEVICE).build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    P = pb.kv_cache.shape[0]
    with pytest.raises(ValueError, match="per-tensor scale"):
        mla_decode(pb.q, fp8.allocate(P, 16, DEVICE), meta, 0.1, 512)
    with pytest.raises(ValueError, match="only for the fp8 layout"):
        mla_decode(pb.q, pb.kv_cache, meta, 0.1, 512, kv_scale=per_tensor_scale(device=DEVICE))
    with pytest.raises(ValueError, match="use bfloat16 or float32"):
        mla_decode(pb.q.half(), ds.allocate(P, 16, DEVICE), meta, 0.1, 512)
    with pytest.raises(ValueError, match="fp8_ds_mla layout's width 656"):
        mla_decode(pb.q, torch.zeros(P, 16, 576, dtype=torch.uint8, device=DEVICE), meta, 0.1, 512)
    with pytest.raises(ValueError, match="uint8 \\(fp8_ds_mla\\)"):
        mla_decode(pb.q, torch.zeros(P, 16, 576, dtype=torch.int32, device=DEVICE), meta, 0.1, 512)
