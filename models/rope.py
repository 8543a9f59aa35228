"""Decoupled RoPE of MLA: YaRN frequencies, interleaved (GPT-J) pairs.

DeepSeek rotates pairs (x0, x1), (x2, x3), ... of the rope part as complex numbers, not NeoX's halves. The YaRN
temperature goes into the softmax scale (``ModelArgs.softmax_scale``); cos/sin are scaled by
``YarnScaling.cos_sin_scale``, which is exactly 1 for DeepSeek-V3 and Kimi-K2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mla_runner.models.config import ModelArgs, YarnScaling


def yarn_inv_freq(dim: int, theta: float, yarn: YarnScaling | None) -> torch.Tensor:
    """Inverse frequencies [dim // 2] (fp32): extrapolated above the correction range, interpolated by
    ``factor`` below it, linearly blended inside (bounds floored / ceiled as in DeepSeek's code)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / yarn.factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_position_embeddings, rope_dim // 2] (fp32), looked up by position.

    The tables are non-persistent buffers built by ``init_tables`` once the module lives on its device (the
    loader builds the model on the meta device).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def init_tables(self, device: torch.device | str) -> None:
        a = self.args
        inv_freq = yarn_inv_freq(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling)
        angles = torch.outer(torch.arange(a.max_position_embeddings, dtype=torch.float32), inv_freq)
        scale = a.rope_scaling.cos_sin_scale if a.rope_scaling is not None else 1.0
        self.cos, self.sin = (angles.cos() * scale).to(device), (angles.sin() * scale).to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [T, ..., d] by cos/sin [T, d // 2]; computed in fp32, returned in x's dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    c, s = cos.view(shape), sin.view(shape)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)
