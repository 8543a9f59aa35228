"""FP8 weights kept in FP8: the block-scaled GEMM, the FP8 fused MoE, FP8Linear models, the ``weights`` choice.

CPU: the Triton kernels under the interpreter on small shapes with partial 128x128 edge blocks, against
dequantize-then-matmul in fp32; random FP8 weights; the ``weights`` choice. GPU (skipped without CUDA):
full-width shapes, every implementation. The FP8 fused MoE: tests/kernels/test_fused_moe.py; whole models (tiny
checkpoints, full-width random layers): tests/models/test_fp8_model.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mla_runner.kernels.fp8_block import dequantize_fp8_block, quantize_fp8_block
from mla_runner.kernels.fp8_gemm import act_quant_reference, fp8_linear, fp8_linear_reference, quantize_act
from mla_runner.models.fp8_linear import FP8Linear
from mla_testing.numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the small-shape tests run on the GPU where there is one
# ||out - ref|| / ||ref|| against fp32 dequantize-then-matmul (fp32: exact products, other summation order;
# bf16: x and the output rounded; act_quant: x rounded to e4m3 as well, reference quantizes x the same way).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def quantized(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_fp8_block((torch.randn(n, k, generator=g) * k ** -0.5).to(DEVICE))


@pytest.mark.parametrize("m,n,k", [(1, 200, 136), (5, 48, 200), (17, 300, 260), (3, 136, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [None, 2])
def test_fp8_gemm_weight_only(m: int, n: int, k: int, dtype: torch.dtype, split_k: int | None) -> None:
    w, s = quantized(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = fp8_linear(x, w, s, mode="weight_only", split_k=split_k)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, fp8_linear_reference(x, w, s, mode="weight_only")) < TOL[dtype]


@pytest.mark.parametrize("m,n,k", [(2, 200, 136), (17, 300, 260), (1, 48, 1000), (70, 136, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize("impl", ["small", "large"])
def test_fp8_gemm_act_quant(m: int, n: int, k: int, dtype: torch.dtype, split_k: int | None, impl: str) -> None:
    """W8A8: activations quantized per row per 128 channels, in the GEMM's registers (small) or by
    quantize_act first (large), as torch does it in the reference (off the GPU the kernels round to e4m3 by
    hand: the interpreter's cast is wrong, see kernels/fp8_gemm.py). The reference without activation
    quantization is ~3% away: the tolerance tells the two apart."""
    w, s = quantized(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype) * 3
    out = fp8_linear(x, w, s, mode="act_quant", split_k=split_k, impl=impl)
    # fp32 x on a GPU: 64-row tiles run fp8 wgmma, whose accumulator keeps ~14 bits within a 128-wide K tile
    # (DeepSeek-V3 report, 3.3.2; measured <= 5.4e-4 here); smaller tiles convert to f16 mma (exact).
    tol = 2e-3 if dtype == torch.float32 and DEVICE == "cuda" else TOL[dtype]
    assert rel_err(out, fp8_linear_reference(x, w, s, mode="act_quant")) < tol
    assert rel_err(out, fp8_linear_reference(x, w, s, mode="weight_only")) > 0.01


def test_quantize_act_matches_reference() -> None:
    """The rows padded past M are zeros; scales column-major (cuBLASLt). CPU: e4m3 codes and scales bitwise.
    GPU: the kernel divides with div.full.f32 (<= 2 ulp): scales within 2 ulp, and a code may move to its
    neighbour where x / s lies that close to a rounding boundary (< 0.1% of the codes)."""
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(4)) * torch.rand(37, 1) * 50
    x[3, :128] = 0  # an all-zero group: scale 1e-4 / 448
    q, s = quantize_act(x.to(DEVICE), rows=40)
    q_ref, s_ref = act_quant_reference(x)
    assert (q[37:].float() == 0).all() and s.stride() == (1, 40)
    q, s = q[:37].cpu(), s[:37].cpu()
    if DEVICE == "cpu":
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(s, s_ref, rtol=5e-7, atol=0)
        differ = q.float() != q_ref.float()
        a, b = q.float(), q_ref.float()
        step = (a - b).abs() / torch.maximum(a.abs(), b.abs()).clamp_min(2 ** -6)  # one e4m3 step: <= 1/8
        assert differ.float().mean() < 1e-3 and (step[differ] <= 0.125).all()


def test_fp8_gemm_checks_its_inputs() -> None:
    w, s = quantized(200, 136, seed=0)
    with pytest.raises(ValueError, match="scale_inv"):
        fp8_linear(torch.randn(1, 136, device=DEVICE), w, s[:1])
    with pytest.raises(ValueError, match="does not match"):
        fp8_linear(torch.randn(1, 135, device=DEVICE), w, s)
    with pytest.raises(ValueError, match="float8"):
        fp8_linear(torch.randn(1, 136, device=DEVICE), w.float(), s)


def test_random_fp8_weights_quantize_the_same_draws() -> None:
    from mla_runner.models.config import ModelArgs
    from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG
    from mla_runner.models.random_weights import random_model

    args = ModelArgs.from_dict(TINY_DEEPSEEK_V3_CONFIG)
    plain = random_model(args, dtype=torch.float32, device="cpu", seed=3)
    fp8 = random_model(args, dtype=torch.float32, device="cpu", seed=3, fp8=True)
    layer = fp8.model.layers[0].self_attn.q_a_proj
    assert isinstance(layer, FP8Linear)
    w = plain.model.layers[0].self_attn.q_a_proj.weight
    assert rel_err(dequantize_fp8_block(layer.weight, layer.weight_scale_inv), w) < 0.05
    assert fp8.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    moe = fp8.model.layers[-1].mlp
    assert moe.w13.dtype == torch.float8_e4m3fn and moe.w2_scale is not None


def test_weights_choice(dsv3_ckpt: Path) -> None:
    from mla_runner.config import ModelConfig, RunConfig
    from mla_runner.engine.checkpoint import ModelSource
    from mla_runner.errors import ConfigError

    with pytest.raises(ConfigError, match="weights='int4'"):
        RunConfig(weights="int4")
    source = ModelSource.resolve(ModelConfig(name="t", preset="tiny_deepseek_v3", path=str(dsv3_ckpt)))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not source.use_fp8("auto", cpu) and source.use_fp8("auto", gpu)
    assert source.use_fp8("fp8", cpu) and not source.use_fp8("bf16", gpu)
    random = ModelSource.resolve(ModelConfig(name="r", preset="tiny_deepseek_v3", random_weights=True))
    assert not random.use_fp8("auto", gpu) and random.use_fp8("fp8", cpu)
    plain = dataclasses.replace(source, args=dataclasses.replace(source.args, fp8_block=None))
    with pytest.raises(ConfigError, match="needs an FP8 checkpoint"):
        plain.use_fp8("fp8", gpu)


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [(1, 7168, 576), (4, 8192, 7168), (16, 1536, 24576), (64, 18432, 7168), (128, 7168, 1536),
              (37, 7168, 576)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", GPU_SHAPES)
@pytest.mark.parametrize("mode,impl", [("weight_only", None), ("act_quant", None), ("act_quant", "small"),
                                       ("act_quant", "large"), ("act_quant", "scaled_mm")])
def test_fp8_gemm_full_width_gpu(m: int, k: int, n: int, mode: str, impl: str | None) -> None:
    """Every implementation against dequantize-then-matmul in fp32 (act_quant: x quantized the same way);
    bf16 output: 1e-2 relative Frobenius (measured <= 4e-3)."""
    from mla_runner.kernels.fp8_gemm import scaled_mm_ok

    if impl == "scaled_mm" and not scaled_mm_ok(n, k, torch.device("cuda")):
        pytest.skip("torch._scaled_mm's block recipe needs Hopper, N % 128 == 0, K % 512 == 0")
    g = torch.Generator(device="cuda").manual_seed(0)
    w, s = quantize_fp8_block(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda")
    out.copy_(fp8_linear(x, w, s, mode=mode, impl=impl))
    err = rel_err(out, fp8_linear_reference(x, w, s, mode=mode))
    print(f"gemm m={m} k={k} n={n} {mode} {impl}: rel err {err:.1e}")
    assert err < 1e-2
