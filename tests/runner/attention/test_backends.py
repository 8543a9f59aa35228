"""Attention backends: the same outputs through every backend that runs here, each building only its own metadata,
what each declares it supports enforced with one-line errors, and aiter's per-token metadata checked through a
stand-in of its documented call."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from mla_runner.attention import (
    BACKENDS,
    AttentionSpec,
    StepInputs,
    backend_class,
    check_choice,
    make_backend,
    resolve_name,
)
from mla_runner.attention.aiter_backend import AiterBackend, AiterMetadata
from mla_runner.attention.torch_backend import TorchBackend, TorchMetadata
from mla_runner.attention.triton_backend import TritonPersistentBackend, TritonPerStepBackend
from mla_runner.errors import ConfigError
from mla_runner.kernels.metadata import MLAMetadata, device_dram_ratio
from mla_runner.kernels.reference import gather_kv, mla_attention_reference
from mla_runner.kernels.synthetic import make_problem
from mla_testing import INTERPRETER
from mla_testing.numerics import REL_TOL, rel_err

HAS_FLASHMLA = torch.cuda.is_available() and importlib.util.find_spec("flash_mla") is not None
SCALE = 0.1352


def spec_for(problem, heads: int, **kw) -> AttentionSpec:
    return AttentionSpec(num_heads=heads, kv_lora_rank=512, rope_dim=64, page_size=problem.kv_cache.shape[1],
                         dtype=problem.q.dtype, device=problem.q.device, max_batch=len(problem.seq_lens_host),
                         max_pages_per_seq=problem.max_pages, max_q_len=max(problem.q_lens_host), **kw)


def inputs_of(problem) -> StepInputs:
    return StepInputs(problem.seq_lens, problem.qo_indptr, problem.block_table, max(problem.q_lens_host),
                      problem.seq_lens_host, problem.q_lens_host)


def run(backend, problem) -> torch.Tensor:
    return backend.forward(problem.q, problem.kv_cache, backend.build_metadata(inputs_of(problem)), SCALE)


def reference(problem) -> torch.Tensor:
    p = problem
    return mla_attention_reference(p.q, p.kv_cache, p.qo_indptr, p.seq_lens, p.block_table, SCALE, 512)


@pytest.mark.parametrize("name", ["flashmla", "aiter"])
def test_unavailable_backend_fails_at_start_with_one_sentence(name):
    if name == "flashmla" and HAS_FLASHMLA:
        pytest.skip("FlashMLA is available here")
    spec = AttentionSpec(num_heads=128, kv_lora_rank=512, rope_dim=64, page_size=64, dtype=torch.bfloat16,
                         device=torch.device("cpu"))
    with pytest.raises(ConfigError) as info:
        make_backend(name, "persistent", spec)
    message = str(info.value)
    assert "\n" not in message and f"attention={name}" in message and "attention=triton" in message


@pytest.mark.parametrize("dram_ratio", [None, 0, 120])
def test_metadata_options_reach_their_builder_only(dram_ratio):
    # metadata.dram_ratio: unset takes the device's (the H100's off CUDA); 0 turns the plan's DRAM floor off
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = AttentionSpec(num_heads=64, kv_lora_rank=512, rope_dim=64, page_size=64, dtype=torch.float32,
                         device=device, max_batch=2, max_pages_per_seq=4)
    persistent = make_backend("triton", "persistent", spec, num_kv_splits=3, dram_ratio=dram_ratio)
    assert isinstance(persistent, TritonPersistentBackend)
    want = device_dram_ratio(device) if dram_ratio is None else dram_ratio
    assert (persistent.builder.dram_ratio, persistent.builder.max_kv_splits) == (want, 3)
    per_step = make_backend("triton", "per_step", spec, num_kv_splits=3, dram_ratio=dram_ratio)
    assert isinstance(per_step, TritonPerStepBackend) and per_step.builder.num_kv_splits == 3
    assert make_backend("triton", "per_step", spec).builder.num_kv_splits == 4  # its default
    # the others build their own metadata, whatever the strategy says
    assert type(make_backend("torch", "per_step", spec)) is TorchBackend


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")
def test_backends_agree_on_cpu():
    lens, q_lens = [1, 64, 200, 37], [1, 1, 2, 1]
    p = make_problem(lens, q_lens, 3, 64, dtype=torch.float32)
    ref = reference(p)
    for strategy in ("persistent", "per_step"):
        out = run(make_backend("triton", strategy, spec_for(p, 3)), p)
        assert rel_err(out, ref) < REL_TOL[torch.float32], strategy
    assert torch.equal(run(make_backend("torch", "persistent", spec_for(p, 3)), p), ref)


def test_each_backend_builds_only_what_it_reads():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the Triton kernels: on the GPU, or interpreted)
    p = make_problem([5, 70], [1, 1], 2, 16, dtype=torch.float32, device=device)
    torch_meta = make_backend("torch", "persistent", spec_for(p, 2)).build_metadata(inputs_of(p))
    assert type(torch_meta) is TorchMetadata  # the lengths and the block table, no work plan
    assert torch_meta.seq_lens is p.seq_lens and torch_meta.block_table is p.block_table
    if INTERPRETER or device == "cuda":
        assert type(make_backend("triton", "persistent", spec_for(p, 2)).build_metadata(inputs_of(p))) is MLAMetadata
    with pytest.raises(ValueError, match="host lengths"):  # per_step plans from host lists, which a graph lacks
        TritonPerStepBackend(spec_for(p, 2)).build_metadata(StepInputs(p.seq_lens, p.qo_indptr, p.block_table))


def test_capabilities_decide_graphs_and_refuse_what_a_backend_cannot_run():
    assert [n for n in BACKENDS if backend_class(n, "persistent").capabilities.cuda_graphs] == ["triton", "flashmla"]
    assert not backend_class("triton", "per_step").capabilities.cuda_graphs
    assert backend_class("triton", "per_step").capabilities.graph_forward  # its kernels alone can be captured
    cases = [
        (dict(name="torch", cuda_graphs=True), "cuda_graphs=true needs a backend whose step can be captured "
         "(attention=triton metadata=persistent or attention=flashmla): attention=torch"),
        (dict(name="triton", strategy="per_step", cuda_graphs=True), "attention=triton metadata=per_step builds"),
        (dict(name="triton", cuda_graphs=True, device="cpu"), "cuda_graphs=true needs device=cuda"),
        (dict(name="flashmla", page_size=16), "attention=flashmla needs page_size=64 (here 16); use attention=triton"),
        (dict(name="flashmla", dtype=torch.float32), "needs bfloat16 (here float32)"),
        (dict(name="flashmla", device="cpu"), "needs device=cuda (here cpu)"),
        (dict(name="flashmla", num_heads=3), "heads (here 3)"),
        (dict(name="aiter", kv_lora_rank=256), "needs kv_lora_rank=512 (here 256)"),
        (dict(name="nope"), "attention='nope' is not valid: choose one of torch, triton, flashmla, aiter"),
        (dict(name="triton", strategy="static"), "metadata='static' is not valid"),
    ]
    for kw, needle in cases:
        kw = {"strategy": "persistent", **kw}
        with pytest.raises(ConfigError) as info:
            check_choice(kw.pop("name"), kw.pop("strategy"), **kw)
        assert needle in str(info.value) and "\n" not in str(info.value), (kw, str(info.value))
    assert check_choice("flashmla", "per_step", cuda_graphs=True, page_size=64, num_heads=128,
                        dtype=torch.bfloat16) is backend_class("flashmla", "persistent")


def test_auto_is_triton_on_a_gpu_and_torch_on_a_cpu():
    assert (resolve_name("auto", "cuda"), resolve_name("auto", "cpu"), resolve_name("torch", "cuda")) == (
        "triton", "torch", "torch")
    assert check_choice("auto", "persistent", device="cuda", cuda_graphs=True) is TritonPersistentBackend
    assert check_choice("auto", "per_step", device="cpu") is backend_class("torch", "persistent")
    assert check_choice("auto", "persistent", cuda_graphs=True) is None  # the device unknown: nothing refuted
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a backend whose step can be captured"):
        check_choice("auto", "persistent", device="cpu", cuda_graphs=True)  # auto is torch there
    with pytest.raises(ConfigError, match="metadata='static' is not valid"):
        check_choice("auto", "static")
    spec = AttentionSpec(num_heads=4, kv_lora_rank=32, rope_dim=8, page_size=16, dtype=torch.float32,
                         device=torch.device("cpu"))
    assert type(make_backend("auto", "persistent", spec)).name == "torch"


def _aiter_stand_in(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                    sm_scale=None, **_):
    """aiter.mla.mla_decode_fwd as its interface documents it, in torch: request b's query rows
    qo_indptr[b]:qo_indptr[b+1] attend causally to the cache rows kv_indices[kv_indptr[b]:kv_indptr[b+1]] of a cache
    of pages of one token (kv_last_page_lens all 1)."""
    assert kv_buffer.shape[1:3] == (1, 1) and bool((kv_last_page_lens == 1).all())
    V = o.shape[-1]
    for b in range(qo_indptr.shape[0] - 1):
        qs, qe = int(qo_indptr[b]), int(qo_indptr[b + 1])
        kv = kv_buffer[kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long(), 0, 0].float()
        assert qe - qs <= max_seqlen_q
        for i in range(qe - qs):
            seen = kv[: kv.shape[0] - (qe - qs) + i + 1]
            p = torch.softmax(torch.einsum("hd,kd->hk", q[qs + i].float(), seen) * sm_scale, -1)
            o[qs + i] = (p @ seen[:, :V]).to(o.dtype)


def test_aiter_metadata_feeds_its_documented_call(monkeypatch):
    """The per-token kv indices and offsets built for aiter (the Triton kv-index kernel) give the reference's
    attention through a stand-in of aiter's call; padding slots (length 0) included."""
    if not (INTERPRETER or torch.cuda.is_available()):
        pytest.skip("the kv-index kernel needs a GPU or the Triton interpreter")
    aiter, mla = types.ModuleType("aiter"), types.ModuleType("aiter.mla")
    mla.mla_decode_fwd, aiter.mla = _aiter_stand_in, mla
    monkeypatch.setitem(sys.modules, "aiter", aiter)
    monkeypatch.setitem(sys.modules, "aiter.mla", mla)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = make_problem([1, 130, 0, 64, 33], [1, 2, 1, 1, 3], 4, 16, dtype=torch.float32, device=device)
    backend = AiterBackend(spec_for(p, 4))
    meta = backend.build_metadata(inputs_of(p))
    assert isinstance(meta, AiterMetadata) and meta.kv_indptr.tolist() == [0, 1, 131, 131, 195, 228]
    for b, n in enumerate(p.seq_lens_host):  # every token's flat slot, request after request
        start = meta.kv_indptr[b]
        slots = meta.kv_indices[start:start + n].long()
        assert torch.equal(p.kv_cache.view(-1, 576)[slots], gather_kv(p.kv_cache, p.block_table[b], n))
    out = backend.forward(p.q, p.kv_cache, meta, SCALE)
    rows = torch.cat([torch.arange(int(p.qo_indptr[b]), int(p.qo_indptr[b + 1])) for b in range(5) if
                      p.seq_lens_host[b]])  # a padding slot's row is the reference's zeros, aiter's anything
    assert rel_err(out[rows], reference(p)[rows]) < REL_TOL[torch.float32]


