"""FP8 block (de)quantization against a plain loop over blocks, including partial edge blocks."""
from __future__ import annotations

import pytest
import torch

from mla_runner.kernels.fp8_block import FP8_MAX, dequantize_fp8_block, quantize_fp8_block, scale_grid

SHAPES = [(200, 136), (40, 200), (576, 7168 // 8), (1, 1), (129, 257), (256, 128)]
BLOCKS = [(128, 128), (64, 32)]


def loop_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(q.shape)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[bi, bj]
    return out


def loop_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    grid = scale_grid(w.shape, block)
    q, scale = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(grid)
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            amax = w[rows, cols].abs().max()
            scale[bi, bj] = amax / FP8_MAX if amax > 0 else 1.0
            q[rows, cols] = (w[rows, cols] / scale[bi, bj]).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_and_dequantize_match_the_loop(shape: tuple[int, int], block: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.rand(shape[0], 1) * 3
    q, scale = quantize_fp8_block(w, block)
    q_ref, scale_ref = loop_quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == scale_grid(shape, block) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    torch.testing.assert_close(dequantize_fp8_block(q, scale, block), loop_dequantize(q, scale, block), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_error_is_within_e4m3_precision(shape: tuple[int, int]) -> None:
    """3 mantissa bits: relative error <= 2^-4 for normal values, absolute <= scale * 2^-10 for subnormals."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8_block(w)
    back = dequantize_fp8_block(q, scale)
    per_elem_scale = loop_dequantize(torch.ones(shape, dtype=torch.float8_e4m3fn), scale, (128, 128))
    bound = torch.maximum(w.abs() * 2**-4, per_elem_scale * 2**-10)
    assert ((back - w).abs() <= bound + 1e-12).all()
    assert (back.abs().amax() - w.abs().amax()).abs() <= 1e-6 * w.abs().amax()  # the block max is exact


def test_zero_block_and_dtype() -> None:
    w = torch.zeros(130, 10)
    w[129, 3] = 2.0
    q, scale = quantize_fp8_block(w)
    assert scale[0, 0] == 1.0 and scale[1, 0] == pytest.approx(2.0 / FP8_MAX)
    back = dequantize_fp8_block(q, scale, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back.float(), w)


def test_dequantize_rejects_a_mismatched_scale() -> None:
    q, scale = quantize_fp8_block(torch.randn(200, 136))
    with pytest.raises(ValueError, match="scale_inv"):
        dequantize_fp8_block(q, scale[:1])
