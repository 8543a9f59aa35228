"""FP8 e4m3 block quantization as stored in DeepSeek-V3 / Kimi-K2 checkpoints.

Each weight [M, N] is stored as float8_e4m3fn together with ``weight_scale_inv`` [ceil(M/bm), ceil(N/bn)] (f32),
one scale per bm x bn block, edge blocks partial: ``W[i, j] = float(q[i, j]) * scale_inv[i // bm, j // bn]``.
The name says "inverse" because the kernels multiply by it to undo the quantization.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)


def scale_grid(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the per-block scale tensor of a weight of ``shape``."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_block(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 [M, N] and per-block scales -> ``dtype`` [M, N]; the product is formed in fp32, then cast."""
    if w.dim() != 2 or tuple(scale_inv.shape) != scale_grid(w.shape, block):
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} in {block} blocks")
    m, n = w.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]
    return (w.float() * scale).to(dtype)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, N] -> (float8_e4m3fn [M, N], f32 scale_inv per block) with s = amax / 448 of each zero-padded block.

    An all-zero block gets s = 1 (any value dequantizes its zeros exactly; amax / 448 would divide by zero).
    """
    m, n = w.shape
    gm, gn = scale_grid(w.shape, block)
    padded = w.float().new_zeros(gm * block[0], gn * block[1])
    padded[:m, :n] = w.float()
    blocks = padded.view(gm, block[0], gn, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:m, :n].to(torch.float8_e4m3fn)
    return q.contiguous(), scale
