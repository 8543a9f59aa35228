"""Multi-head latent attention in absorbed form over a paged latent cache.

Per token the cache holds one vector [kv_a_layernorm(c_kv) (kv_lora_rank) | rotated k_pe (rope_dim)] shared by
all heads. ``kv_b_proj`` is never applied to the cache: its key half W_UK is folded into the query
(q_lat = q_nope @ W_UK per head) and its value half W_UV into the output (o = o_lat @ W_UV^T per head), so
attention runs directly on latent vectors (DeepSeek-V3 ``inference/model.py``, absorb mode).

Tensor parallel: a rank holds H/world heads (its rows of q_b_proj and kv_b_proj, its columns of o_proj) and
returns its partial o_proj sum, which the decoder layer all-reduces. q_a_proj, kv_a_proj_with_mqa and the
latent cache are replicated: the latent vector is shared by all heads, so each rank needs all of it.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelArgs
from models.context import ForwardContext
from models.layers import RMSNorm
from models.parallel import Parallel
from models.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.n_heads = par.part(args.num_attention_heads)  # this rank's heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.softmax_scale = args.softmax_scale
        q_out = self.n_heads * args.qk_head_dim
        self.has_q_lora = args.q_lora_rank is not None
        if not self.has_q_lora:
            self.q_proj = nn.Linear(args.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, args.kv_cache_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.hidden_size, bias=False)
        # Assigned by the engine: this layer's paged cache [num_pages, page_size, kv_cache_dim].
        self.kv_cache: torch.Tensor | None = None
        # Views of kv_b_proj.weight, [H, nope, kv_lora] and [H, v, kv_lora]; set by absorb_weights().
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None

    def absorb_weights(self) -> None:
        """Split kv_b_proj into per-head W_UK / W_UV views; call once its weight is loaded."""
        w = self.kv_b_proj.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk, self.w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum); writes the T new latent vectors into
        ``kv_cache`` first."""
        if self.kv_cache is None or self.w_uk is None:
            raise RuntimeError("MLA needs kv_cache assigned and absorb_weights() called before forward")
        cos, sin = rope
        if self.has_q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(-1, self.n_heads, self.nope_dim + self.rope_dim).split([self.nope_dim, self.rope_dim], -1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], -1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)], dim=-1)
        self.kv_cache.view(-1, latent.shape[-1])[ctx.slot_mapping] = latent.to(self.kv_cache.dtype)

        q_lat = torch.einsum("thn,hnc->thc", q_nope, self.w_uk)
        q_abs = torch.cat([q_lat, apply_rope(q_pe, cos, sin)], dim=-1)
        o_lat = ctx.backend.forward(q_abs, self.kv_cache, ctx.attn_metadata, self.softmax_scale)
        o = torch.einsum("thc,hvc->thv", o_lat, self.w_uv)
        return self.o_proj(o.flatten(1))
