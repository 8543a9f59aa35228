"""``FP8Linear``: a bias-free linear layer that keeps its checkpoint's e4m3 weight and 128x128 block scales.

State dict names equal the checkpoint's (``*.weight`` float8_e4m3fn [out, in], ``*.weight_scale_inv`` f32
[ceil(out/128), ceil(in/128)]), so the loader puts both in place unchanged. ``forward`` runs the block-scaled
GEMM of kernels/fp8_gemm.py (activations quantized per token per 128 channels in bf16/fp16 runs, as the fused
MoE does; weight-only dequantization in fp32 runs; the implementation is chosen there by the number of rows; on
a CPU under the Triton interpreter: slow, for tests). ``convert_to_fp8`` swaps chosen ``nn.Linear`` modules of
a (meta) model. ``fuse_linears`` concatenates layers that read the same input into one weight (MLA's q_a_proj +
kv_a_proj_with_mqa), run by ``linear``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mla_runner.kernels.fp8_block import DEFAULT_BLOCK, scale_grid

# Linear layers that stay in the run dtype even with FP8 weights: kv_b_proj, whose halves W_UK / W_UV decode absorbs
# into the attention in the run dtype (docs/fp8.md#2-where-fp8-runs), and which prefill applies as a linear layer.
KEEP_DEQUANTIZED = ("kv_b_proj",)


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = DEFAULT_BLOCK) -> None:
        super().__init__()
        if block != DEFAULT_BLOCK:
            raise ValueError(f"FP8Linear supports {DEFAULT_BLOCK} blocks only, got {block}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.empty(scale_grid((out_features, in_features), block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


def convert_to_fp8(model: nn.Module, module_names: Iterable[str] | None = None) -> list[str]:
    """Replace ``nn.Linear`` modules with ``FP8Linear`` (same names, weights unset: meta models before loading).

    ``module_names``: the ones to convert (e.g. those whose checkpoint weight is FP8); None: every linear
    layer but ``lm_head`` and ``KEEP_DEQUANTIZED`` (random FP8 weights). Returns the converted names.
    """
    wanted = None if module_names is None else set(module_names)
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module.bias is not None:
            continue
        if name.rpartition(".")[2] in KEEP_DEQUANTIZED or name == "lm_head":
            continue
        if wanted is not None and name not in wanted:
            continue
        parent, _, attr = name.rpartition(".")
        with torch.device("meta"):
            setattr(model.get_submodule(parent), attr, FP8Linear(module.in_features, module.out_features))
        done.append(name)
    return done


def linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T: a run-dtype weight (``scale_inv`` None) as ``F.linear``; an e4m3 weight with its 128x128
    block scales as ``FP8Linear`` runs it."""
    if scale_inv is None:
        return F.linear(x, weight)
    from mla_runner.kernels.fp8_gemm import fp8_linear

    # 16-bit runs: DeepSeek's W8A8 scheme (faster at every measured shape; kernels/fused_moe.py chooses the
    # same); fp32 runs (the CPU reference dtype): weight-only dequantization, exact up to summation order.
    mode = "weight_only" if x.dtype == torch.float32 else "act_quant"
    return fp8_linear(x, weight, scale_inv, mode=mode)


def fuse_linears(layers: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight for bias-free linear layers that read the same input: ``(weight, scale_inv)`` with the layers'
    output rows concatenated in order (``scale_inv``: the FP8 block scales, concatenated alike; None for
    ``nn.Linear``), so ``linear(x, weight, scale_inv)`` is the concatenation of their outputs. Each layer's
    weight (and scales) becomes a view into the fused tensors: the two layouts share memory, state dict names
    and ``parameters()`` are unchanged.

    None (nothing changed) when they cannot be fused: not all ``nn.Linear`` or all ``FP8Linear``, a bias,
    different input widths, dtypes or devices, or FP8 layers other than the last whose rows are not whole
    128-blocks (a block row of scales would then cover two layers' weights).
    """
    if len(layers) < 2:
        return None
    kinds = {type(m) for m in layers}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, FP8Linear):
        return None
    weights = [m.weight for m in layers]
    if (any(getattr(m, "bias", None) is not None for m in layers) or weights[0].is_meta
            or len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1):
        return None
    fp8 = isinstance(layers[0], FP8Linear)
    if fp8 and any(w.shape[0] % DEFAULT_BLOCK[0] for w in weights[:-1]):
        return None
    weight = torch.cat([w.detach() for w in weights])
    scale = torch.cat([m.weight_scale_inv for m in layers]) if fp8 else None
    if scale is not None and tuple(scale.shape) != scale_grid(tuple(weight.shape), DEFAULT_BLOCK):
        raise ValueError(f"fused FP8 scales {tuple(scale.shape)} do not cover the fused weight {tuple(weight.shape)}")
    row = srow = 0
    for m in layers:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        row += n
        if scale is not None:
            sn = m.weight_scale_inv.shape[0]
            m.weight_scale_inv = scale[srow : srow + sn]
            srow += sn
    return weight, scale
