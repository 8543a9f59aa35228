"""``DeepseekV3ForCausalLM``: one implementation for DeepSeek-V3 and Kimi-K2 (same architecture, other numbers).

Module names equal the checkpoint's tensor names (``model.layers.3.mlp.experts.7.up_proj.weight``), so loading
needs no rename table; the optional MTP module (``mtp``, models/mtp.py) is the one exception, renamed by its own
table. The model sees one flat batch of T tokens from any number of requests; everything about scheduling lives in
the ``ForwardContext`` (positions, cache slots, attention metadata).

Built with a ``Parallel`` layout, each module holds this rank's shard (models/parallel.py) and the model runs
the same on every rank: the embedding and each layer's attention and MLP/MoE output are summed over ranks
(one all-reduce each: the only collectives besides the all-gather of the logits).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from mla_runner.models.config import ModelArgs
from mla_runner.models.context import ForwardContext
from mla_runner.models.layers import MLP, RMSNorm, VocabParallelEmbedding
from mla_runner.models.mla import MLA
from mla_runner.models.moe import MoE
from mla_runner.models.parallel import Parallel
from mla_runner.models.rope import RotaryEmbedding

# Tensors kept in fp32 whatever the run dtype: the router bias is added to sigmoid scores near 1 whose
# differences decide the routing, and the router computes its logits in fp32 (as DeepSeek-V3 and transformers
# do): a weight kept in fp32 spares the conversion of 7168 x 256 values on every call (H100: the Gate's GEMM
# 20.8 -> 15.6 us at T = 1; docs/fused_moe.md#7-the-router). Values are those of the checkpoint's bf16 weight.
FP32_TENSOR_SUFFIXES = ("e_score_correction_bias", "mlp.gate.weight")


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.par = par
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args, par)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        dense = not args.is_moe_layer(layer)
        self.mlp = MLP(args.hidden_size, par.part(args.intermediate_size)) if dense else MoE(args, par)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._mlp_residual(x + self.par.all_reduce(self.self_attn(self.input_layernorm(x), ctx, rope)))

    # The same layer in two parts around its attention (``MLA.attend``), for steps that run the rest in CUDA graphs
    # (engine/piecewise.py); hooks on the MLA module see only ``forward``.
    def attention_inputs(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer up to its attention: ``MLA.project`` of the normalized x (writes the new latent vectors)."""
        return self.self_attn.project(self.input_layernorm(x), ctx, rope)

    def after_attention(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer after its attention: o [T, H, v_dim] through o_proj into the residual x, then the MLP or MoE."""
        return self._mlp_residual(x + self.par.all_reduce(self.self_attn.o_proj(o.flatten(1))))

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.par.all_reduce(self.mlp(self.post_attention_layernorm(x)))


def prepare_layer(layer: DecoderLayer) -> None:
    """Derive what the checkpoint does not store for one loaded decoder layer: the per-head W_UK / W_UV views of
    kv_b_proj (in the run dtype), q_a_proj and kv_a_proj_with_mqa fused into one GEMM, and the stacked expert
    weights of the fused MoE."""
    layer.self_attn.absorb_weights()
    layer.self_attn.fuse_input_projections()
    if isinstance(layer.mlp, MoE):
        layer.mlp.stack_experts()


class DeepseekV3Model(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, par)
        self.layers = nn.ModuleList(DecoderLayer(args, i, par) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(ctx.positions)
        for layer in self.layers:
            x = layer(x, ctx, rope)
        return self.norm(x)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.args, self.par = args, par
        self.model = DeepseekV3Model(args, par)
        self.lm_head = nn.Linear(args.hidden_size, par.part(args.vocab_size), bias=False)  # vocab parallel
        # The multi-token-prediction module (models/mtp.py ``MTPModule``) once one is attached (``attach_mtp``: the
        # loader's and random_model's ``mtp=True``); None otherwise.
        self.register_module("mtp", None)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] (flat over requests) -> final hidden states [T, hidden_size], after ``model.norm``: the
        input of ``compute_logits`` and, row for row, the h_i that the MTP module takes."""
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] (typically each request's last token) -> fp32 logits [N, vocab], the same
        on every rank (each computes its vocabulary slice, then all-gather)."""
        return self.par.all_gather(self.lm_head(hidden).float())

    @property
    def attention_layers(self) -> list[MLA]:
        """The MLA modules, in layer order: the engine assigns each its ``kv_cache`` (the MTP module's are
        ``mtp.attention_layers``)."""
        return [layer.self_attn for layer in self.model.layers]

    def post_load(self) -> None:
        """Derive what the checkpoint does not store, once the weights are in place on their device: the RoPE
        tables, then each decoder layer's derived weights (``prepare_layer``), the MTP module's included."""
        self.model.rotary_emb.init_tables(self.lm_head.weight.device)
        for layer in self.model.layers:
            prepare_layer(layer)
        if self.mtp is not None:
            self.mtp.post_load(self)

    def repeat_layers(self, depth: int) -> None:
        """Run ``depth`` decoder layers: each one past the loaded layers is a new module over the weights (loaded
        and derived) of the last loaded layer of its kind, dense or MoE, and gets its own KV cache from the engine.
        A step then reads as many bytes of weights and cache as a model of that depth (at ~0.6 GB a layer at batch 1,
        no layer's weights stay in the 50 MB L2 until the next copy runs), in the memory of the truncation: benchmarks
        of a full-depth step on one GPU (``model.depth``). Its outputs are not the model's. Call after ``post_load``."""
        layers = self.model.layers
        loaded = len(layers)
        for i in range(loaded, depth):
            moe = self.args.is_moe_layer(i)
            source = next((layer for layer in reversed(layers[:loaded]) if isinstance(layer.mlp, MoE) == moe), None)
            if source is None:
                raise ValueError(f"layer {i} is a {'MoE' if moe else 'dense'} layer and none of the {loaded} loaded "
                                 "layers is one to repeat")
            layers.append(_sharing_copy(source))
        self.args = dataclasses.replace(self.args, num_hidden_layers=max(depth, loaded))


def _sharing_copy(module: nn.Module) -> nn.Module:
    """A new module tree over the same tensors: each module's own dicts (parameters, buffers, hooks, submodules) and
    attributes are new containers, so assigning to the copy (a KV cache, a hook) leaves ``module`` as it was; a tuple
    of modules of the tree held as an attribute (MLA's fused input projections) names their copies."""
    copies: dict[int, nn.Module] = {}

    def copy_tree(m: nn.Module) -> nn.Module:
        new = m.__class__.__new__(m.__class__)
        new.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()}
        copies[id(m)] = new
        for name, child in m._modules.items():
            new._modules[name] = None if child is None else copy_tree(child)
        return new

    root = copy_tree(module)
    for new in root.modules():
        for k, v in new.__dict__.items():
            if isinstance(v, tuple) and v and all(isinstance(x, nn.Module) for x in v):
                new.__dict__[k] = tuple(copies.get(id(x), x) for x in v)
    return root
