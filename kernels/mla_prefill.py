"""Variable-length causal prefill attention for MLA in its non-absorbed (MHA) form (Triton), its checking wrapper,
and the torch reference (the log-sum-exp merge of two partial results: ``kernels.attention_merge``).

Notation (DeepSeek-V3 widths in brackets): T query tokens, S key tokens, H heads; per head the query is
``[q_nope (Dn = 128) | q_pe (Dr = 64)]``, the key ``[k_nope (Dn) | k_pe (Dr)]`` with ``k_pe`` one vector per token
shared by all heads, the value ``v (Dv = 128)``. Request b owns query rows ``cu_q[b]:cu_q[b+1]`` and key rows
``cu_k[b]:cu_k[b+1]``; with ``causal`` its query i (of q_len) sees keys ``j <= k_len - q_len + i`` (bottom-right
alignment: new tokens after cached context), else all k_len keys.

```
s[i, j]  = sm_scale * (q_nope[i] . k_nope[j] + q_pe[i] . k_pe[j])          two dots into one fp32 tile
out[i]   = sum_j softmax_j(s[i, :])  v[j]                                  online softmax, base 2
lse[i]   = log sum_j exp(s[i, j])                                          natural log; -inf with no key
```

Program (m, h, b) takes the m-th block of BLOCK_M queries of request b, head h, counted from the request's END:
block 0 holds its last queries, the ones that see the most keys under ``causal``, so the heaviest blocks are
launched first, and a request shorter than ``max_q_len`` leaves idle only the last programs of each of its heads.
The blocks of one (head, request) are next to each other in the grid, so their CTAs read the same keys and values
through L2. Key blocks that every row of the query block sees whole run without a mask; the blocks that straddle
the causal diagonal (or the end of the keys) run masked; blocks above the diagonal are never visited. Design:
docs/mla_prefill.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_GRID_YZ = 65535  # heads and requests are the grid's second and third axes


@triton.jit
def _attend(acc, m_i, l_i, q_n, q_r, KN_H, KR, V_H, k_start, n0, k_end, pos, scale_log2,
            stride_knt, stride_krt, stride_vt,
            DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
            CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One block of BLOCK_N keys starting at key n0 of the request: scores, online softmax, value accumulation.

    MASKED=False: every row of the query block sees every key of the block (no key bound, no diagonal): no mask
    on the loads or the scores, and no feature mask either where the head dims are powers of two."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = (k_start + n0).to(tl.int64)  # S * H * (Dn + Dv) elements may pass 2^31
    kn_ptr = KN_H + row * stride_knt + offs_n[:, None] * stride_knt + offs_dn[None, :]
    kr_ptr = KR + row * stride_krt + offs_n[:, None] * stride_krt + offs_dr[None, :]
    v_ptr = V_H + row * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :]
    if MASKED:
        kv_ok = (n0 + offs_n) < k_end
        k_n = tl.load(kn_ptr, mask=kv_ok[:, None] & (offs_dn < DN)[None, :], other=0.0)
        v = tl.load(v_ptr, mask=kv_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        if DR > 0:
            k_r = tl.load(kr_ptr, mask=kv_ok[:, None] & (offs_dr < DR)[None, :], other=0.0)
    else:
        if BLOCK_DN == DN:
            k_n = tl.load(kn_ptr)
        else:
            k_n = tl.load(kn_ptr, mask=(offs_dn < DN)[None, :], other=0.0)
        if BLOCK_DV == DV:
            v = tl.load(v_ptr)
        else:
            v = tl.load(v_ptr, mask=(offs_dv < DV)[None, :], other=0.0)
        if DR > 0:
            if BLOCK_DR == DR:
                k_r = tl.load(kr_ptr)
            else:
                k_r = tl.load(kr_ptr, mask=(offs_dr < DR)[None, :], other=0.0)
    if UPCAST:  # Triton 3.9's interpreter computes bf16 dots wrongly: do them in fp32 there
        k_n = k_n.to(tl.float32)
        v = v.to(tl.float32)
        if DR > 0:
            k_r = k_r.to(tl.float32)
    qk = tl.dot(q_n, tl.trans(k_n), input_precision=DOT_PREC)
    if DR > 0:
        qk = tl.dot(q_r, tl.trans(k_r), acc=qk, input_precision=DOT_PREC)
    if MASKED:
        if CAUSAL:
            ok = (n0 + offs_n)[None, :] <= pos[:, None]  # (pos < k_end: the key bound is implied)
        else:
            ok = ((n0 + offs_n) < k_end)[None, :]
        qk = tl.where(ok, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        qk = qk * scale_log2 - m_new[:, None]
    p = tl.exp2(qk)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:  # round p as the GPU does before its P V dot, then compute in fp32
        p = p.to(KN_H.dtype.element_ty).to(tl.float32)
    else:
        p = p.to(v.dtype)
    acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _mla_prefill_kernel(
    Q, KN, KR, V, O, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_knt, stride_knh, stride_krt, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    scale_log2,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    m_blk = tl.program_id(0)  # counted from the request's last query: the heaviest blocks come first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    q_hi = q_len - m_blk * BLOCK_M  # this block holds queries [q_hi - BLOCK_M, q_hi) of the request
    if q_hi > 0:
        offs_m = q_hi - BLOCK_M + tl.arange(0, BLOCK_M)  # query index in the request; < 0 outside it
        row_ok = offs_m >= 0
        offs_dn = tl.arange(0, BLOCK_DN)
        offs_dr = tl.arange(0, BLOCK_DR)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ptr = Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + h * stride_qh
        q_n = tl.load(q_ptr + offs_dn[None, :], mask=row_ok[:, None] & (offs_dn < DN)[None, :], other=0.0)
        if DR > 0:
            q_r = tl.load(q_ptr + DN + offs_dr[None, :], mask=row_ok[:, None] & (offs_dr < DR)[None, :], other=0.0)
        else:
            q_r = q_n  # (unused)
        if UPCAST:
            q_n = q_n.to(tl.float32)
            q_r = q_r.to(tl.float32)

        pos = k_len - q_len + offs_m  # the last key each row sees (causal)
        if CAUSAL:
            first = tl.maximum(q_hi - BLOCK_M, 0)  # the block's first query in the request
            k_full = tl.minimum(tl.maximum(k_len - q_len + first + 1, 0), k_len)  # keys every row sees
            k_end = tl.maximum(k_len - q_len + q_hi, 0)  # keys some row sees
        else:
            k_full = k_len
            k_end = k_len
        n_full = k_full // BLOCK_N

        KN_H = KN + h * stride_knh
        V_H = V + h * stride_vh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row with no key yet gives p = 0, not NaN
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for i in range(0, n_full):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q_n, q_r, KN_H, KR, V_H, k_start, i * BLOCK_N, k_end, pos,
                                    scale_log2, stride_knt, stride_krt, stride_vt, DN, DR, DV, BLOCK_N, BLOCK_DN,
                                    BLOCK_DR, BLOCK_DV, CAUSAL, False, UPCAST, DOT_PREC)
        for n0 in range(n_full * BLOCK_N, k_end, BLOCK_N):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q_n, q_r, KN_H, KR, V_H, k_start, n0, k_end, pos,
                                    scale_log2, stride_knt, stride_krt, stride_vt, DN, DR, DV, BLOCK_N, BLOCK_DN,
                                    BLOCK_DR, BLOCK_DV, CAUSAL, True, UPCAST, DOT_PREC)

        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptr = O + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_dv[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
        lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln
        tl.store(LSE + (q_start + offs_m).to(tl.int64) * stride_lt + h * stride_lh, lse, mask=row_ok)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # queries per program
    block_n: int  # keys per step of the inner loop
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"PrefillConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"PrefillConfig.num_stages must be >= 1, got {self.num_stages}")


# The bf16 / fp16 rows are FlashAttention-2's usual Hopper tiles for a 192-wide key (compiled for sm90: 240 registers,
# no spills, 168 KB of shared memory at 128 x 64 with 3 stages); `python benchmarks/bench_mla_prefill.py --sweep`
# measures the alternatives (docs/mla_prefill.md#4-tiles-and-launch-configuration).
def default_config(max_q_len: int, elem_size: int, on_gpu: bool = True) -> PrefillConfig:
    """Tiles for a call whose longest request has ``max_q_len`` queries. The interpreter's cost is per program and
    per operation, hardly per element, so it gets the largest tiles (a 250-token prompt at 8 heads: 0.19 s a call at
    256 x 256 against 1.16 s at 64 x 64); the kernel tests pass small tiles of their own."""
    if not on_gpu:
        return PrefillConfig(block_m=min(256, max(16, triton.next_power_of_2(max(max_q_len, 1)))), block_n=256,
                             num_warps=4, num_stages=1)
    if elem_size >= 4:  # fp32 (ieee dots on CUDA cores: every tile spills on sm90; untimed, docs section 4)
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if max_q_len <= 64:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _check(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, max_q_len, out, lse) -> None:
    if q.dim() != 3 or k_nope.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k_nope, v must be [T, H, D], [S, H, Dn], [S, H, Dv], got shapes {tuple(q.shape)}, "
                         f"{tuple(k_nope.shape)}, {tuple(v.shape)}")
    if k_pe.dim() != 2:
        raise ValueError(f"k_pe must be [S, Dr] (one rope key per token, shared by the heads), got {tuple(k_pe.shape)}")
    T, H, D = q.shape
    S, _, Dn = k_nope.shape
    if k_nope.shape[1] != H or v.shape[:2] != (S, H) or k_pe.shape[0] != S:
        raise ValueError(f"k_nope {tuple(k_nope.shape)}, v {tuple(v.shape)} and k_pe {tuple(k_pe.shape)} must have "
                         f"the same S and q's H = {H}")
    if Dn + k_pe.shape[1] != D or Dn < 1 or v.shape[2] < 1:
        raise ValueError(f"q's last dim {D} must be k_nope's {Dn} + k_pe's {k_pe.shape[1]} (with Dn, Dv >= 1)")
    if not (q.dtype == k_nope.dtype == k_pe.dtype == v.dtype):
        raise ValueError(f"q, k_nope, k_pe, v must have one dtype, got {q.dtype}, {k_nope.dtype}, {k_pe.dtype}, "
                         f"{v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}: use bfloat16, float16 or float32")
    tensors = (q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k)
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"q, k_nope, k_pe, v and the cu_seqlens must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    if not all(_last_dim_contiguous(t) for t in (q, k_nope, k_pe, v)):
        raise ValueError("q, k_nope, k_pe and v must be contiguous in the last dim (stride 1)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor [B + 1], got {tuple(cu.shape)} {cu.dtype}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries, cu_seqlens_k {cu_seqlens_k.numel()}")
    if cu_seqlens_q.numel() - 1 > MAX_GRID_YZ or H > MAX_GRID_YZ:
        raise ValueError(f"at most {MAX_GRID_YZ} requests and heads a call (the grid's axes)")
    if not isinstance(max_q_len, int) or max_q_len < 0:
        raise ValueError(f"max_q_len must be a host int >= 0, got {max_q_len!r}")
    if out is not None and (out.shape != (T, H, v.shape[2]) or out.dtype != q.dtype or out.device != q.device
                            or not _last_dim_contiguous(out)):
        raise ValueError(f"out must be [{T}, {H}, {v.shape[2]}] {q.dtype} on {q.device}, last dim contiguous, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if lse is not None and (lse.shape != (T, H) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"lse must be [{T}, {H}] float32 on {q.device}, got {tuple(lse.shape)} {lse.dtype} on "
                         f"{lse.device}")


def mla_prefill_attention(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q_len: int,
    sm_scale: float,
    causal: bool = True,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention in MHA form over ragged requests -> (out [T, H, Dv] in q's dtype, lse [T, H] float32).

    q [T, H, Dn + Dr], k_nope [S, H, Dn], k_pe [S, Dr] (shared by the heads), v [S, H, Dv]: any strides with the
    last dim contiguous (k_nope and v are usually views of one [S, H, Dn + Dv] tensor; nothing is copied).
    ``cu_seqlens_q`` / ``cu_seqlens_k`` [B + 1] int32 on q's device; ``max_q_len`` (host int) >= every request's
    q_len (a request with more queries loses its first ones). ``causal``: bottom-right aligned (query i of a request
    sees keys j <= k_len - q_len + i). ``lse`` is the natural log-sum-exp of the scaled scores; a query with no key
    gets out 0, lse -inf. Rows outside every request are not written. No host synchronization.
    """
    _check(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, max_q_len, out, lse)
    T, H, D = q.shape
    Dn, Dr, Dv = k_nope.shape[2], k_pe.shape[1], v.shape[2]
    if out is None:
        out = torch.empty(T, H, Dv, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    B = cu_seqlens_q.numel() - 1
    if T == 0 or B == 0 or max_q_len == 0:
        return out, lse
    cfg = config or default_config(max_q_len, q.element_size(), q.is_cuda)
    grid = (triton.cdiv(max_q_len, cfg.block_m), H, B)
    kr = k_pe if Dr > 0 else k_nope  # (never read: an empty tensor may have no valid address to pass)
    _mla_prefill_kernel[grid](
        q, k_nope, kr, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k_nope.stride(0), k_nope.stride(1), kr.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        sm_scale * LOG2E,
        DN=Dn, DR=Dr, DV=Dv, BLOCK_DN=_pad(Dn), BLOCK_DR=_pad(Dr), BLOCK_DV=_pad(Dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        UPCAST=not q.is_cuda, DOT_PREC="ieee" if (q.dtype == torch.float32 or not q.is_cuda) else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _pad(d: int) -> int:
    """A head dim's tile width: the next power of two, at least 16 (a dot's smallest operand)."""
    return max(16, triton.next_power_of_2(max(d, 1)))


# ---------------------------------------------------------------------------------------------------------------
# torch references

MAX_SCORES = 1 << 28  # fp32 score elements per chunk of queries in the reference (1 GiB)


def mla_prefill_reference(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q_len: int,
    sm_scale: float,
    causal: bool = True,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mla_prefill_attention`` in plain torch (fp32 math). Where the scores of padded batches (every request's
    queries and keys padded to the longest) fit in ``MAX_SCORES`` and are at most 8 times the scores needed, all
    requests at once (a step of many short prompts is a few ops, not a few per request); else one request at a time,
    queries in chunks of at most ``MAX_SCORES`` scores.
    Rows outside every request: out 0, lse -inf when allocated here, else left as they are."""
    T, H, _ = q.shape
    Dn, Dv = k_nope.shape[2], v.shape[2]
    if out is None:
        out = q.new_zeros(T, H, Dv)
    if lse is None:
        lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    q_lens, k_lens = [b - a for a, b in zip(cu_q, cu_q[1:])], [b - a for a, b in zip(cu_k, cu_k[1:])]
    if not q_lens:
        return out, lse
    padded_scores = len(q_lens) * H * max(q_lens) * max(k_lens)
    scores = H * sum(n * L for n, L in zip(q_lens, k_lens))
    if len(q_lens) > 1 and scores > 0 and padded_scores <= min(MAX_SCORES, 8 * scores):
        _all_requests_at_once(q, k_nope, k_pe, v, cu_q, cu_k, max_q_len, sm_scale, causal, out, lse)
        return out, lse
    for b in range(len(cu_q) - 1):
        qs, n = cu_q[b], cu_q[b + 1] - cu_q[b]
        ks, L = cu_k[b], cu_k[b + 1] - cu_k[b]
        if n > max_q_len:
            raise ValueError(f"request {b} has {n} queries, over max_q_len {max_q_len}")
        if n <= 0:
            continue
        if L <= 0:
            out[qs:qs + n] = 0
            lse[qs:qs + n] = float("-inf")
            continue
        kn, kr, vv = k_nope[ks:ks + L].float(), k_pe[ks:ks + L].float(), v[ks:ks + L].float()
        chunk = max(1, MAX_SCORES // (H * L))
        for c in range(0, n, chunk):
            rows = slice(qs + c, qs + min(c + chunk, n))
            qq = q[rows].float()
            s = torch.einsum("qhd,khd->qhk", qq[..., :Dn], kn) + torch.einsum("qhd,kd->qhk", qq[..., Dn:], kr)
            s = s * sm_scale
            if causal:
                last = L - n + torch.arange(c, c + qq.shape[0], device=q.device)  # the last key each query sees
                s.masked_fill_((torch.arange(L, device=q.device)[None, :] > last[:, None])[:, None, :], float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)  # [rows, H]
            p = torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, 0.0)[..., None])
            out[rows] = torch.einsum("qhk,khd->qhd", p, vv).to(out.dtype)
            lse[rows] = row_lse
    return out, lse


def _all_requests_at_once(q, k_nope, k_pe, v, cu_q, cu_k, max_q_len, sm_scale, causal, out, lse) -> None:
    """The reference over every request in one set of ops: queries and keys gathered into [B, longest, ...] padded
    batches, the padding (and keys past a query's causal bound) masked."""
    device, Dn = q.device, k_nope.shape[2]
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if max(q_lens) > max_q_len:
        b = q_lens.index(max(q_lens))
        raise ValueError(f"request {b} has {q_lens[b]} queries, over max_q_len {max_q_len}")

    def padded(starts: list[int], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [B, longest] of each request (0 in the padding), which are real, and the lengths."""
        n = torch.tensor(lens, device=device)
        pos = torch.arange(max(lens), device=device)[None, :]
        real = pos < n[:, None]
        return torch.where(real, torch.tensor(starts, device=device)[:, None] + pos, 0), real, n

    qi, q_real, ql = padded(cu_q[:-1], q_lens)
    ki, k_real, kl = padded(cu_k[:-1], k_lens)
    qq = q[qi].float()  # [B, mq, H, D]
    s = (torch.einsum("bqhd,bkhd->bhqk", qq[..., :Dn], k_nope[ki].float())
         + torch.einsum("bqhd,bkd->bhqk", qq[..., Dn:], k_pe[ki].float())) * sm_scale
    ok = k_real[:, None, :]  # [B, 1 (queries), mk]
    if causal:  # query i of a request sees its keys up to k_len - q_len + i
        i = torch.arange(qi.shape[1], device=device)
        key = torch.arange(ki.shape[1], device=device)
        ok = ok & (key[None, None, :] <= (kl - ql)[:, None, None] + i[None, :, None])
    s.masked_fill_(~ok[:, None], float("-inf"))
    row_lse = torch.logsumexp(s, dim=-1)  # [B, H, mq]
    p = torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, 0.0)[..., None])
    o = torch.einsum("bhqk,bkhd->bqhd", p, v[ki].float())
    rows = qi[q_real]
    out[rows] = o[q_real].to(out.dtype)
    lse[rows] = row_lse.transpose(1, 2)[q_real]