@pytest.mark.skipif(not HAS_FLASHMLA, reason="needs a Hopper GPU and flash_mla")
@pytest.mark.parametrize("heads", BACKENDS["flashmla"].capabilities.head_counts)
def test_flashmla_matches_the_reference_at_every_declared_head_count(heads):
    lens = [4000, 1, 129, 64, 1000]
    p = make_problem(lens, [1] * len(lens), heads, 64, dtype=torch.bfloat16, device="cuda")
    out = run(make_backend("flashmla", "persistent", spec_for(p, heads)), p)
    assert rel_err(out, reference(p)) < REL_TOL[torch.bfloat16]


def test_only_the_backends_that_read_fp8_caches_take_them():
    """aiter reads model-dtype caches only, flashmla those and the per-tensor ``fp8`` layout: another kv_cache_dtype
    with them is a one-line config error naming the backend that reads it; torch and triton take every layout."""
    refused = {"aiter": (("fp8", "fp8_ds_mla"), "kv_cache_dtype=auto"),
               "flashmla": (("fp8_ds_mla",), "kv_cache_dtype=auto or fp8")}
    for name, (kinds, needs) in refused.items():
        for kind in kinds:
            with pytest.raises(ConfigError) as info:
                check_choice(name, "persistent", kv_cache_dtype=kind)
            assert str(info.value) == f"attention={name} needs {needs} (here {kind}); use attention=triton"
        assert check_choice(name, "persistent", kv_cache_dtype="auto") is BACKENDS[name]
    assert check_choice("flashmla", "persistent", kv_cache_dtype="fp8") is BACKENDS["flashmla"]
    for name in ("torch", "triton", "auto"):
        for kind in ("auto", "fp8", "fp8_ds_mla"):
            check_choice(name, "persistent", kv_cache_dtype=kind, device="cpu" if name != "triton" else None)


