"""The log-sum-exp merge of two partial attentions of the same queries over disjoint key sets (Triton), and its
torch reference: how the prefill of a prompt chunk joins its attention over its own tokens with its attention over
each slice of its cached context (docs/mla_prefill.md#6-the-log-sum-exp-merge-and-chunked-context)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


@triton.jit
def _merge_kernel(
    OA, LA, OB, LB, O, L, H,
    stride_at, stride_ah, stride_bt, stride_bh, stride_ot, stride_oh,
    stride_lat, stride_lah, stride_lbt, stride_lbh, stride_lt, stride_lh,
    DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_DV)
    h_ok = hs < H
    ok = h_ok[:, None] & (offs_d < DV)[None, :]
    la = tl.load(LA + t * stride_lat + hs * stride_lah, mask=h_ok, other=float("-inf"))
    lb = tl.load(LB + t * stride_lbt + hs * stride_lbh, mask=h_ok, other=float("-inf"))
    mx = tl.maximum(la, lb)
    base = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp2((la - base) * 1.4426950408889634)
    wb = tl.exp2((lb - base) * 1.4426950408889634)
    w = wa + wb
    oa = tl.load(OA + t * stride_at + hs[:, None] * stride_ah + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(OB + t * stride_bt + hs[:, None] * stride_bh + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    # a side of weight 0 (lse -inf) adds nothing, whatever its output holds
    o = tl.where(wa[:, None] > 0.0, oa * wa[:, None], 0.0) + tl.where(wb[:, None] > 0.0, ob * wb[:, None], 0.0)
    o = o / tl.where(w > 0.0, w, 1.0)[:, None]
    tl.store(O + t * stride_ot + hs[:, None] * stride_oh + offs_d[None, :], o.to(O.dtype.element_ty), mask=ok)
    lse = tl.where(w > 0.0, base + tl.log(tl.where(w > 0.0, w, 1.0)), float("-inf"))
    tl.store(L + t * stride_lt + hs * stride_lh, lse, mask=h_ok)


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the same queries over the union of two disjoint key sets, from the two partial results:
    out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).

    out_* [T, H, Dv] (last dim contiguous), lse_* [T, H] float32 (natural log, -inf for no key; both -inf gives out
    0, lse -inf). ``out`` (out_a's dtype) and ``lse`` may be given, and may be out_a / lse_a (in place). One pass.
    """
    if out_a.dim() != 3 or out_b.shape != out_a.shape or out_a.dtype != out_b.dtype:
        raise ValueError(f"out_a and out_b must be [T, H, Dv] of one dtype, got {tuple(out_a.shape)} {out_a.dtype}, "
                         f"{tuple(out_b.shape)} {out_b.dtype}")
    T, H, Dv = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b), ("lse", lse)):
        if t is not None and (t.shape != (T, H) or t.dtype != torch.float32):
            raise ValueError(f"{name} must be [{T}, {H}] float32, got {tuple(t.shape)} {t.dtype}")
    if out is not None and (out.shape != out_a.shape or out.dtype != out_a.dtype):
        raise ValueError(f"out must be [{T}, {H}, {Dv}] {out_a.dtype}, got {tuple(out.shape)} {out.dtype}")
    tensors = [t for t in (out_a, lse_a, out_b, lse_b, out, lse) if t is not None]
    if any(t.device != out_a.device for t in tensors):
        raise ValueError(f"the merge's tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if not all(_last_dim_contiguous(t) for t in (out_a, out_b) + ((out,) if out is not None else ())):
        raise ValueError("out_a, out_b and out must be contiguous in the last dim (stride 1)")
    if out is None:
        out = torch.empty_like(out_a)
    if lse is None:
        lse = torch.empty(T, H, dtype=torch.float32, device=out_a.device)
    if T == 0 or H == 0:
        return out, lse
    block_dv = max(16, triton.next_power_of_2(Dv))
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_dv))
    _merge_kernel[(T, triton.cdiv(H, block_h))](
        out_a, lse_a, out_b, lse_b, out, lse, H,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
        lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1), lse.stride(0), lse.stride(1),
        DV=Dv, BLOCK_H=block_h, BLOCK_DV=block_dv, num_warps=8)
    return out, lse


def merge_attention_states_reference(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention_states`` in plain torch (fp32 math)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    out = (torch.where(wa > 0, out_a.float() * wa, 0.0) + torch.where(wb > 0, out_b.float() * wb, 0.0))
    return out.to(out_a.dtype), lse
