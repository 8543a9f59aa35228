"""Fused MoE (mla_runner.kernels.fused_moe) against the plain-torch reference, plus its align step and input checks.

Without a CUDA GPU the Triton kernels run under the interpreter (small odd shapes only; the prefill path's token
chunks through a lowered ``chunk_tokens``). With one, the same tests run on it, and the ``gpu`` tests add the real
DeepSeek-V3 expert shapes at decode and prefill (T = 8192) sizes, a no-host-sync check and CUDA graph capture +
replay with new routing. Tolerance: mla_testing.numerics.REL_TOL on the relative Frobenius error
(fp32 1e-4, fp16 5e-3, bf16 2e-2: h and the output are rounded to the activation dtype, the reference is fp32);
FP8 experts (W8A16 and W8A8): FP8_TOL below.
"""
import dataclasses

import pytest
import torch

from mla_runner.kernels import fused_moe as fused_moe_module
from mla_runner.kernels.cuda_graph import capture
from mla_runner.kernels.fp8_block import dequantize_fp8_block, quantize_fp8_block
from mla_runner.kernels.fused_moe import MoEConfig, default_config, fused_moe, fused_moe_reference, quantize_experts
from mla_runner.kernels.moe_align import TRITON_ALIGN_MAX_WORK, align_impl, moe_align, moe_align_reference
from mla_testing.numerics import REL_TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_moe(T, hidden, inter, E, k, dtype=torch.float32, routing="random", seed=0, device=DEVICE):
    """x, w13, w2 scaled for O(1) outputs; routing 'random' (k distinct experts per token) or 'skewed'
    (every token's first choice is expert 3, its other k-1 among experts {0..k} minus 3: experts past k unused,
    expert 3 spanning several row blocks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=g) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(E, hidden, inter, generator=g) * inter ** -0.5).to(dtype)
    if routing == "random":
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    else:
        others = torch.tensor([e for e in range(k + 1) if e != 3][: k - 1], dtype=torch.int64)
        ids = torch.stack([torch.cat([torch.tensor([3]), others.roll(t)]) for t in range(T)])
    weights = torch.rand(T, k, generator=g) + 0.1
    return [t.to(device) for t in (x, w13, w2, weights, ids)]


def check(x, w13, w2, weights, ids, config=None):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)  # poisoned: must be fully written
    ret = fused_moe(x, w13, w2, weights, ids, out=out, config=config)
    assert ret is out
    assert torch.isfinite(out).all(), "fused_moe left part of out unwritten"
    ref = fused_moe_reference(x, w13, w2, weights, ids)
    err = rel_err(out, ref)
    assert err < REL_TOL[x.dtype], f"rel err {err:.2e} >= {REL_TOL[x.dtype]:.0e}"
    return out


# (T, hidden, inter, E, k, dtype, routing)
CASES = [
    (1, 200, 48, 8, 2, torch.float32, "random"),
    (37, 200, 48, 12, 2, torch.float32, "random"),
    (37, 200, 48, 8, 2, torch.bfloat16, "random"),
    (37, 200, 48, 8, 2, torch.float32, "skewed"),
    (37, 200, 48, 12, 2, torch.bfloat16, "skewed"),
    (5, 200, 48, 8, 1, torch.float32, "random"),
    (9, 72, 40, 12, 8, torch.float32, "random"),
    (20, 72, 40, 12, 8, torch.float16, "skewed"),
    (6, 40, 24, 384, 8, torch.bfloat16, "random"),
]


@pytest.mark.parametrize("T,hidden,inter,E,k,dtype,routing", CASES)
def test_matches_reference(T, hidden, inter, E, k, dtype, routing):
    check(*make_moe(T, hidden, inter, E, k, dtype, routing))


@pytest.mark.parametrize("config", [MoEConfig(block_m=32, block_n_gate_up=16, block_n_down=32, block_k=32),
                                    MoEConfig(block_m=64, block_n_gate_up=32, block_n_down=64, block_k=16),
                                    MoEConfig(block_m=16, block_n_gate_up=32, block_n_down=64, align="torch")])
def test_other_block_sizes(config):
    """Tiles that do not divide the dims, more than one N/K tile, bigger row blocks, the torch align step."""
    check(*make_moe(37, 200, 48, 8, 2, torch.float32, "skewed"), config=config)


@pytest.mark.parametrize("E", [8, 12])
def test_out_of_range_ids_are_dropped(E):
    """E=12 also checks ids in [E, next_pow2(E)), which the Triton align step sees as (masked) columns."""
    x, w13, w2, weights, ids = make_moe(11, 72, 40, E, 3)
    ids[0, 1], ids[4, 0], ids[7, 2], ids[8, 1] = -1, E, 1000, 13
    ids[9] = -1  # a token with no valid expert: its output is 0
    out = check(x, w13, w2, weights, ids)
    assert (out[9] == 0).all()


def test_strided_x_int32_ids_and_no_out():
    x, w13, w2, weights, ids = make_moe(13, 72, 40, 8, 2)
    wide = torch.zeros(13, 100, device=DEVICE)
    wide[:, 10:82] = x
    out = fused_moe(wide[:, 10:82], w13, w2, weights, ids.to(torch.int32))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, fused_moe_reference(x, w13, w2, weights, ids)) < REL_TOL[torch.float32]


def test_non_contiguous_routing():
    """topk_* as strided views (every other column of wider tensors; a single token with a wide stride)."""
    x, w13, w2, weights, ids = make_moe(7, 72, 40, 12, 2)
    ids_wide = torch.stack([ids, torch.zeros_like(ids)], dim=2).reshape(7, 4)
    w_wide = torch.stack([weights, torch.zeros_like(weights)], dim=2).reshape(7, 4)
    out = fused_moe(x, w13, w2, w_wide[:, ::2], ids_wide[:, ::2])
    assert rel_err(out, fused_moe_reference(x, w13, w2, weights, ids)) < REL_TOL[torch.float32]
    out1 = fused_moe(x[:1], w13, w2, w_wide[:1, ::2], ids_wide[:1, ::2])
    assert rel_err(out1, fused_moe_reference(x[:1], w13, w2, weights[:1], ids[:1])) < REL_TOL[torch.float32]


def test_no_tokens():
    x, w13, w2, weights, ids = make_moe(0, 72, 40, 8, 2)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 72)


# (T, chunk_tokens, dtype, routing, align): several chunks, odd T and a short last chunk
CHUNKED = [(37, 8, torch.float32, "random", "sort"), (23, 5, torch.bfloat16, "skewed", None),
           (19, 6, torch.float16, "random", "triton")]


@pytest.mark.parametrize("T,chunk,dtype,routing,align", CHUNKED)
def test_chunked_matches_reference(T, chunk, dtype, routing, align):
    """A batch over chunk_tokens runs as passes of at most that many tokens (the prefill path at small scale):
    equal to the reference, and bit for bit to one pass with the same tiles."""
    x, w13, w2, weights, ids = make_moe(T, 72, 40, 12, 3, dtype, routing, seed=T)
    ids[2, 1], ids[-1, 0] = -1, 12  # dropped pairs, one in the last chunk
    cfg = MoEConfig(block_m=16, block_n_gate_up=16, block_n_down=64, block_k=32, align=align, chunk_tokens=chunk)
    out = check(x, w13, w2, weights, ids, config=cfg)
    one_pass = fused_moe(x, w13, w2, weights, ids, config=dataclasses.replace(cfg, chunk_tokens=T))
    if x.is_cuda:  # a row's dots do not depend on the other rows of its tile
        assert torch.equal(out, one_pass)
    else:  # the interpreter's numpy dots may round a row differently with other rows beside it (fp32: 1 ulp)
        torch.testing.assert_close(out, one_pass, rtol=1e-5, atol=1e-5)


def test_chunked_default_config(monkeypatch):
    """config=None: the default chunk (CHUNK_TOKENS, lowered here) and tiles picked for a chunk; FP8 W8A8."""
    monkeypatch.setattr(fused_moe_module, "CHUNK_TOKENS", 4)
    (q13, s13, q2, s2), (d13, d2), weights, ids = moe_problem(E=6, hidden=200, inter=48, T=11, k=3, device=DEVICE)
    ids[5, 2] = -1
    x = torch.randn(11, 200, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    out = fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    assert rel_err(out, fused_moe_reference(x, d13, d2, weights, ids, act_quant=True)) < FP8_TOL[torch.bfloat16, True]


def check_layout(al, ids, E, block_m):
    """Each expert's pairs in order in one block_m-padded segment, segments in expert order, sentinel padding."""
    n = ids.numel()
    groups, max_rows = moe_align_reference(ids, E, block_m)
    sorted_ids, block_expert = al.sorted_ids.cpu().tolist(), al.block_expert.cpu().tolist()
    assert len(sorted_ids) == max_rows and len(block_expert) * block_m == max_rows
    pos = 0
    for e, pairs in enumerate(groups):
        if not pairs:
            continue
        nb = -(-len(pairs) // block_m)
        assert block_expert[pos // block_m: pos // block_m + nb] == [e] * nb
        seg = sorted_ids[pos: pos + nb * block_m]
        assert seg == pairs + [n] * (nb * block_m - len(pairs))
        pos += nb * block_m
    assert sorted_ids[pos:] == [n] * (max_rows - pos)
    assert block_expert[pos // block_m:] == [-1] * (len(block_expert) - pos // block_m)


@pytest.mark.parametrize("impl", ["triton", "sort", "torch"])
@pytest.mark.parametrize("T,k,E,block_m", [(1, 8, 256, 16), (37, 2, 8, 16), (128, 8, 384, 16), (64, 8, 256, 32),
                                           (3, 2, 8, 16)])
def test_align_layout(T, k, E, block_m, impl):
    g = torch.Generator().manual_seed(T)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    ids[: T // 2, 0] = 5  # one crowded expert
    ids[-1, -1] = -1  # one dropped pair
    check_layout(moe_align(ids.to(DEVICE), E, block_m, impl=impl), ids, E, block_m)


def prefill_routing(T, k, E, routing, seed):
    """Random distinct top-k, or skewed (half the pairs on 3 experts); -1 and out-of-range ids sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    if routing == "skewed":
        ids[:, : k // 2] = torch.randint(0, 3, (T, k // 2), generator=g) * (E // 3)
    drop = torch.rand(T, k, generator=g) < 0.05
    ids[drop] = torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E + 7)[drop]
    return ids


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("T,k,E,block_m", [(1, 8, 256, 64), (7, 8, 256, 128), (1500, 8, 256, 64),
                                           (4099, 2, 12, 128), (333, 8, 384, 16)])
def test_sort_align_at_prefill_sizes(T, k, E, block_m, routing):
    """The sort path (the prefill align) against the reference layout and, bit for bit, the torch-ops one; T*k
    not a multiple of block_m, E = 256 with a few pairs and with thousands."""
    ids = prefill_routing(T, k, E, routing, seed=T)
    al = moe_align(ids.to(DEVICE), E, block_m, impl="sort")
    check_layout(al, ids, E, block_m)
    other = moe_align(ids.to(DEVICE), E, block_m, impl="torch")
    assert torch.equal(al.sorted_ids, other.sorted_ids) and torch.equal(al.block_expert, other.block_expert)


def test_align_chooses_by_size():
    """impl=None: the one-program Triton align up to TRITON_ALIGN_MAX_WORK comparisons (every decode batch), the
    sort path past it; both give the Triton kernel's layout (a size where either may run, skewed, dropped ids)."""
    assert align_impl(128 * 8, 384) == "triton" and align_impl(512 * 8, 256) == "triton"
    assert align_impl(TRITON_ALIGN_MAX_WORK // 256 + 1, 256) == "sort" and align_impl(32768 * 8, 256) == "sort"
    assert align_impl(TRITON_ALIGN_MAX_WORK // 512, 384) == "triton"  # 384 experts compare as 512 columns
    ids = prefill_routing(130, 8, 256, "skewed", seed=1).to(DEVICE)
    auto, tri, srt = (moe_align(ids, 256, 64, impl=i) for i in (None, "triton", "sort"))
    for al in (auto, srt):
        assert torch.equal(al.sorted_ids, tri.sorted_ids) and torch.equal(al.block_expert, tri.block_expert)


def test_default_config_by_size():
    """Decode sizes keep their small-M tiles and the one-program align; prefill chunks get 64 / 128-row tiles,
    8 warps, the sort align, and pipeline stages whose buffers fit the shared-memory budget."""
    bf16, dims = torch.bfloat16, (7168, 2048)
    assert default_config(128 * 8, 256, *dims, bf16, True) == MoEConfig(16, 64, 128, 128, 4, 4, "triton")
    assert default_config(1024 * 8, 256, *dims, bf16) == MoEConfig(32, 64, 128, 128, 4, 3, "sort")
    for T, E, dtype, aq, block_m, stages in [(8192, 256, bf16, False, 64, 4), (8192, 256, bf16, True, 64, 4),
                                             (32768, 256, bf16, False, 128, 3), (32768, 256, bf16, True, 128, 4),
                                             (32768, 256, torch.float32, False, 64, 4)]:
        cfg = default_config(T * 8, E, *dims, dtype, aq)
        assert (cfg.block_m, cfg.num_warps, cfg.num_stages, cfg.align) == (block_m, 8, stages, "sort")
        w_bytes = 1 if aq else dtype.itemsize
        stage = cfg.block_m * cfg.block_k * dtype.itemsize + cfg.block_k * 2 * cfg.block_n_gate_up * w_bytes
        assert stage * cfg.num_stages <= fused_moe_module.SMEM_BUDGET


def test_input_checks():
    x, w13, w2, weights, ids = make_moe(4, 72, 40, 8, 2)
    bad = [
        (dict(x=x[0]), "x must be"),
        (dict(x=x.to(torch.float64)), "dtype"),
        (dict(w13=w13[:, :79]), "w13 must be"),
        (dict(w2=w2[:, :, :39]), "w2 must be"),
        (dict(w2=w2.to(torch.float16)), "w13 and w2 must have"),
        (dict(w13=w13.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        (dict(topk_ids=ids[:3]), "topk_ids must be"),
        (dict(topk_ids=ids.float()), "int32 or int64"),
        (dict(topk_weights=weights.double()), "topk_weights must be float32"),
        (dict(out=torch.empty(4, 72, dtype=torch.float16, device=DEVICE)), "out must be"),
    ]
    base = dict(x=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            fused_moe(**{**base, **change})
    for bad_cfg, message in [(dict(block_m=8), "block_m"), (dict(block_k=48), "block_k"), (dict(align="cub"), "align"),
                             (dict(chunk_tokens=0), "chunk_tokens")]:
        with pytest.raises(ValueError, match=message):
            MoEConfig(**bad_cfg)


# ---------------------------------------------------------------- FP8 experts (e4m3, 128x128 block scales)
# Relative Frobenius error against fused_moe_reference on the dequantized (fp32, exact) weights, by (dtype,
# act_quant): fp32 W8A16 exact products (measured ~1e-7); 16-bit: h and the output rounded to the dtype, and
# with W8A8 a rounding of h can move its e4m3 code (measured bf16 1.7e-3 W8A8, fp16 2e-4).
FP8_TOL = {(torch.float32, False): 1e-5, (torch.bfloat16, False): 1e-2, (torch.bfloat16, True): 5e-3,
           (torch.float16, True): 1e-3}


def moe_problem(E: int, hidden: int, inter: int, T: int, k: int, device="cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(E, 2 * inter, hidden, generator=g, device=device) * hidden ** -0.5
    w2 = torch.randn(E, hidden, inter, generator=g, device=device) * inter ** -0.5
    q13, s13, q2, s2 = quantize_experts(w13, w2)
    deq13 = torch.stack([torch.cat([dequantize_fp8_block(q13[e, :inter], s13[e, : len(s13[e]) // 2]),
                                    dequantize_fp8_block(q13[e, inter:], s13[e, len(s13[e]) // 2:])])
                         for e in range(E)])
    deq2 = torch.stack([dequantize_fp8_block(q2[e], s2[e]) for e in range(E)])
    ids = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices
    weights = torch.rand(T, k, generator=g, device=device) + 0.1
    return (q13, s13, q2, s2), (deq13, deq2), weights, ids


@pytest.mark.parametrize("inter", [48, 136])
@pytest.mark.parametrize("dtype,act_quant", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.bfloat16, True), (torch.float16, True)])
def test_fp8_fused_moe_matches_reference(inter: int, dtype: torch.dtype, act_quant: bool) -> None:
    """Partial blocks in both dims (hidden 200; inter 48 or 136: gate and up keep separate scale grids).
    W8A8 against the reference with the same activation quantization; without it the reference is ~4% away
    (measured), which the W8A8 tolerances tell apart."""
    (q13, s13, q2, s2), (d13, d2), weights, ids = moe_problem(E=6, hidden=200, inter=inter, T=9, k=3,
                                                                device=DEVICE)
    ids[0, 1] = -1  # dropped slot
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype) * 3
    out = fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, act_quant=act_quant)
    ref = fused_moe_reference(x, d13, d2, weights, ids, act_quant=act_quant)
    tol = FP8_TOL[dtype, act_quant]
    assert rel_err(out, ref) < tol
    if act_quant:
        assert rel_err(out, fused_moe_reference(x, d13, d2, weights, ids)) > 2 * tol
        # the default for 16-bit activations is W8A8, as in FP8Linear
        assert torch.equal(out, fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2))


def test_fp8_fused_moe_needs_scales() -> None:
    (q13, s13, q2, s2), _, weights, ids = moe_problem(E=4, hidden=200, inter=48, T=2, k=2, device=DEVICE)
    x = torch.randn(2, 200, device=DEVICE)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, q13, q2, weights, ids)
    with pytest.raises(ValueError, match="w13_scale must be"):
        fused_moe(x, q13, q2, weights, ids, w13_scale=s13[:, :1], w2_scale=s2)
    with pytest.raises(ValueError, match="act_quant"):
        fused_moe(x, q13.float(), q2.float(), weights, ids, act_quant=True)


def test_quantize_experts_is_the_block_format_of_each_matrix():
    """Gate, up and down of every expert quantized on their own 128x128 grids (partial edge blocks per matrix), the
    scales stacked gate's rows first: the bytes of quantize_fp8_block on each matrix."""
    g = torch.Generator().manual_seed(0)
    E, inter, hidden = 3, 136, 200  # partial blocks in both dims of both matrices
    w13, w2 = torch.randn(E, 2 * inter, hidden, generator=g), torch.randn(E, hidden, inter, generator=g)
    q13, s13, q2, s2 = quantize_experts(w13, w2)
    rows = s13.shape[1] // 2
    for e in range(E):
        for got_q, got_s, w in ((q13[e, :inter], s13[e, :rows], w13[e, :inter]),
                                (q13[e, inter:], s13[e, rows:], w13[e, inter:]), (q2[e], s2[e], w2[e])):
            q, s = quantize_fp8_block(w)
            assert torch.equal(got_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got_s, s)


# ---------------------------------------------------------------- GPU: real shapes, no sync, CUDA graphs
DSV3 = dict(E=256, k=8, hidden=7168, inter=2048)


@pytest.fixture(scope="module")
def dsv3_weights():
    """DeepSeek-V3 routed experts of one layer in bf16 (22.5 GB)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    E, hidden, inter = DSV3["E"], DSV3["hidden"], DSV3["inter"]
    w13 = torch.randn(E, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda", generator=g).mul_(hidden ** -0.5)
    w2 = torch.randn(E, hidden, inter, dtype=torch.bfloat16, device="cuda", generator=g).mul_(inter ** -0.5)
    yield w13, w2
    del w13, w2
    torch.cuda.empty_cache()


def gpu_routing(T, seed, skewed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, DSV3["hidden"], dtype=torch.bfloat16, device="cuda", generator=g)
    ids = torch.rand(T, DSV3["E"], device="cuda", generator=g).topk(DSV3["k"], dim=1).indices
    if skewed:  # every token on experts 0..7: 8 experts with T rows each
        ids = torch.arange(DSV3["k"], device="cuda").repeat(T, 1)
    weights = torch.rand(T, DSV3["k"], device="cuda", generator=g) + 0.1
    return x, weights / weights.sum(1, keepdim=True) * 2.5, ids


@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.gpu
def test_gpu_dsv3_shapes(dsv3_weights, T):
    w13, w2 = dsv3_weights
    x, weights, ids = gpu_routing(T, seed=T)
    check(x, w13, w2, weights, ids)


@pytest.mark.parametrize("align", ["triton", "sort", "torch"])
@pytest.mark.gpu
def test_gpu_no_host_sync(dsv3_weights, align):
    """torch raises on any synchronizing call (.item(), bincount, nonzero, ...) while the mode is 'error'."""
    w13, w2 = dsv3_weights
    x, weights, ids = gpu_routing(16, seed=1)
    cfg = MoEConfig(align=align)
    fused_moe(x, w13, w2, weights, ids, config=cfg)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, w13, w2, weights, ids, config=cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("T,align", [(1, "triton"), (64, "triton"), (64, "torch"), (64, "sort")])
@pytest.mark.gpu
def test_gpu_cuda_graph_replay(dsv3_weights, T, align):
    """Capture once, then refill x / routing in place (new experts, a skewed layout) and replay == eager."""
    w13, w2 = dsv3_weights
    cfg = MoEConfig(align=align)
    x, weights, ids = gpu_routing(T, seed=10)
    out = torch.empty_like(x)
    graph, _ = capture(lambda: fused_moe(x, w13, w2, weights, ids, out=out, config=cfg), warmup=2)
    for seed, skewed in [(11, False), (12, True), (13, False)]:
        new_x, new_w, new_ids = gpu_routing(T, seed, skewed)
        x.copy_(new_x)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        eager = fused_moe(new_x, w13, w2, new_w, new_ids, config=cfg)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert rel_err(out, fused_moe_reference(new_x, w13, w2, new_w, new_ids)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.gpu
def test_fp8_fused_moe_cuda_graph_gpu(act_quant: bool) -> None:
    """Full-width experts (hidden 7168, inter 2048, 32 experts, top 8): eager equals the fp32 reference with
    the same numerics (1e-2: bf16 h and output; measured in the printout), and a captured call replayed with
    new x and new routing equals the eager call on them (bitwise)."""
    (q13, s13, q2, s2), (d13, d2), weights, ids = moe_problem(E=32, hidden=7168, inter=2048, T=16, k=8,
                                                                device="cuda")
    x = torch.randn(16, 7168, device="cuda", dtype=torch.bfloat16)
    kw = dict(w13_scale=s13, w2_scale=s2, act_quant=act_quant)
    eager = fused_moe(x, q13, q2, weights, ids, **kw)
    err = rel_err(eager, fused_moe_reference(x, d13, d2, weights, ids, act_quant=act_quant))
    print(f"fused moe act_quant={act_quant}: rel err {err:.1e}")
    assert err < 1e-2
    out = torch.empty_like(x)
    call = lambda: fused_moe(x, q13, q2, weights, ids, out=out, **kw)
    graph, _ = capture(call)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(16, 32, device="cuda").topk(8, dim=1).indices)
    weights.copy_(torch.rand(16, 8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fused_moe(x, q13, q2, weights, ids, **kw))


def check_rows(out, x, w13, w2, weights, ids, tol, act_quant=False, every=61):
    """The reference on every ``every``-th token and the last (it runs one (token, slot) at a time)."""
    rows = torch.cat([torch.arange(0, x.shape[0], every, device=x.device), torch.tensor([x.shape[0] - 1],
                                                                                       device=x.device)])
    ref = fused_moe_reference(x[rows], w13, w2, weights[rows], ids[rows], act_quant=act_quant)
    err = rel_err(out[rows], ref)
    assert err < tol, f"rel err {err:.2e} >= {tol:.0e}"
    return err


@pytest.mark.gpu
def test_gpu_prefill_dsv3(dsv3_weights):
    """A prefill-sized batch (T = 8192) at DeepSeek-V3 expert shapes, bf16: equal to the reference (sampled rows),
    no host sync, and, in three chunks of the same tiles, equal to one pass bit for bit."""
    w13, w2 = dsv3_weights
    T = 8192
    x, weights, ids = gpu_routing(T, seed=7)
    ids[::97, 3] = -1  # some dropped pairs (an expert-parallel rank's view)
    out = fused_moe(x, w13, w2, weights, ids)
    check_rows(out, x, w13, w2, weights, ids, REL_TOL[torch.bfloat16])
    cfg = dataclasses.replace(default_config(T * DSV3["k"], DSV3["E"], DSV3["hidden"], DSV3["inter"], x.dtype),
                              chunk_tokens=3000)
    fused_moe(x, w13, w2, weights, ids, config=cfg)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunked = fused_moe(x, w13, w2, weights, ids, config=cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(chunked, out)


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.gpu
def test_gpu_prefill_fp8(act_quant: bool) -> None:
    """T = 8192 over FP8 experts of DeepSeek-V3 width (hidden 7168, inter 2048, top 8) on 32 experts (an
    expert-parallel rank's share: 2048 rows an expert, the 128-row tiles): equal to the fp32 reference with the
    same numerics on sampled rows (1e-2, as the decode-sized FP8 test), and across chunks bit for bit."""
    T = 8192
    (q13, s13, q2, s2), (d13, d2), weights, ids = moe_problem(E=32, hidden=7168, inter=2048, T=T, k=8,
                                                                device="cuda")
    x = torch.randn(T, 7168, device="cuda", dtype=torch.bfloat16)
    kw = dict(w13_scale=s13, w2_scale=s2, act_quant=act_quant)
    out = fused_moe(x, q13, q2, weights, ids, **kw)
    err = check_rows(out, x, d13, d2, weights, ids, 1e-2, act_quant)
    print(f"prefill fp8 act_quant={act_quant}: rel err {err:.1e}")
    cfg = dataclasses.replace(default_config(T * 8, 32, 7168, 2048, x.dtype, act_quant), chunk_tokens=2500)
    assert torch.equal(fused_moe(x, q13, q2, weights, ids, config=cfg, **kw), out)