def test_fp8_flashmla_library_is_found_where_vllm_puts_it(tmp_path, monkeypatch):
    """vLLM's FP8 FlashMLA library: the file inside an installed vllm package (vllm not imported), else none, and
    $MLA_RUNNER_FLASHMLA_FP8 before either; without it, loading says what to install."""
    from mla_runner.kernels import flashmla

    monkeypatch.delenv(flashmla.FP8_LIBRARY_ENV, raising=False)
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('vllm must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert flashmla.fp8_library() is None
    (tmp_path / "vllm" / flashmla.FP8_LIBRARY_NAME).write_bytes(b"")
    assert flashmla.fp8_library() == tmp_path / "vllm" / flashmla.FP8_LIBRARY_NAME
    monkeypatch.setenv(flashmla.FP8_LIBRARY_ENV, str(tmp_path / "elsewhere.so"))
    assert flashmla.fp8_library() == tmp_path / "elsewhere.so"
    monkeypatch.delenv(flashmla.FP8_LIBRARY_ENV)
    monkeypatch.setattr(flashmla, "fp8_library", lambda: None)
    flashmla.fp8_ops.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"needs vLLM's FP8 FlashMLA .*pip install vllm, or set "
                                               r"MLA_RUNNER_FLASHMLA_FP8="):
            flashmla.fp8_ops()
        spec = AttentionSpec(num_heads=128, kv_lora_rank=512, rope_dim=64, page_size=64, dtype=torch.bfloat16,
                             device=torch.device("cpu"), kv_cache_dtype="fp8")
        with pytest.raises(ConfigError, match=r"^attention=flashmla with kv_cache_dtype=fp8 needs vLLM's FP8 "
                                              r"FlashMLA .*; or use attention=triton$"):
            BACKENDS["flashmla"](spec)
    finally:
        flashmla.fp8_ops.cache_clear()


