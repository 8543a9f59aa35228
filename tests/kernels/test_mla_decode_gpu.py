"""MLA decode on a CUDA GPU: full-size shapes, no host sync, no allocation, CUDA-graph capture and replay."""
import functools

import pytest
import torch

from mla_runner.kernels.cuda_graph import capture
from mla_runner.kernels.metadata import PersistentMetadataBuilder
from mla_runner.kernels.mla_decode import decode_impl, mla_decode
from mla_runner.kernels.reference import mla_attention_reference
from mla_testing.numerics import REL_TOL, build_metadata, plan_reference, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
DV, DPE = 512, 64


def gpu_problem(seq_lens, q_lens, H, page, dtype=torch.bfloat16, max_pages=None, seed=0):
    """Like mla_runner.kernels.synthetic.make_problem, generated on the GPU (full-size caches)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [-(-L // page) for L in seq_lens]
    max_pages = max_pages or max(max(need), 1)
    n_pages = sum(need) + 4
    kv = torch.randn(n_pages, page, DV + DPE, device=DEV, generator=g).to(dtype)
    perm = torch.randperm(n_pages, device=DEV, generator=g).int()
    bt = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[at:at + n]
        at += n
    qo = [0]
    for n in q_lens:
        qo.append(qo[-1] + n)
    q = torch.randn(qo[-1], H, DV + DPE, device=DEV, generator=g).to(dtype)
    return (q, kv, torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
            torch.tensor(qo, dtype=torch.int32, device=DEV), bt)


def check(seq_lens, q_lens, H, page=64, dtype=torch.bfloat16, strategy="persistent"):
    q, kv, sl, qo, bt = gpu_problem(seq_lens, q_lens, H, page, dtype)
    _, meta = build_metadata(strategy, sl, qo, bt, seq_lens, q_lens, num_heads=H, max_batch=len(seq_lens),
                             max_q_len=max(q_lens), max_pages_per_seq=bt.shape[1], page_size=page, device=DEV)
    out = torch.full((q.shape[0], H, DV), float("nan"), dtype=dtype, device=DEV)
    mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, out=out)
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"rel err {err:.2e}"
    return meta


@pytest.mark.parametrize("H", [128, 64, 16, 8])
@pytest.mark.parametrize("lens", [[16384], [4096] * 4, [1, 64, 1000, 3001, 16384, 5, 128, 77]])
def test_full_size_bf16(H, lens):
    check(lens, [1] * len(lens), H)


@pytest.mark.parametrize("H", [128, 8])
def test_q_len_2_and_mixed(H):
    check([4096, 100, 2000], [2, 2, 2], H)
    check([300, 5000, 17, 64], [1, 3, 2, 1], H, page=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype):
    check([2000, 1, 515], [1, 1, 2], 16, dtype=dtype)


@pytest.mark.parametrize("page", [1, 16])
def test_small_pages(page):
    check([3000, 1, 129], [1, 1, 1], 64, page=page)


def test_per_step_matches():
    check([9000, 3, 700, 64], [1, 2, 1, 1], 64, strategy="per_step")


def test_plan_kernel_matches_reference_b256():
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(0, 20000, (256,), generator=g).tolist()
    qls = torch.randint(0, 3, (256,), generator=g).tolist()
    q, kv, sl, qo, bt = gpu_problem([1] * 256, qls, 1, 64, max_pages=1)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    bt = torch.zeros(256, 313, dtype=torch.int32, device=DEV)  # (the plan reads only its width: 313 pages >= 20k)
    b = PersistentMetadataBuilder(num_heads=128, max_batch=256, max_q_len=2, max_pages_per_seq=313, page_size=64,
                                  device=DEV)
    meta = b.build(sl, qo, bt)
    b.check()
    r = plan_reference(b, lens, qls)
    assert meta.part_bounds.tolist() == r["part_bounds"]
    assert meta.first_part.tolist() == r["first_part"]
    assert meta.part_reqs.flatten().tolist() == r["part_reqs"]
    assert meta.num_splits.tolist() == r["num_splits"]
    assert meta.split_indptr.tolist() == r["split_indptr"]
    assert meta.merge_reqs[: meta.num_merge.item()].tolist() == r["merge_reqs"]
    assert meta.max_qo_len.item() == max(qls)


class _Engine:
    """Persistent input buffers as an engine holds them, sized for a bucket of B slots."""

    def __init__(self, B, H, max_q, max_pages, page, n_pages, dtype=torch.bfloat16):
        self.sl = torch.zeros(B, dtype=torch.int32, device=DEV)
        self.qo = torch.zeros(B + 1, dtype=torch.int32, device=DEV)
        self.bt = torch.zeros(B, max_pages, dtype=torch.int32, device=DEV)
        self.q = torch.zeros(B * max_q, H, DV + DPE, dtype=dtype, device=DEV)
        self.out = torch.zeros(B * max_q, H, DV, dtype=dtype, device=DEV)
        self.kv = torch.randn(n_pages, page, DV + DPE, device=DEV).to(dtype)
        self.builder = PersistentMetadataBuilder(num_heads=H, max_batch=B, max_q_len=max_q,
                                                 max_pages_per_seq=max_pages, page_size=page, device=DEV)
        self.page, self.n_pages = page, n_pages

    def fill(self, lens, qls, seed):
        """Write a new step into the buffers in place; slots past len(lens) are padding (0 / 0)."""
        g = torch.Generator().manual_seed(seed)
        B = self.sl.shape[0]
        lens = lens + [0] * (B - len(lens))
        qls = qls + [0] * (B - len(qls))
        self.sl.copy_(torch.tensor(lens, dtype=torch.int32))
        qo = [0]
        for n in qls:
            qo.append(qo[-1] + n)
        self.qo.copy_(torch.tensor(qo, dtype=torch.int32))
        self.bt.copy_(torch.randint(0, self.n_pages, self.bt.shape, generator=g, dtype=torch.int32))
        self.q.copy_(torch.randn(self.q.shape, generator=g).to(self.q.dtype))
        return qo[-1]

    def step(self):
        meta = self.builder.build(self.sl, self.qo, self.bt)
        return mla_decode(self.q, self.kv, meta, (DV + DPE) ** -0.5, DV, out=self.out)

    def reference(self):
        return mla_attention_reference(self.q, self.kv, self.qo, self.sl, self.bt, (DV + DPE) ** -0.5, DV)


def test_no_sync_no_allocation():
    e = _Engine(B=8, H=64, max_q=2, max_pages=64, page=64, n_pages=600)
    T = e.fill([4000, 17, 64, 1], [1, 2, 1, 1], seed=0)
    e.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            e.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert rel_err(e.out[:T], e.reference()[:T]) < REL_TOL[torch.bfloat16]


def test_cuda_graph_replay_new_lengths():
    e = _Engine(B=16, H=128, max_q=1, max_pages=128, page=64, n_pages=2000)
    e.fill([100] * 16, [1] * 16, seed=0)
    graph, _ = capture(e.step, warmup=2)
    steps = [([8000, 3, 1, 700], [1, 1, 1, 1]), ([1] * 16, [1] * 16), ([2, 8191] + [64] * 13, [1] * 15),
             ([5000], [1]), ([4000] * 16, [1] * 16)]  # (the last: requests cut 2-5 ways, merged in the kernel)
    for i, (lens, qls) in enumerate(steps):
        T = e.fill(lens, qls, seed=i + 1)
        e.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = e.out.clone()
        assert torch.isnan(replayed[T:]).all(), "padding rows written"
        e.out.fill_(float("nan"))
        e.step()  # eager
        torch.cuda.synchronize()
        torch.testing.assert_close(replayed[:T], e.out[:T], rtol=0, atol=0)
        assert rel_err(replayed[:T], e.reference()[:T]) < REL_TOL[torch.bfloat16]
    e.builder.check()
    # a request past its block-table row, as a bad caller could send: dropped inside the replay (no read past
    # the row, its rows unwritten), the others exact, and the builder reports it afterwards
    e.fill([300, 128 * 64 + 1, 500], [1, 1, 1], seed=9)
    e.out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(e.out[1]).all()
    e.sl[1] = 0
    kept = torch.tensor([0, 2], device=DEV)
    assert rel_err(e.out[kept], e.reference()[kept]) < REL_TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="seq_len over its block-table row"):
        e.builder.check()


@pytest.mark.parametrize("H", [64, 128])
def test_merge_launched_early_and_late_in_a_graph(H):
    # the merge is a programmatic dependent launch: decode CTAs of a request cut at most EARLY_LAUNCH_SPLITS ways
    # let it launch at their start, others at their exit; both, replayed from a graph, equal eager and the reference
    from mla_runner.kernels.mla_merge import EARLY_LAUNCH_SPLITS, dependent_launch

    assert dependent_launch(torch.device(DEV)) == (torch.cuda.get_device_capability()[0] >= 9)
    splits = []
    for lens in ([16384], [4096], [1024] * 8):
        q, kv, sl, qo, bt = gpu_problem(lens, [1] * len(lens), H, 64)
        b = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=1, max_pages_per_seq=bt.shape[1],
                                      page_size=64, device=DEV)
        meta = b.build(sl, qo, bt)
        splits.append(max(meta.num_splits.tolist()))
        out = torch.full((q.shape[0], H, DV), float("nan"), dtype=q.dtype, device=DEV)
        graph, _ = capture(functools.partial(mla_decode, q, kv, meta, (DV + DPE) ** -0.5, DV, out=out))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, out=out)
        torch.testing.assert_close(replayed, out, rtol=0, atol=0)
        ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
        assert rel_err(replayed, ref) < REL_TOL[torch.bfloat16]
    assert splits[0] > EARLY_LAUNCH_SPLITS >= splits[1] > 1, splits


def _sm90_or_skip():
    from mla_runner.kernels import mla_decode_sm90

    if torch.cuda.get_device_capability() != (9, 0) or mla_decode_sm90._GLUON_ERROR:
        pytest.skip("the Gluon kernel needs an sm90 GPU and Triton's Gluon")


@pytest.mark.parametrize("H", [64, 128])
def test_sm90_kernel_with_cut_requests(H):
    """Page-64 bf16 calls run the Gluon kernel at H = 64 and 128; requests cut into a few
    parts and into many are merged by the merge kernel; a second call gives the same bits; the Triton kernel
    agrees."""
    _sm90_or_skip()
    from mla_runner.kernels import mla_decode as md

    g = torch.Generator().manual_seed(3)
    lens = [16384] + torch.randint(1, 6000, (47,), generator=g).tolist()
    q, kv, sl, qo, bt = gpu_problem(lens, [1] * len(lens), H, 64)
    meta = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=1, max_pages_per_seq=bt.shape[1],
                                     page_size=64, device=DEV).build(sl, qo, bt)
    ns = meta.num_splits
    assert ((ns > 1) & (ns <= 4)).any() and (ns > 4).any()
    out = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV)
    assert decode_impl(q, kv, meta, DV) == "gluon"
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    assert torch.equal(mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV), out)
    triton_only = md.DecodeConfig(64, 64, 8, 2, gluon=False)
    tri = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, config=triton_only)
    assert decode_impl(q, kv, meta, DV, config=triton_only) == "triton"
    assert rel_err(out, tri) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("H", [64, 128])
def test_sm90_kernel_mixed_q_len_and_unwritten_rows(H):
    """Causal rows of mixed q_len, padding slots, and NaN in the unwritten rows of every last page."""
    _sm90_or_skip()

    lens, qls = [300, 5000, 17, 64, 0, 2049], [1, 3, 2, 1, 0, 2]
    q, kv, sl, qo, bt = gpu_problem(lens, qls, H, 64)
    for b, L in enumerate(lens):
        if L % 64:
            kv[bt[b, L // 64], L % 64:] = float("nan")
    meta = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=3, max_pages_per_seq=bt.shape[1],
                                     page_size=64, device=DEV).build(sl, qo, bt)
    out = torch.full((q.shape[0], H, DV), float("nan"), dtype=q.dtype, device=DEV)
    mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, out=out)
    assert decode_impl(q, kv, meta, DV, out=out) == "gluon"
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("H,qls", [(64, [1, 3, 2, 1, 0, 2, 1]), (128, [1, 1, 1, 1, 0, 1, 1]),
                                   (128, [2, 1, 3, 2, 0, 1, 2]), (16, [1, 3, 2, 1, 0, 2, 1]),
                                   (8, [2, 1, 4, 2, 0, 1, 2]), (32, [3, 1, 2, 3, 0, 1, 1]), (5, [1, 2, 1, 1, 0, 3, 1]),
                                   (1, [1, 1, 2, 1, 0, 1, 1]), (96, [1, 2, 1, 1, 0, 1, 2])])
def test_sm90_kernel_block_counts_and_plans(H, qls):
    """The Gluon kernel against the reference and the Triton kernel on odd and even block counts per part (1 to
    many blocks), one-block requests, a padding slot (q_len 0), causal rows, NaN in every last page's unwritten
    rows; the default plan and one at 8 parts that cuts the long requests. Head counts that are not a multiple of
    64 leave a request's last row tile partial (its other rows are the next request's): only the request's own rows
    may be written, so rows past the last token (a sentinel) stay untouched."""
    _sm90_or_skip()
    from mla_runner.kernels import mla_decode as md
    from mla_runner.kernels import mla_decode_sm90 as sm90
    from mla_runner.kernels.mla_merge import mla_merge

    lens = [300, 5000, 17, 64, 0, 2049, 128]
    q, kv, sl, qo, bt = gpu_problem(lens, qls, H, 64)
    for b, L in enumerate(lens):
        if L % 64:
            kv[bt[b, L // 64], L % 64:] = float("nan")
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    T = q.shape[0]
    for parts in (None, 8):
        meta = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=max(qls), num_parts=parts,
                                         max_pages_per_seq=bt.shape[1], page_size=64, device=DEV).build(sl, qo, bt)
        assert sm90.supported(q, kv, meta, DV) is None
        assert parts is None or (meta.num_splits > 1).any()
        out = torch.full((T + 3, H, DV), 7.0, dtype=q.dtype, device=DEV)  # 3 sentinel rows past the last token
        sm90.mla_decode_sm90(q, kv, meta, (DV + DPE) ** -0.5, out[:T], md.LOG2E)
        mla_merge(out[:T], meta)
        assert (out[T:] == 7.0).all(), "rows past the last request were written"
        assert torch.isfinite(out).all()
        assert rel_err(out[:T], ref) < REL_TOL[torch.bfloat16], parts
        assert torch.equal(mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV), out[:T])  # the default path
        assert decode_impl(q, kv, meta, DV) == "gluon"
        tri = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, config=md.DecodeConfig(64, 64, 8, 2, gluon=False))
        assert rel_err(out[:T], tri) < REL_TOL[torch.bfloat16], parts


def test_sm90_kernel_packed_plan_and_fallbacks():
    """128 requests of about 1k at H = 128: the packed plan (no request cut, two or so a part) and outputs that
    leave by TMA; a non-contiguous output falls back to the Triton kernel with the same result."""
    _sm90_or_skip()
    from mla_runner.kernels import mla_decode_sm90 as sm90

    g = torch.Generator().manual_seed(5)
    lens = torch.randint(960, 1100, (128,), generator=g).tolist()
    q, kv, sl, qo, bt = gpu_problem(lens, [1] * 128, 128, 64)
    meta = PersistentMetadataBuilder(num_heads=128, max_batch=128, max_q_len=1, max_pages_per_seq=bt.shape[1],
                                     page_size=64, device=DEV).build(sl, qo, bt)
    assert meta.num_merge.item() == 0 and (meta.num_splits == 1).all()
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    out = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV)
    assert decode_impl(q, kv, meta, DV) == "gluon"
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    wide = torch.empty(q.shape[0], 128, 2 * DV, dtype=q.dtype, device=DEV)
    assert sm90.supported(q, kv, meta, DV, out=wide[..., :DV]) is not None
    mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV, out=wide[..., :DV])
    assert decode_impl(q, kv, meta, DV, out=wide[..., :DV]) == "triton"
    assert rel_err(wide[..., :DV], ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("H, q_len", [(64, 1), (128, 1), (128, 2)])
def test_sm90_kernel_running_max_rises_late(H, q_len):
    """The Gluon kernel keeps a row's running max until a block's max is RESCALE_TAU (log2) above it, and a warp
    whose rows all kept theirs skips the rescale of O. Keys scaled up at random late positions make some rows'
    scores jump by far more than that in later blocks (of whole and of cut requests), and heads of different
    scales make others rise by less: both paths, against the reference; TAU = 0 (rescale at every rise) agrees."""
    _sm90_or_skip()
    from mla_runner.kernels import mla_decode_sm90 as sm90

    g = torch.Generator(device=DEV).manual_seed(11)
    lens = [16384, 3000, 700, 64, 9000]
    q, kv, sl, qo, bt = gpu_problem(lens, [q_len] * len(lens), H, 64)
    q *= torch.linspace(0.25, 3.0, H, device=DEV).view(1, H, 1).to(q.dtype)  # some heads' scores move more
    flat = kv.view(-1, DV + DPE)
    hot = torch.randint(0, flat.shape[0], (400,), device=DEV, generator=g)
    flat[hot] *= torch.rand(400, 1, device=DEV, generator=g).mul(6).add(1).to(flat.dtype)  # x1..7 keys
    meta = PersistentMetadataBuilder(num_heads=H, max_batch=len(lens), max_q_len=q_len,
                                     max_pages_per_seq=bt.shape[1], page_size=64, device=DEV).build(sl, qo, bt)
    assert (meta.num_splits > 1).any()
    ref = mla_attention_reference(q, kv, qo, sl, bt, (DV + DPE) ** -0.5, DV)
    out = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV)
    assert decode_impl(q, kv, meta, DV) == "gluon"
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    tau = sm90.RESCALE_TAU
    try:
        sm90.RESCALE_TAU = 0.0
        exact = mla_decode(q, kv, meta, (DV + DPE) ** -0.5, DV)
    finally:
        sm90.RESCALE_TAU = tau
    assert rel_err(out, exact) < 5e-3  # the two differ by the rounding of P in bf16 at another base
