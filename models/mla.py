"""Multi-head latent attention over a paged latent cache, in both of its forms.

Per token the cache holds one vector [kv_a_layernorm(c_kv) (kv_lora_rank) | rotated k_pe (rope_dim)] shared by
all heads. ``kv_b_proj`` [H * (nope + v), kv_lora_rank] maps a latent vector to each head's no-rope key and value.

- Absorbed form (one new token per request: decode; and short prompt chunks after a long context, where
  up-projecting the context would cost more than the form's wider pairs): ``kv_b_proj`` is never applied to the
  cache: its key half W_UK is folded into the query (q_lat = q_nope @ W_UK per head) and its value half W_UV into
  the output (o = o_lat @ W_UV^T per head), so attention runs directly on latent vectors (DeepSeek-V3
  ``inference/model.py``, absorb mode): 2 * H * (kv_lora_rank + rope + kv_lora_rank) FLOPs per query-key pair,
  no up-projection.
- Non-absorbed form (chunks of prompts): ``kv_b_proj`` up-projects the keys and values, and attention runs per
  head at width nope + rope for keys and v for values, 3.4x fewer FLOPs per pair at DeepSeek-V3's sizes, the
  up-projection paid once per key (docs/mla_prefill.md).

Tensor parallel: a rank holds H/world heads (its rows of q_b_proj and kv_b_proj, its columns of o_proj) and
returns its partial o_proj sum, which the decoder layer all-reduces. q_a_proj, kv_a_proj_with_mqa and the
latent cache are replicated: the latent vector is shared by all heads, so each rank needs all of it.

The cache's layout (``kv_layout``, set by the engine with the cache; docs/kv_cache_fp8.md) is the model dtype
(``auto``) or an FP8 one: the new latents are quantized as they are written (``write_latent``), and every attention
reads every key as the cache holds it (the chunk's own keys too, gathered back dequantized), so a result does not
depend on how a prompt was chunked, found in the prefix cache or recomputed after preemption.

q_a_proj and kv_a_proj_with_mqa read the same x: after loading, ``fuse_input_projections`` concatenates their
weights into one [q_lora_rank + kv_cache_dim, hidden] GEMM (decode runs one call instead of two, each on the
~12-19 us floor of a graph-replayed GEMM: docs/fp8.md#5-one-gemm-for-the-two-input-projections); the modules keep
their names as views of it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mla_runner.kernels.attention_merge import merge_attention_states, merge_attention_states_reference
from mla_runner.kernels.kv_cache import KVCacheLayout, gather_latent, write_latent
from mla_runner.models.config import ModelArgs
from mla_runner.models.context import ForwardContext
from mla_runner.models.fp8_linear import fuse_linears, linear
from mla_runner.models.layers import RMSNorm
from mla_runner.models.parallel import Parallel
from mla_runner.models.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.n_heads = par.part(args.num_attention_heads)  # this rank's heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = args.kv_lora_rank, args.q_lora_rank
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
        # Assigned by the engine: this layer's paged cache [num_pages, page_size, width], its layout (None: the model
        # dtype, width kv_cache_dim) and, for the fp8 layout, its per-tensor scale ([1] float32 on the cache's device).
        self.kv_cache: torch.Tensor | None = None
        self.kv_layout: KVCacheLayout | None = None
        self.kv_scale: torch.Tensor | None = None
        # Views of kv_b_proj.weight, [H, nope, kv_lora] and [H, v, kv_lora]; set by absorb_weights().
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None
        # [q_a_proj | kv_a_proj_with_mqa] weights concatenated (and their FP8 block scales, None for run-dtype
        # weights); set by fuse_input_projections(). Plain tensors: the modules' weights are views of them.
        self.w_qkv_a: torch.Tensor | None = None
        self.w_qkv_a_scale: torch.Tensor | None = None
        self._fused_modules: tuple[nn.Module, ...] = ()  # the modules w_qkv_a was made from

    def absorb_weights(self) -> None:
        """Split kv_b_proj into per-head W_UK / W_UV views; call once its weight is loaded."""
        w = self.kv_b_proj.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk, self.w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]

    def fuse_input_projections(self) -> bool:
        """Make q_a_proj and kv_a_proj_with_mqa one GEMM (models/fp8_linear.py ``fuse_linears``); call once their
        weights are loaded. Not fused (returns False): q_proj models (no q_lora), FP8 weights with q_lora_rank
        not a multiple of 128 (a scale block row would straddle the two), or mismatched layer types."""
        self.w_qkv_a = self.w_qkv_a_scale = None
        self._fused_modules = ()
        if not self.has_q_lora:
            return False
        fused = fuse_linears([self.q_a_proj, self.kv_a_proj_with_mqa])
        if fused is None:
            return False
        self.w_qkv_a, self.w_qkv_a_scale = fused
        self._fused_modules = (self.q_a_proj, self.kv_a_proj_with_mqa)
        return True

    @property
    def fp8_cache(self) -> bool:
        """Whether ``kv_cache`` holds an FP8 layout (written quantized, read back dequantized)."""
        return self.kv_layout is not None and self.kv_layout.is_fp8

    @property
    def input_projections_fused(self) -> bool:
        """Whether forward runs the fused GEMM: fused, and neither module replaced since (tests swap FP8Linear
        layers for emulations after loading; those then run on their own). ``w_qkv_a = None`` unfuses."""
        fused = self._fused_modules
        return (self.w_qkv_a is not None and len(fused) == 2 and fused[0] is self.q_a_proj
                and fused[1] is self.kv_a_proj_with_mqa)

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (q_a_proj(x) [T, q_lora_rank], kv_a_proj_with_mqa(x) [T, kv_cache_dim])."""
        if self.input_projections_fused:
            qkv = linear(x, self.w_qkv_a, self.w_qkv_a_scale)
            return qkv.split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], -1)
        return self.q_a_proj(x), self.kv_a_proj_with_mqa(x)

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum); writes the T new latent vectors into
        ``kv_cache`` first."""
        return self.o_proj(self.attend(*self.project(x, ctx, rope), ctx).flatten(1))

    def project(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's inputs of x [T, hidden]: q_nope [T, H, nope], rotated q_pe [T, H, rope] and the latent
        vectors [T, kv_lora_rank + rope], which it writes into ``kv_cache`` at ``ctx.slot_mapping`` (the only part
        of ``ctx`` it reads: no host work, so a CUDA graph can hold it)."""
        if self.kv_cache is None or self.w_uk is None:
            raise RuntimeError("MLA needs kv_cache assigned and absorb_weights() called before forward")
        cos, sin = rope
        if self.has_q_lora:
            q_a, kv_a = self.input_projections(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = q.view(-1, self.n_heads, self.nope_dim + self.rope_dim).split([self.nope_dim, self.rope_dim], -1)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], -1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)], dim=-1)
        if self.fp8_cache:  # quantized in the kernel that scatters it
            write_latent(self.kv_cache, latent, ctx.slot_mapping, self.kv_layout, self.kv_scale)
        else:
            self.kv_cache.view(-1, latent.shape[-1])[ctx.slot_mapping] = latent.to(self.kv_cache.dtype)
        return q_nope, apply_rope(q_pe, cos, sin), latent

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, ctx: ForwardContext,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``project``'s outputs for the step's T tokens over the cache -> [T, H, v_dim] (into ``out``
        where given)."""
        if ctx.prefill is None:
            o = self._absorbed(q_nope, q_pe, ctx)
            return o if out is None else out.copy_(o)
        T = q_nope.shape[0]
        D = T - ctx.prefill.num_tokens
        o = q_nope.new_empty(T, self.n_heads, self.v_dim) if out is None else out
        if D:
            o[:D] = self._absorbed(q_nope[:D], q_pe[:D], ctx, ctx.attn_metadata)
        if ctx.prefill.absorbed is not None:
            o[D:] = self._absorbed(q_nope[D:], q_pe[D:], ctx, ctx.prefill.absorbed)
        else:  # the chunks' own keys as the cache holds them
            own = self._read_cache(ctx.slot_mapping[D:], latent.dtype) if self.fp8_cache else latent[D:]
            o[D:] = self._prefill(q_nope[D:], q_pe[D:], own, ctx)
        return o

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: ForwardContext,
                  metadata: Any = None) -> torch.Tensor:
        """Attention in absorbed form over the latent cache, with ``metadata`` (the step's shared one by default):
        [T, H, v_dim]."""
        q_abs = torch.cat([torch.einsum("thn,hnc->thc", q_nope, self.w_uk), q_pe], dim=-1)
        metadata = ctx.attn_metadata if metadata is None else metadata
        o_lat = ctx.backend.forward(q_abs, self.kv_cache, metadata, self.softmax_scale, kv_scale=self.kv_scale)
        return torch.einsum("thc,hvc->thv", o_lat, self.w_uv)

    def _up_project(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent vectors [S, kv_lora_rank + rope] -> k_nope [S, H, nope], k_pe [S, rope], v [S, H, v_dim] (views)."""
        kv = self.kv_b_proj(latent[:, : self.kv_lora_rank]).view(-1, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], -1)
        return k_nope, latent[:, self.kv_lora_rank :], v

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                 ctx: ForwardContext) -> torch.Tensor:
        """Attention of the step's prompt chunks in non-absorbed form: causal over their own tokens, then over each
        slice of their cached context, merged by log-sum-exp. [P, H, v_dim]."""
        meta, backend, scale = ctx.prefill, ctx.backend, self.softmax_scale
        q = torch.cat([q_nope, q_pe], dim=-1)
        k_nope, k_pe, v = self._up_project(latent)
        o, lse = backend.prefill(q, k_nope, k_pe, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_q_len, scale,
                                 causal=True)
        for chunk in meta.context:
            k_nope, k_pe, v = self._up_project(self._read_cache(chunk.slots, q.dtype))
            o_c, lse_c = backend.prefill(q, k_nope, k_pe, v, meta.cu_seqlens_q, chunk.cu_seqlens_k, meta.max_q_len,
                                         scale, causal=False)
            # the Triton merge on a GPU; plain torch elsewhere (the interpreter would run it element by element)
            merge = merge_attention_states if o.is_cuda else merge_attention_states_reference
            o, lse = merge(o, lse, o_c, lse_c)
        return o

    def _read_cache(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The latent vectors of cache ``slots`` [S] as [S, kv_lora_rank + rope] of ``dtype``: dequantized from an
        FP8 layout (``gather_latent``), else as stored."""
        if self.fp8_cache:
            return gather_latent(self.kv_cache, slots, self.kv_layout, self.kv_scale, dtype)
        return self.kv_cache.view(-1, self.kv_cache.shape[-1])[slots].to(dtype)
