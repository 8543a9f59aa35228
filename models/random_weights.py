"""A model with random weights made directly on the device: the full-width studies and benchmarks that need
the real shapes (7168 wide, 128 heads, 256 experts) but no checkpoint.

Matrices are drawn N(0, 1/fan_in) so activations keep their scale through the layers; norms are 1; the
router's correction bias is small so routing stays spread over the experts, as in a trained model.
With a ``Parallel`` layout each rank draws every full tensor in the single-process order and keeps its shard,
so the ranks together hold exactly the single-process model (greedy tokens can be compared across layouts).
"""
from __future__ import annotations

import torch
from torch import nn

from mla_runner.kernels.fp8_block import DEFAULT_BLOCK, dequantize_fp8_block, quantize_fp8_block
from mla_runner.models.config import ModelArgs
from mla_runner.models.deepseek_v3 import FP32_TENSOR_SUFFIXES, DeepseekV3ForCausalLM
from mla_runner.models.errors import CheckpointError
from mla_runner.models.fp8_linear import FP8Linear, convert_to_fp8
from mla_runner.models.layers import RMSNorm
from mla_runner.models.loader import set_tensor
from mla_runner.models.mtp import BF16_LINEARS, PREFIX, SHARED_WITH_MAIN, attach_mtp
from mla_runner.models.parallel import Parallel, fp8_aligned, read_fp8_shard, read_shard, shard_dim


@torch.no_grad()
def random_model(args: ModelArgs, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 fp8: bool = False, par: Parallel = Parallel(), mtp: bool = False) -> DeepseekV3ForCausalLM:
    """``fp8``: the linear layers a real checkpoint stores in FP8 are drawn in ``dtype``, then quantized into
    128x128 blocks (``quantize_fp8_block``) and kept as ``FP8Linear`` (the same draws as without ``fp8``).

    ``mtp``: with the MTP module (``model.mtp``, layer ``num_hidden_layers``), its embedding and head the main
    model's tensors as in DeepSeek-V3's files; drawn after the main model, whose weights are the same without it."""
    if mtp and not args.has_mtp:
        raise CheckpointError(f"the MTP module was asked for, but this {args.model_type} model has none "
                              f"(num_nextn_predict_layers={args.num_nextn_predict_layers})")
    with torch.device("meta"):
        full = DeepseekV3ForCausalLM(args)  # the draw order; each tensor is then made once, on the device
        model = DeepseekV3ForCausalLM(args, par) if par.world > 1 else full
        if mtp:
            attach_mtp(full, args.num_hidden_layers)
            if model is not full:
                attach_mtp(model, args.num_hidden_layers)
    if fp8:
        fp8_layers = convert_to_fp8(full, [n for n, m in full.named_modules()
                                           if isinstance(m, nn.Linear) and n not in BF16_LINEARS])
        if model is not full:
            local = {n: t.shape for n, t in model.state_dict().items()}
            convert_to_fp8(model, [m for m in fp8_layers if m + ".weight" in local
                                   and fp8_aligned(m + ".weight", local[m + ".weight"], par, DEFAULT_BLOCK)])
    wanted = set(model.state_dict())  # this rank's tensors
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    tensors = list(full.named_parameters()) + list(full.named_buffers())
    for name, tensor in sorted(tensors, key=lambda t: t[0].startswith(PREFIX)):  # the MTP module's last
        if name in SHARED_WITH_MAIN:
            continue
        module = full.get_submodule(name.rpartition(".")[0])
        if isinstance(module, FP8Linear):
            if name.endswith("weight"):
                q, scale = quantize_fp8_block(_normal(tensor.shape, dtype, device, gen))
                if name in wanted:
                    _set_fp8(model, name, q, scale, par, dtype)
            continue
        if name.endswith("e_score_correction_bias"):
            value = torch.empty(tensor.shape, dtype=torch.float32, device=device).normal_(0, 1e-3, generator=gen)
        elif isinstance(module, RMSNorm):
            value = torch.ones(tensor.shape, dtype=dtype, device=device)
        elif tensor.dim() == 2:
            value = _normal(tensor.shape, dtype, device, gen)
            if name.endswith(FP32_TENSOR_SUFFIXES):  # the router weight: run-dtype values, kept in fp32
                value = value.float()
        else:
            continue  # non-persistent tables that post_load derives
        if name in wanted:
            dim = shard_dim(name, par)
            set_tensor(model, name, value if dim is None else read_shard(value, value.shape, dim, par).clone())
    if mtp:
        for name, main in SHARED_WITH_MAIN.items():
            set_tensor(model, name, model.get_parameter(main))
    model.post_load()
    return model.eval()


def _normal(shape: torch.Size, dtype: torch.dtype, device: torch.device | str, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device).normal_(0, shape[1] ** -0.5, generator=gen)


def _set_fp8(model: nn.Module, name: str, q: torch.Tensor, scale: torch.Tensor, par: Parallel,
             dtype: torch.dtype) -> None:
    """This rank's shard of a quantized weight: kept in FP8 where its module is an FP8Linear, else dequantized
    (a shard that cuts 128-blocks). Shards are copied out, so the full draw is freed."""
    dim = shard_dim(name, par)
    if dim is None:
        set_tensor(model, name, q)
        set_tensor(model, name + "_scale_inv", scale)
        return
    w, s, crop = read_fp8_shard(q, scale, q.shape, dim, par, DEFAULT_BLOCK)
    if isinstance(model.get_submodule(name.rpartition(".")[0]), FP8Linear):
        set_tensor(model, name, w.clone())
        set_tensor(model, name + "_scale_inv", s.clone())
        return
    w = dequantize_fp8_block(w, s, DEFAULT_BLOCK, dtype=dtype)
    set_tensor(model, name, (w if crop is None else w[crop]).clone())
