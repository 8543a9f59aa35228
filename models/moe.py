"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed experts and shared experts.

Parallel (models/parallel.py): the router is replicated and every rank routes every token (hidden states are
replicated after the attention all-reduce). Expert parallel: a rank holds E/world whole experts and computes
only the (token, expert) pairs routed to them (global ids mapped to its local ids, -1 for other ranks'
experts); tensor parallel: it holds a 1/world slice of every expert. Either way it returns a partial sum,
routed plus its slice of the shared expert, that the decoder layer joins with one all-reduce.

Routed experts on a GPU: the fused Triton MoE at every batch size (``MoE``'s doc); on the CPU: ``expert_loop``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mla_runner.models.config import ModelArgs
from mla_runner.models.fp8_linear import FP8Linear
from mla_runner.models.layers import MLP
from mla_runner.models.parallel import Parallel


class Gate(nn.Module):
    """Router (``noaux_tc``): picks ``num_experts_per_tok`` experts per token and their weights.

    Scores are fp32 sigmoids. ``e_score_correction_bias`` (a load-balancing term, fp32) only steers the
    selection: groups are ranked by the sum of their top-2 biased scores, the best ``topk_group`` groups are
    kept (others masked with -inf), then the top-k experts are taken. The weights are the unbiased scores of
    the chosen experts, normalized to sum 1 and times ``routed_scaling_factor``.
    Returning (weights, indices) lets tests observe the routing with a forward hook.

    On CUDA the steps after the GEMM run as one Triton kernel (``kernels.moe_routing.fused_routing``: same
    selection on untied scores, ties to the lower index, weights within float rounding; no host sync, so it
    runs inside CUDA graphs); ``fused = False`` (per instance or on the class) keeps the torch ops below.
    """

    fused = True  # CUDA inputs take the fused routing kernel

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = args.num_experts_per_tok, args.n_group, args.topk_group
        self.normalize, self.scale = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
        logits = x.float() @ self.weight.float().t()
        if logits.is_cuda and self.fused:
            from mla_runner.kernels.moe_routing import (
                fused_routing,  # imported on a GPU only: no Triton interpreter involved
            )

            return fused_routing(logits, self.e_score_correction_bias.float(), self.top_k, self.n_group,
                                 self.topk_group, self.normalize, self.scale)
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            grouped = biased.unflatten(-1, (self.n_group, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        indices = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices


class Experts(nn.Module):
    """The routed experts a rank holds, registered under their global ids (``experts.7.up_proj``, the
    checkpoint's names) and indexed, counted and iterated in local order, like a ``ModuleList``."""

    def __init__(self, ids: range, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        for e in ids:
            self.add_module(str(e), MLP(hidden_size, intermediate_size))

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> MLP:
        return list(self._modules.values())[i]


class MoE(nn.Module):
    """Router, this rank's routed experts and its slice of the shared experts.

    The routed experts run in one of two ways. On a GPU, once ``stack_experts`` has stacked their weights, every
    batch (a decode step or a prefill of any length) takes the fused Triton MoE (``kernels.fused_moe``): no host
    sync, so it runs inside CUDA graphs, and large batches go through it in bounded token chunks. Otherwise (CPU,
    where Triton would run under its interpreter, or unstacked weights) ``expert_loop``: one call per used expert.
    """

    def __init__(self, args: ModelArgs, par: Parallel = Parallel()) -> None:
        super().__init__()
        self.gate = Gate(args)
        owned = par.owned_experts(args.n_routed_experts)
        inter = args.moe_intermediate_size if par.moe == "ep" else par.part(args.moe_intermediate_size)
        self.experts = Experts(owned, args.hidden_size, inter)
        # Expert parallel at world > 1: global ids -> local ids [0, len(owned)), -1 for other ranks' experts.
        self.first_expert = owned.start if len(owned) < args.n_routed_experts else None
        self.shared_experts = MLP(args.hidden_size, par.part(args.moe_intermediate_size * args.n_shared_experts))
        # Stacked expert weights for the fused kernel, [E, 2 * inter, hidden] (gate rows, then up rows) and
        # [E, hidden, inter]; set by stack_experts() once the weights are loaded.
        self.w13: torch.Tensor | None = None
        self.w2: torch.Tensor | None = None
        # FP8 experts (FP8Linear): their 128x128 block scales, stacked the same way: [E, 2*ceil(inter/128),
        # ceil(hidden/128)] (gate's grid, then up's: partial edge blocks stay per matrix) and
        # [E, ceil(hidden/128), ceil(inter/128)]. None for bf16 experts.
        self.w13_scale: torch.Tensor | None = None
        self.w2_scale: torch.Tensor | None = None

    def stack_experts(self) -> None:
        """Stack the experts' weights once; each expert's own weights become views into the stacks, so the two
        layouts share memory. Experts are moved in one at a time: the peak is one stack more, not a copy of all."""
        first = self.experts[0].gate_proj.weight
        inter, hidden = first.shape
        E = len(self.experts)
        self.w13 = torch.empty(E, 2 * inter, hidden, dtype=first.dtype, device=first.device)
        for i, e in enumerate(self.experts):
            self.w13[i, :inter].copy_(e.gate_proj.weight)
            self.w13[i, inter:].copy_(e.up_proj.weight)
            e.gate_proj.weight = nn.Parameter(self.w13[i, :inter], requires_grad=False)
            e.up_proj.weight = nn.Parameter(self.w13[i, inter:], requires_grad=False)
        self.w2 = torch.empty(E, hidden, inter, dtype=first.dtype, device=first.device)
        for i, e in enumerate(self.experts):
            self.w2[i].copy_(e.down_proj.weight)
            e.down_proj.weight = nn.Parameter(self.w2[i], requires_grad=False)
        if isinstance(self.experts[0].gate_proj, FP8Linear):
            self._stack_scales()

    def _stack_scales(self) -> None:
        g = self.experts[0].gate_proj.weight_scale_inv
        rows = g.shape[0]
        self.w13_scale = torch.empty(len(self.experts), 2 * rows, g.shape[1], dtype=g.dtype, device=g.device)
        d = self.experts[0].down_proj.weight_scale_inv
        self.w2_scale = torch.empty(len(self.experts), *d.shape, dtype=d.dtype, device=d.device)
        for i, e in enumerate(self.experts):
            self.w13_scale[i, :rows].copy_(e.gate_proj.weight_scale_inv)
            self.w13_scale[i, rows:].copy_(e.up_proj.weight_scale_inv)
            self.w2_scale[i].copy_(e.down_proj.weight_scale_inv)
            e.gate_proj.weight_scale_inv = self.w13_scale[i, :rows]
            e.up_proj.weight_scale_inv = self.w13_scale[i, rows:]
            e.down_proj.weight_scale_inv = self.w2_scale[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]: this rank's partial sum (all of it at world size 1)."""
        weights, indices = self.gate(x)
        if self.first_expert is not None:
            local = indices - self.first_expert
            indices = local.masked_fill((local < 0) | (local >= len(self.experts)), -1)
        if x.is_cuda and self.w13 is not None:
            from mla_runner.kernels.fused_moe import fused_moe  # imported on a GPU only: no Triton interpreter involved

            routed = fused_moe(x, self.w13, self.w2, weights, indices, w13_scale=self.w13_scale,
                               w2_scale=self.w2_scale)
        else:
            routed = self.routed(x, weights, indices).to(x.dtype)
        return routed + self.shared_experts(x)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's chosen experts, in fp32 (``expert_loop`` over this rank's experts)."""
        experts = list(self.experts)
        return expert_loop(x, weights, indices, len(experts), lambda e, rows: experts[e](rows))


def expert_loop(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, num_experts: int,
                run_expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eager routed-expert sum: sum_j weights[t, j] * expert_{indices[t, j]}(x[t]) in fp32 [T, hidden].

    (token, expert) pairs are sorted by expert so each expert that received tokens runs once, as
    ``run_expert(e, x_rows)``, on a contiguous slice; results are scattered back with index_add. The host sync on
    the counts is the price of an eager per-expert loop: the CPU path (and models without stacked weights); on a
    GPU the fused MoE replaces it. Pairs with a negative id (another rank's expert) are dropped.
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    order = order[flat[order] >= 0]
    tokens, token_weights = order // indices.shape[1], weights.flatten()[order, None]
    counts = torch.bincount(flat[order], minlength=num_experts).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            out.index_add_(0, tokens[rows], run_expert(e, x[tokens[rows]]).float() * token_weights[rows])
            start += count
    return out
