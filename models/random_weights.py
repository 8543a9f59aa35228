"""A model with random weights made directly on the device: the full-width studies and benchmarks that need
the real shapes (7168 wide, 128 heads, 256 experts) but no checkpoint.

Matrices are drawn N(0, 1/fan_in) so activations keep their scale through the layers; norms are 1; the
router's correction bias is small so routing stays spread over the experts, as in a trained model.
"""
from __future__ import annotations

import torch
from models.config import ModelArgs
from models.deepseek_v3 import FP32_TENSOR_SUFFIXES, DeepseekV3ForCausalLM
from models.fp8 import quantize_fp8_block
from models.fp8_linear import FP8Linear, convert_to_fp8
from models.layers import RMSNorm
from models.loader import set_tensor


@torch.no_grad()
def random_model(args: ModelArgs, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 fp8: bool = False) -> DeepseekV3ForCausalLM:
    """``fp8``: the linear layers a real checkpoint stores in FP8 are drawn in ``dtype``, then quantized into
    128x128 blocks (``quantize_fp8_block``) and kept as ``FP8Linear`` (the same draws as without ``fp8``)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(args)  # each tensor is then made once, in its final dtype, on the device
    if fp8:
        convert_to_fp8(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, FP8Linear):
            if name.endswith("weight"):
                w = torch.empty(tensor.shape, dtype=dtype, device=device).normal_(0, tensor.shape[1] ** -0.5,
                                                                                  generator=gen)
                q, scale = quantize_fp8_block(w)
                set_tensor(model, name, q)
                set_tensor(model, name + "_scale_inv", scale)
            continue
        if name.endswith(FP32_TENSOR_SUFFIXES):
            value = torch.empty(tensor.shape, dtype=torch.float32, device=device).normal_(0, 1e-3, generator=gen)
        elif isinstance(module, RMSNorm):
            value = torch.ones(tensor.shape, dtype=dtype, device=device)
        elif tensor.dim() == 2:
            value = torch.empty(tensor.shape, dtype=dtype, device=device).normal_(0, tensor.shape[1] ** -0.5, generator=gen)
        else:
            continue  # non-persistent tables that post_load derives
        set_tensor(model, name, value)
    model.post_load()
    return model.eval()
