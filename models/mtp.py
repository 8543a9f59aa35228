"""DeepSeek-V3's multi-token-prediction (MTP) module: drafts the token after next from the main model's hidden state.

Stored as ``model.layers.{num_hidden_layers}`` (61 in DeepSeek-V3; Kimi-K2 has none): ``embed_tokens``, ``enorm``,
``hnorm``, ``eh_proj`` [hidden, 2 * hidden] (bf16 in the real files), one full decoder layer (MLA + MoE, FP8 like
the rest), ``shared_head.norm`` and ``shared_head.head``. For row i (main-model position i, token t_{i+1} known)::

    x_i    = eh_proj([enorm(embed_tokens(t_{i+1})) ; hnorm(h_i)])     h_i: the main model's output at i
    y_i    = shared_head.norm(DecoderLayer(x_i))                       RoPE position i, the module's own cache
    logits = shared_head.head(y_i)                                     the distribution of t_{i+2}

Where the public descriptions disagree, the choices and their sources:

- Concatenation order: embedding first, hidden state second. DeepSeek-V3's report (arXiv 2412.19437, sec. 2.2,
  eq. 21) writes [RMSNorm(h_i) ; RMSNorm(Emb(t_{i+1}))], but the weights follow the implementations that serve
  them: vLLM ``deepseek_mtp.py`` and SGLang ``deepseek_nextn.py`` both run ``eh_proj(cat([enorm(emb), hnorm(h)]))``,
  which the tensor name (e, then h) also says.
- h_i is the main model's output after its final norm (``model.norm``): what ``DeepseekV3ForCausalLM.forward``
  returns. vLLM passes the target model's returned hidden states (its ``DeepseekV2Model.forward`` ends with
  ``self.norm``), and so does SGLang; the report only says "the representation given by the main model", and
  DeepSeek-V3 issue #839, which asks, went unanswered.
- ``forward`` returns y_i after ``shared_head.norm``, as the main model returns its normed output: a second draft
  (k > 1) feeds y_i back as h_i, as SGLang does (vLLM feeds the value before that norm).
- No input is masked: vLLM zeroes the embedding at position 0, which its issue #33299 reports as not matching the
  training (the row at position 0 holds a real token, t_1).
- The embedding and output head are shared with the main model (report sec. 2.2); SGLang ignores the stored copies
  and uses the main model's. The loader shares them where the checkpoint's copy equals the main model's tensor or
  is absent, so they cost no memory (models/loader.py).

Names: the module sits at ``mtp`` in ``DeepseekV3ForCausalLM`` and reads like the main model (its decoder layer as
``block``, its head as ``norm`` + ``lm_head``, so the tensor-parallel split table treats ``lm_head`` alike);
``CHECKPOINT_RENAMES`` maps them to the files' names.
"""
from __future__ import annotations

import torch
from torch import nn

from mla_runner.models.config import ModelArgs
from mla_runner.models.context import ForwardContext
from mla_runner.models.deepseek_v3 import DecoderLayer, prepare_layer
from mla_runner.models.layers import RMSNorm, VocabParallelEmbedding
from mla_runner.models.mla import MLA
from mla_runner.models.parallel import Parallel
from mla_runner.models.rope import RotaryEmbedding

PREFIX = "mtp."  # where the module sits in DeepseekV3ForCausalLM
# Model-side prefix -> checkpoint prefix, first match wins; {layer}: the MTP layer's index in the files.
CHECKPOINT_RENAMES = (
    ("mtp.block.", "model.layers.{layer}."),
    ("mtp.norm.", "model.layers.{layer}.shared_head.norm."),
    ("mtp.lm_head.", "model.layers.{layer}.shared_head.head."),
    ("mtp.", "model.layers.{layer}."),
)
# MTP tensors -> the main model's tensor they share where the checkpoint's copy equals it or is absent.
SHARED_WITH_MAIN = {"mtp.embed_tokens.weight": "model.embed_tokens.weight", "mtp.lm_head.weight": "lm_head.weight"}
# Linear layers of the module that the real files store in bf16 (random FP8 models keep them so too).
BF16_LINEARS = ("mtp.eh_proj", "mtp.lm_head")


def checkpoint_name(name: str, layer: int | None) -> str:
    """The checkpoint's name of model tensor ``name`` (the MTP module stored as layer ``layer``)."""
    for model_prefix, stored_prefix in CHECKPOINT_RENAMES:
        if name.startswith(model_prefix):
            if layer is None:
                raise ValueError(f"{name}: the MTP layer's index is needed to name it in the checkpoint")
            return stored_prefix.format(layer=layer) + name.removeprefix(model_prefix)
    return name


class MTPModule(nn.Module):
    """One MTP depth. ``layer``: its index in the files (num_hidden_layers of the untruncated model), which
    decides, like any layer's, whether its MLP is dense or MoE."""

    def __init__(self, args: ModelArgs, layer: int, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.args, self.layer, self.par = args, layer, par
        h = args.hidden_size
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, h, par)
        self.enorm = RMSNorm(h, args.rms_norm_eps)
        self.hnorm = RMSNorm(h, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)  # replicated: it reads and writes whole hidden states
        self.block = DecoderLayer(args, layer, par)
        self.norm = RMSNorm(h, args.rms_norm_eps)  # shared_head.norm
        self.lm_head = nn.Linear(h, par.part(args.vocab_size), bias=False)  # shared_head.head, vocab parallel
        self.rotary_emb = RotaryEmbedding(args)  # its tables are the main model's (post_load)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T]: token t_{i+1} of each row; hidden [T, hidden_size]: the main model's output h_i (what
        ``DeepseekV3ForCausalLM.forward`` returns) at position i; ``ctx``: positions i and slots in this module's
        own cache. -> [T, hidden_size], after shared_head.norm (``compute_logits`` takes it; a further draft takes
        it as ``hidden``)."""
        e = self.enorm(self.embed_tokens(input_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))
        return self.norm(self.block(x, ctx, self.rotary_emb(ctx.positions)))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] from ``forward`` -> fp32 logits [N, vocab] of the drafted token, the same on
        every rank."""
        return self.par.all_gather(self.lm_head(hidden).float())

    @property
    def attention_layers(self) -> list[MLA]:
        """Its MLA module: the engine assigns it a paged latent cache of its own (``kv_cache``)."""
        return [self.block.self_attn]

    def post_load(self, main: nn.Module) -> None:
        """Once the weights are in place (``main``: the DeepseekV3ForCausalLM, its RoPE tables built): share the
        main model's RoPE tables, and derive the decoder layer's absorbed, fused and stacked weights."""
        self.rotary_emb.cos, self.rotary_emb.sin = main.model.rotary_emb.cos, main.model.rotary_emb.sin
        prepare_layer(self.block)


def attach_mtp(model: nn.Module, layer: int) -> MTPModule:
    """Give ``model`` (a DeepseekV3ForCausalLM, usually on the meta device) an MTP module stored as ``layer``."""
    model.mtp = MTPModule(model.args, layer, model.par)
    return model.mtp
