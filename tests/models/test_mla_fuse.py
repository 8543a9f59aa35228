"""MLA's q_a_proj + kv_a_proj_with_mqa fused into one GEMM after loading (mla_runner.models.mla fuse_input_projections,
mla_runner.models.fp8_linear fuse_linears): same outputs as the two layers, no extra memory, checkpoint names intact,
and left unfused where the FP8 block scales would straddle the two (q_lora_rank not a multiple of 128).

Tolerances, CPU (Triton interpreter for FP8): run-dtype nn.Linear: bitwise. FP8: W8A8 quantizes activations
per row per 128 input channels, which fusing along N does not change, and W8A16 does not quantize them, so only
the fp32 summation order of the dot can differ (the interpreter's dot over another N-tile width when a layer
alone is narrower than 128): 1e-6 relative in fp32, one ulp in bf16 (measured: <= 7e-7 relative, model logits
bitwise). On a GPU the split-K count depends on N, so fused and separate sum the K partials in other orders
(test_fused_input_projections_full_width_gpu; benchmark: benchmarks/bench_mla_proj.py).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from mla_runner.kernels.fp8_block import quantize_fp8_block
from mla_runner.models.config import ModelArgs
from mla_runner.models.deepseek_v3 import DeepseekV3ForCausalLM
from mla_runner.models.fp8_linear import FP8Linear, convert_to_fp8, fuse_linears, linear
from mla_runner.models.loader import load_model
from mla_runner.models.presets import DEEPSEEK_V3_CONFIG, TINY_DEEPSEEK_V3_CONFIG
from mla_runner.models.random_weights import random_model
from mla_testing import INTERPRETER
from mla_testing.oracle import PagedRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cpu_fp8_or_skip(fp8: bool) -> None:
    """FP8 kernels on CPU tensors run under the Triton interpreter, which is on only without a GPU (on a GPU
    machine, test_fused_input_projections_full_width_gpu covers them)."""
    if fp8 and not INTERPRETER:
        pytest.skip("FP8 on CPU tensors needs the Triton interpreter, off on a GPU machine")


def _linear(k: int, n: int, dtype: torch.dtype, fp8: bool, gen: torch.Generator) -> nn.Module:
    w = torch.randn(n, k, generator=gen) * k**-0.5
    if not fp8:
        layer = nn.Linear(k, n, bias=False)
        layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        return layer
    layer = FP8Linear(k, n)
    q, scale = quantize_fp8_block(w)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.weight_scale_inv = scale
    return layer


def assert_same(fused: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    """Bitwise (run-dtype weights), or FP8: equal up to the fp32 summation order of the dot, i.e. within 1e-6
    relative (max abs / max) in fp32 and one ulp per element in bf16."""
    if exact:
        assert torch.equal(fused, ref), (fused.float() - ref.float()).abs().max()
        return
    tol = 1e-6 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps
    torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


# (weights, run dtype): nn.Linear fp32 / bf16; FP8Linear weight-only (fp32) and W8A8 (bf16).
KINDS = [("linear", torch.float32), ("linear", torch.bfloat16), ("fp8", torch.float32), ("fp8", torch.bfloat16)]


@pytest.mark.parametrize("kind,dtype", KINDS)
@pytest.mark.parametrize("k,n_q,n_kv", [(256, 128, 40), (384, 256, 72), (200, 72, 40)])
def test_fuse_linears_equals_the_separate_layers_and_shares_memory(kind, dtype, k, n_q, n_kv) -> None:
    fp8 = kind == "fp8"
    cpu_fp8_or_skip(fp8)
    gen = torch.Generator().manual_seed(k + n_q)
    layers = [_linear(k, n, dtype, fp8, gen) for n in (n_q, n_kv)]
    x = torch.randn(33, k, generator=gen).to(dtype)
    refs = [m(x) for m in layers]
    before = [copy.deepcopy(m.state_dict()) for m in layers]
    fused = fuse_linears(layers)
    if fp8 and n_q % 128:  # the first layer's last scale block row would cover kv rows: refused, untouched
        assert fused is None
        for m, sd in zip(layers, before):
            assert all(torch.equal(m.state_dict()[n].float(), t.float()) for n, t in sd.items())
        return
    weight, scale = fused
    assert weight.shape == (n_q + n_kv, k) and (scale is None) == (not fp8)
    assert layers[0].weight.data_ptr() == weight.data_ptr()  # views: no second copy
    assert layers[1].weight.data_ptr() == weight[n_q:].data_ptr()
    if fp8:
        assert scale.shape == ((n_q + n_kv + 127) // 128, (k + 127) // 128)
        assert layers[1].weight_scale_inv.data_ptr() == scale[n_q // 128:].data_ptr()
    for m, sd in zip(layers, before):  # same names, same values
        assert m.state_dict().keys() == sd.keys()
        assert all(torch.equal(m.state_dict()[n].float(), t.float()) for n, t in sd.items())
    out = linear(x, weight, scale)
    assert_same(out[:, :n_q], refs[0], exact=not fp8)
    assert_same(out[:, n_q:], refs[1], exact=not fp8)
    assert torch.equal(layers[0](x), refs[0])  # the views still run as the original layers


def test_fuse_linears_refuses_mismatched_layers() -> None:
    gen = torch.Generator().manual_seed(0)
    plain, fp8 = _linear(256, 128, torch.float32, False, gen), _linear(256, 40, torch.float32, True, gen)
    assert fuse_linears([plain, fp8]) is None  # mixed kinds
    assert fuse_linears([plain, _linear(200, 40, torch.float32, False, gen)]) is None  # other input width
    assert fuse_linears([plain, _linear(256, 40, torch.bfloat16, False, gen)]) is None  # other dtype
    biased = nn.Linear(256, 40)
    assert fuse_linears([plain, biased]) is None
    assert fuse_linears([plain]) is None


def _args(q_lora_rank: int | None, hidden: int = 256) -> ModelArgs:
    """Tiny DeepSeek-V3 (1 dense + 1 MoE layer) with the given q_lora_rank: 128 / 256 line up with the FP8
    blocks, 72 (the tiny checkpoints') does not."""
    return dataclasses.replace(ModelArgs.from_dict(TINY_DEEPSEEK_V3_CONFIG), num_hidden_layers=2,
                               hidden_size=hidden, q_lora_rank=q_lora_rank)


def _run(model: DeepseekV3ForCausalLM) -> list[torch.Tensor]:
    """Logits of two prompts (prefill, one mixed step, two decode steps) through the paged reference runner."""
    runner = PagedRunner(model)
    steps = [{0: [1, 5, 9, 23, 7, 11], 1: [3, 4, 8]}, {0: [13], 1: [2, 6]}, {0: [17], 1: [19]}, {0: [21], 1: [29]}]
    return [t for step in steps for t in runner.step(step).values()]


def _unfuse(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    for attn in model.attention_layers:
        attn.w_qkv_a = attn.w_qkv_a_scale = None
    return model


@pytest.mark.parametrize("kind,dtype", KINDS)
@pytest.mark.parametrize("q_lora_rank", [128, 256])
def test_fused_model_equals_unfused(kind: str, dtype: torch.dtype, q_lora_rank: int) -> None:
    """Random-weight models whose q_lora_rank is whole 128-blocks: every layer fused (FP8 too), logits equal to
    the same model with the two projections run separately, memory and checkpoint names unchanged."""
    fp8 = kind == "fp8"
    cpu_fp8_or_skip(fp8)
    args = _args(q_lora_rank)
    model = random_model(args, dtype=dtype, device="cpu", seed=1, fp8=fp8)
    with torch.device("meta"):
        fresh = DeepseekV3ForCausalLM(args)
    if fp8:
        convert_to_fp8(fresh)
    assert list(model.state_dict()) == list(fresh.state_dict())  # the checkpoint's names, nothing added
    for attn in model.attention_layers:
        assert attn.input_projections_fused
        assert isinstance(attn.q_a_proj, FP8Linear) == fp8 and (attn.w_qkv_a_scale is not None) == fp8
        assert attn.q_a_proj.weight.data_ptr() == attn.w_qkv_a.data_ptr()
        assert attn.kv_a_proj_with_mqa.weight.data_ptr() == attn.w_qkv_a[q_lora_rank:].data_ptr()
        assert all(p.data_ptr() != attn.w_qkv_a.data_ptr() or n == "q_a_proj.weight"
                   for n, p in attn.named_parameters())  # parameters() counts the fused bytes once
    fused = _run(model)
    unfused = _run(_unfuse(model))
    assert not any(attn.input_projections_fused for attn in model.attention_layers)
    for a, b in zip(fused, unfused):
        assert_same(a, b, exact=not fp8)


def test_unaligned_fp8_and_q_proj_models_stay_unfused(dsv3_ckpt: Path, dsv3_model) -> None:
    """The tiny checkpoint's q_lora_rank 72 cuts a 128-block: with FP8 weights kept the projections stay two
    FP8Linear GEMMs; dequantized at load (nn.Linear) they fuse, and still match transformers (parity tests)."""
    fp8 = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, fp8=True)
    for attn in fp8.attention_layers:
        assert isinstance(attn.q_a_proj, FP8Linear) and not attn.input_projections_fused and attn.w_qkv_a is None
    assert all(attn.input_projections_fused for attn in dsv3_model.attention_layers)
    q_proj = random_model(_args(None), dtype=torch.float32, device="cpu", seed=0)
    assert not any(attn.input_projections_fused or attn.has_q_lora for attn in q_proj.attention_layers)
    fp8_unaligned = random_model(_args(72), dtype=torch.float32, device="cpu", seed=0, fp8=True)
    assert not any(attn.input_projections_fused for attn in fp8_unaligned.attention_layers)


def test_replaced_module_runs_unfused() -> None:
    """A projection module swapped after fusing (as the FP8 emulation tests do) is what runs, not the fused
    weight."""
    model = random_model(_args(128), dtype=torch.float32, device="cpu", seed=2)
    attn = model.attention_layers[0]
    zero = nn.Linear(*reversed(attn.kv_a_proj_with_mqa.weight.shape), bias=False)
    nn.init.zeros_(zero.weight)
    attn.kv_a_proj_with_mqa = zero
    assert not attn.input_projections_fused and attn.input_projections_fused is False
    x = torch.randn(3, model.args.hidden_size)
    q_a, kv_a = attn.input_projections(x)
    assert torch.equal(kv_a, torch.zeros_like(kv_a)) and torch.equal(q_a, attn.q_a_proj(x))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_input_projections_full_width_gpu(fp8: bool) -> None:
    """DeepSeek-V3 / Kimi-K2 widths (7168 -> 1536 + 576), bf16, M = 1, 16, 64: fused vs separate. Split-K
    counts depend on N, so the fp32 partials are summed in another order: rel error (max abs / max) < 1e-2
    (bf16 output rounding)."""
    from mla_runner.models.mla import MLA

    args = ModelArgs.from_dict(DEEPSEEK_V3_CONFIG)
    with torch.device("meta"):
        attn = MLA(args)
    gen = torch.Generator().manual_seed(0)
    attn.q_a_proj = _linear(args.hidden_size, args.q_lora_rank, torch.bfloat16, fp8, gen).cuda()
    attn.kv_a_proj_with_mqa = _linear(args.hidden_size, args.kv_cache_dim, torch.bfloat16, fp8, gen).cuda()
    for M in (1, 16, 64):
        x = torch.randn(M, args.hidden_size, device="cuda", dtype=torch.bfloat16)
        ref = attn.q_a_proj(x), attn.kv_a_proj_with_mqa(x)
        if M == 1:
            assert attn.fuse_input_projections()
        out = attn.input_projections(x)
        for a, b in zip(out, ref):
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            print(f"fp8={fp8} M={M}: fused vs separate rel err {err:.1e}")
            assert err < 1e-2
