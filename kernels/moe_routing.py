"""Fused MoE router (``noaux_tc``, DeepSeek-V3 / Kimi-K2): from router logits to (weights, expert ids) in one launch.

``models/moe.py`` ``Gate`` computes the fp32 router logits ``x.float() @ W.float().t()`` (cuBLAS), then, per token:

1. scores = sigmoid(logits) (fp32); biased = scores + e_score_correction_bias;
2. if topk_group < n_group: group score = sum of the top-2 biased scores of each of the n_group contiguous
   groups; the best topk_group groups are kept, the others' biased scores become -inf;
3. the top_k experts over the biased scores, best first;
4. weights = the unbiased scores of the chosen experts, divided by (their sum + 1e-20) if ``normalize``,
   times ``scale`` (routed_scaling_factor).

In torch that is ~15 small kernels after the GEMM; here it is one program per token: the token's E logits are
one [n_group, group_size] register tile (padded to powers of two); every selection is k (and topk_group)
rounds of one max over int64 keys that pack (score, lowest index first); the k weights are the chosen logits'
sigmoids, normalized in registers before one store.

Tie rule: among equal values the lowest index wins (expert id for step 3, group id for step 2), and the
output is sorted by biased score, best first (equal scores: lower id first). torch.topk leaves the order of
exact ties unspecified; on untied inputs the ids equal Gate's, in the same order. Ids are always k distinct
experts in [0, E); a NaN score ranks above +inf (as in torch.topk) or below -inf, depending on its sign bit.

``fused_routing`` never syncs with the host and allocates nothing when ``out_weights`` and ``out_ids`` are
given, so it can be captured in a CUDA graph (refill the logits in place, replay).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Below every real key: key(-inf) has high word -2139095041, so its key is about -9.187e18.
_NO_KEY = tl.constexpr(-9200000000000000000)


@triton.jit
def _key(value, idx, BIG: tl.constexpr):
    """Order-preserving int64 key of (fp32 value, lower idx first): max() of keys = max value, then lowest idx.
    High word: the value's bits made signed-sortable; low word: BIG - idx (> 0)."""
    bits = value.to(tl.int32, bitcast=True)
    sortable = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (sortable.to(tl.int64) << 32) + (BIG - idx).to(tl.int64)