def _fp8_flashmla_loads() -> bool:
    from mla_runner.kernels import flashmla

    try:
        return HAS_FLASHMLA and flashmla.fp8_ops() is not None
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 2])
def test_fp8_flashmla_reads_the_fp8_cache(q_len):
    """attention=flashmla over an ``fp8`` cache (vLLM's FP8 FlashMLA, where it loads): the attention of the
    dequantized cache within 5e-2 (its query is quantized to e4m3 too: 2.8-3.6e-2 measured at full size)."""
    if not _fp8_flashmla_loads():
        pytest.skip("needs a Hopper GPU, flash_mla and vLLM's FP8 FlashMLA library")
    from mla_runner.kernels.kv_cache import KVCacheLayout, dequantize_reference, quantize_reference

    lens = [4000, 3, 129, 64, 1000]
    p = make_problem(lens, [q_len] * len(lens), 128, 64, dtype=torch.bfloat16, device="cuda")
    layout = KVCacheLayout("fp8", 512, 64, torch.bfloat16)
    scale = torch.tensor([1 / 16], device="cuda")
    fp8 = quantize_reference(p.kv_cache.view(-1, 576).float(), layout, scale).view(*p.kv_cache.shape[:2], 576)
    want = mla_attention_reference(p.q, dequantize_reference(fp8, layout, scale).to(torch.bfloat16), p.qo_indptr,
                                   p.seq_lens, p.block_table, SCALE, 512)
    backend = make_backend("flashmla", "persistent", spec_for(p, 128, kv_cache_dtype="fp8"))
    out = backend.forward(p.q, fp8, backend.build_metadata(inputs_of(p)), SCALE, kv_scale=scale)
    assert rel_err(out, want) < 5e-2


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")
@pytest.mark.parametrize("kind", ["fp8", "fp8_ds_mla"])
def test_backends_read_fp8_caches_with_their_scale(kind):
    """torch and both Triton strategies on an FP8 cache (the model's kv_scale passed through forward, here not 1):
    the attention of the dequantized cache, q_len 1 and 2 and a padding slot among the requests."""
    from mla_runner.kernels.kv_cache import KVCacheLayout, dequantize_reference, quantize_reference

    lens, q_lens = [1, 64, 0, 200, 37], [1, 1, 1, 2, 1]
    p = make_problem(lens, q_lens, 3, 64, dtype=torch.float32)
    layout = KVCacheLayout(kind, 512, 64, torch.float32)
    scale = torch.tensor([1 / 32]) if kind == "fp8" else None
    fp8 = quantize_reference(p.kv_cache.view(-1, 576), layout, scale).view(*p.kv_cache.shape[:2], layout.width)
    dequantized = dequantize_reference(fp8, layout, scale)
    want = mla_attention_reference(p.q, dequantized, p.qo_indptr, p.seq_lens, p.block_table, SCALE, 512)
    rows = [r for b in range(len(lens)) if lens[b] for r in range(int(p.qo_indptr[b]), int(p.qo_indptr[b + 1]))]
    for name, strategy in (("torch", "persistent"), ("triton", "persistent"), ("triton", "per_step")):
        backend = make_backend(name, strategy, spec_for(p, 3, kv_cache_dtype=kind))
        out = backend.forward(p.q, fp8, backend.build_metadata(inputs_of(p)), SCALE, kv_scale=scale)
        assert rel_err(out[rows], want[rows]) < REL_TOL[torch.float32], (name, strategy)
    if kind == "fp8":  # without its scale the cache is refused, never read as if the scale were 1
        with pytest.raises(ValueError, match="per-tensor scale"):
            make_backend("torch", "persistent", spec_for(p, 3)).forward(p.q, fp8, None, SCALE)