@triton.jit
def _key_value(key):
    sortable = (key >> 32).to(tl.int32)
    return (sortable ^ ((sortable >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key, BIG: tl.constexpr):
    return BIG - (key - ((key >> 32) << 32)).to(tl.int32)


@triton.jit
def _routing_kernel(
    LOGITS, BIAS, W_OUT, ID_OUT, stride_lt, stride_wt, stride_it, scale,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, G_POW2: tl.constexpr, GS_POW2: tl.constexpr,
    TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """One token per program. Expert e = g * GROUP_SIZE + j sits at tile position [g, j]; every selection is a
    max over int64 keys (value, then lowest index: one reduction per pick, and keys are unique)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_POW2)
    j = tl.arange(0, GS_POW2)
    e = g[:, None] * GROUP_SIZE + j[None, :]  # [G_POW2, GS_POW2] expert ids
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)  # padded lanes alias the next group's ids
    row = LOGITS + t * stride_lt
    biased = tl.sigmoid(tl.load(row + e, mask=valid, other=0.0).to(tl.float32))
    if HAS_BIAS:
        biased += tl.load(BIAS + e, mask=valid, other=0.0)
    BIG: tl.constexpr = N_GROUP * GROUP_SIZE  # > every expert id

    if GROUPED:
        # Group score: top-1 + top-2 biased score of each row (a tied maximum counts twice, as in torch.topk).
        keys = tl.where(valid, _key(biased, e, BIG), _NO_KEY)
        k1 = tl.max(keys, axis=1)
        k2 = tl.max(tl.where(keys == k1[:, None], _NO_KEY, keys), axis=1)
        g_ok = g < N_GROUP
        group_scores = tl.where(g_ok, _key_value(k1), 0.0) + tl.where(g_ok, _key_value(k2), 0.0)
        group_keys = tl.where(g_ok, _key(group_scores, g, G_POW2), _NO_KEY)
        keep = g < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_keys, axis=0)
            keep = keep | (group_keys == best)
            group_keys = tl.where(group_keys == best, _NO_KEY, group_keys)
        biased = tl.where(keep[:, None], biased, float("-inf"))

    keys = tl.reshape(tl.where(valid, _key(biased, e, BIG), _NO_KEY), [G_POW2 * GS_POW2])  # order: irrelevant
    kk = tl.arange(0, K_POW2)
    out_id = tl.zeros([K_POW2], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(keys, axis=0)
        out_id = tl.where(kk == i, _key_index(best, BIG), out_id)
        keys = tl.where(keys == best, _NO_KEY, keys)
    # Weights: the unbiased scores of the chosen experts (the same sigmoid of the same logits, reloaded).
    k_ok = kk < TOP_K
    w = tl.sigmoid(tl.load(row + out_id, mask=k_ok, other=0.0).to(tl.float32))
    w = tl.where(k_ok, w, 0.0)
    if NORMALIZE:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    w = w * scale
    tl.store(W_OUT + t * stride_wt + kk, w, mask=k_ok)
    tl.store(ID_OUT + t * stride_it + kk, out_id.to(ID_OUT.dtype.element_ty), mask=k_ok)


def _check(logits, bias, top_k, n_group, topk_group, out_weights, out_ids) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be float32 [T, E], contiguous in the last dim; got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    T, E = logits.shape
    if bias is not None and (tuple(bias.shape) != (E,) or bias.dtype != torch.float32 or bias.stride(0) != 1
                             or bias.device != logits.device):
        raise ValueError(f"bias must be a contiguous float32 [{E}] on {logits.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"bad groups: E={E}, n_group={n_group}, topk_group={topk_group}")
    group_size = E // n_group
    if topk_group < n_group and group_size < 2:
        raise ValueError(f"group-limited routing needs >= 2 experts per group (top-2 group score), got {group_size}")
    kept = topk_group * group_size if topk_group < n_group else E
    if not 1 <= top_k <= kept:
        raise ValueError(f"top_k={top_k} must be in [1, {kept}] (experts in the kept groups)")
    for name, out, dtypes in (("out_weights", out_weights, (torch.float32,)),
                              ("out_ids", out_ids, (torch.int32, torch.int64))):
        if out is None:
            continue
        if tuple(out.shape) != (T, top_k) or out.dtype not in dtypes or out.stride(-1) != 1:
            raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} [{T}, {top_k}] contiguous in the "
                             f"last dim, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
        if out.device != logits.device:
            raise ValueError(f"{name} is on {out.device}, logits on {logits.device}")


def fused_routing(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                  topk_group: int = 1, normalize: bool = True, scale: float = 1.0,
                  out_weights: torch.Tensor | None = None, out_ids: torch.Tensor | None = None,
                  num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] fp32 -> (weights [T, top_k] fp32, expert ids [T, top_k]) as models/moe.py's Gate.

    ``bias``: e_score_correction_bias [E] fp32 (None: zeros). Groups: E = n_group contiguous groups; the best
    ``topk_group`` by their top-2 biased score sum are kept (no grouping when topk_group == n_group).
    ``out_weights`` (fp32) / ``out_ids`` (int32 or int64; default int64 like Gate) are written in place when
    given. Ties: lowest index first (module doc). No host sync; graph-capturable.
    """
    _check(logits, bias, top_k, n_group, topk_group, out_weights, out_ids)
    T, E = logits.shape
    if out_weights is None:
        out_weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if out_ids is None:
        out_ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return out_weights, out_ids
    group_size = E // n_group
    grouped = topk_group < n_group
    g_pow2 = triton.next_power_of_2(n_group) if grouped else 1
    gs_pow2 = triton.next_power_of_2(group_size if grouped else E)
    if num_warps is None:  # one warp up to 512 lanes: no cross-warp barrier in the k reduction rounds
        num_warps = max(1, min(4, g_pow2 * gs_pow2 // 512))
    _routing_kernel[(T,)](
        logits, bias if bias is not None else logits, out_weights, out_ids,
        logits.stride(0), out_weights.stride(0), out_ids.stride(0), float(scale),
        N_GROUP=n_group if grouped else 1, GROUP_SIZE=group_size if grouped else E, G_POW2=g_pow2,
        GS_POW2=gs_pow2, TOPK_GROUP=topk_group, TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k),
        GROUPED=grouped, HAS_BIAS=bias is not None, NORMALIZE=bool(normalize), num_warps=num_warps,
    )
    return out_weights, out_ids


def routing_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                      topk_group: int = 1, normalize: bool = True, scale: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the same ops as models/moe.py Gate.forward after the GEMM (ids int64)."""
    scores = logits.float().sigmoid()
    biased = scores + bias if bias is not None else scores
    if topk_group < n_group:
        grouped = biased.unflatten(-1, (n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
    indices = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, indices
