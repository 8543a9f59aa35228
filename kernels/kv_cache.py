"""The latent KV cache's layouts (model dtype, FP8 per tensor, DeepSeek's fp8_ds_mla), its write and its gather.

A token's latent vector has D = kv_lora_rank + rope_dim values (512 + 64 for DeepSeek-V3 / Kimi-K2). Per token:

| layout       | storage           | bytes (512 + 64)      | value                                                  |
|--------------|-------------------|-----------------------|--------------------------------------------------------|
| ``auto``     | model dtype [D]   | 1152 (bf16)           | as written                                             |
| ``fp8``      | e4m3 [D]          | 576                   | e4m3 * scale (one fp32 scale for the whole cache)      |
| ``fp8_ds_mla`` | uint8 [W]       | 656                   | latent e4m3 * its group's scale, rope bf16             |

``fp8_ds_mla`` bytes of a token: [0, R) the R = kv_lora_rank latent values in e4m3; [R, R + 4 G) G = ceil(R / 128)
fp32 scales, one per 128 latent values, each the smallest power of two s with amax <= 448 s (amax of the group,
floored at 1e-4), so nothing clips and the scaling is exact; then the rope values in bf16. The per-tensor ``fp8``
scale is a [1] fp32 tensor the caller owns (a device value: changing it needs no recapture); values beyond
448 * scale saturate to +-448.

``write_latent`` quantizes inside the kernel that scatters the step's latents into their slots (no separate
pass, no allocation, no host sync: graph-capturable); a negative slot is skipped. ``gather_latent`` dequantizes
the tokens of given slots (the prefill path's context). Both round in integer arithmetic (ties to even) before
casting, so the stored bytes are the same on the GPU and under Triton's interpreter (whose casts truncate) and
equal ``quantize_reference``'s, torch's casts. The decode kernel (``kernels.mla_decode``) reads FP8 caches
directly. Design: docs/kv_cache_fp8.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_runner.kernels.fp8_block import FP8_MAX

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_ds_mla")
FMT_CODE = {"auto": 0, "fp8": 1, "fp8_ds_mla": 2}  # the kernels' KV_FMT
GROUP = 128  # fp8_ds_mla: latent values per scale
AMAX_FLOOR = 1e-4  # fp8_ds_mla: a group's amax is floored at this (all-zero groups get a finite scale, 2^-22)


@dataclass(frozen=True)
class KVCacheLayout:
    """How one layer's paged latent cache [pages, page_size, width] stores a token."""

    kind: str = "auto"  # one of KV_CACHE_DTYPES
    kv_lora_rank: int = 512
    rope_dim: int = 64
    model_dtype: torch.dtype = torch.bfloat16  # the ``auto`` storage

    def __post_init__(self):
        if self.kind not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kind!r}")
        if self.kv_lora_rank < 1 or self.rope_dim < 0:
            raise ValueError(f"kv_lora_rank must be >= 1 and rope_dim >= 0, got {self.kv_lora_rank}, {self.rope_dim}")
        if self.kind == "fp8_ds_mla" and (self.kv_lora_rank % 4 or self.rope_dim % 2):
            raise ValueError(f"fp8_ds_mla keeps its fp32 scales aligned: kv_lora_rank must be a multiple of 4 and "
                             f"rope_dim even, got {self.kv_lora_rank} and {self.rope_dim}")
        if self.kind == "auto" and not self.model_dtype.is_floating_point:
            raise ValueError(f"the auto layout stores the model dtype, a float dtype; got {self.model_dtype}")

    @property
    def dim(self) -> int:
        """Values of a token's latent vector (what the model writes and the kernels attend over)."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def num_groups(self) -> int:
        """fp8_ds_mla's scales a token (0 for the other layouts)."""
        return -(-self.kv_lora_rank // GROUP) if self.kind == "fp8_ds_mla" else 0

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"auto": self.model_dtype, "fp8": torch.float8_e4m3fn, "fp8_ds_mla": torch.uint8}[self.kind]

    @property
    def width(self) -> int:
        """The cache's last dim (elements of ``storage_dtype`` a token)."""
        if self.kind == "fp8_ds_mla":
            return self.kv_lora_rank + 4 * self.num_groups + 2 * self.rope_dim
        return self.dim

    @property
    def bytes_per_token(self) -> int:
        return self.width * self.storage_dtype.itemsize

    @property
    def is_fp8(self) -> bool:
        return self.kind != "auto"

    @property
    def code(self) -> int:
        return FMT_CODE[self.kind]

    def allocate(self, num_pages: int, page_size: int, device) -> torch.Tensor:
        """A zeroed cache [num_pages, page_size, width] of ``storage_dtype``."""
        return torch.zeros(num_pages, page_size, self.width, dtype=self.storage_dtype, device=device)

    def check_cache(self, cache: torch.Tensor, name: str = "kv_cache") -> None:
        if cache.dim() != 3 or cache.shape[-1] != self.width or cache.dtype != self.storage_dtype:
            raise ValueError(f"{name} must be [pages, page_size, {self.width}] {self.storage_dtype} for the "
                             f"{self.kind} layout ({self.kv_lora_rank} + {self.rope_dim}), got "
                             f"{tuple(cache.shape)} {cache.dtype}")

    def check_scale(self, scale: torch.Tensor | None, device: torch.device) -> None:
        if self.kind != "fp8":
            if scale is not None:
                raise ValueError(f"a scale tensor is only for the fp8 layout (per tensor); {self.kind} takes none")
            return
        if scale is None:
            raise ValueError("the fp8 layout needs its per-tensor scale: a [1] float32 tensor on the cache's device")
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != device:
            raise ValueError(f"the fp8 scale must be a [1] float32 tensor on {device}, got {tuple(scale.shape)} "
                             f"{scale.dtype} on {scale.device}")


def layout_of(kv_cache: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> KVCacheLayout:
    """The layout a cache tensor holds, read from its dtype: float8_e4m3fn is ``fp8``, uint8 ``fp8_ds_mla``, a float
    dtype ``auto``."""
    kind = {torch.float8_e4m3fn: "fp8", torch.uint8: "fp8_ds_mla"}.get(kv_cache.dtype, "auto")
    model_dtype = kv_cache.dtype if kind == "auto" else torch.bfloat16
    if kind == "auto" and not kv_cache.dtype.is_floating_point:
        raise ValueError(f"a latent cache is float (auto), float8_e4m3fn (fp8) or uint8 (fp8_ds_mla), got "
                         f"{kv_cache.dtype}")
    return KVCacheLayout(kind, kv_lora_rank, rope_dim, model_dtype)


def per_tensor_scale(amax: float = FP8_MAX, device="cpu") -> torch.Tensor:
    """The fp8 layout's scale for values up to ``amax`` (amax / 448; the default 448 gives 1.0), [1] float32."""
    if not amax > 0:
        raise ValueError(f"amax must be > 0, got {amax}")
    return torch.tensor([amax / FP8_MAX], dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32: a cast after it is exact everywhere."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value (ties to even, sign kept), still fp32.

    Normal range (|x| >= 2^-6): 3 mantissa bits kept, the carry may move the exponent. Below: e4m3's subnormals are
    the multiples of 2^-9, and adding 1.5 * 2^14 puts |x| in a binade whose fp32 spacing is 2^-9."""
    u = x.to(tl.uint32, bitcast=True)
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    a = tl.abs(x)
    sub = (a + 24576.0) - 24576.0
    sub = (sub.to(tl.uint32, bitcast=True) | (u & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def pow2_scale_exponent(amax):
    """Biased fp32 exponent of the smallest power of two s with amax <= 448 s (amax >= AMAX_FLOOR, finite): amax =
    m 2^E with m in [1, 2) and 448 = 1.75 * 2^8, so s = 2^(E - 8), doubled when m > 1.75."""
    u = amax.to(tl.uint32, bitcast=True)
    return (u >> 23).to(tl.int32) - 8 + ((u & 0x7FFFFF) > 0x600000).to(tl.int32)


@triton.jit
def _write_latent_kernel(X, SLOTS, C, C_SC, C_PE, SCALE, T, stride_x,
                         W: tl.constexpr, DV: tl.constexpr, DPE: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr,
                         NGP: tl.constexpr, BLOCK_DPE: tl.constexpr, FMT: tl.constexpr, BLOCK_T: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
    """BLOCK_T tokens: latent columns as [NGP, GW] (fp8_ds_mla's scale groups when DV >= 128), rope [BLOCK_DPE]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    slot = tl.load(SLOTS + rows, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (slot >= 0)
    g = tl.arange(0, NGP)
    col = g[:, None] * GW + tl.arange(0, GW)[None, :]
    m = ok[:, None, None] & (col < DV)[None, :, :]
    d = tl.arange(0, BLOCK_DPE)
    mp = ok[:, None] & (d < DPE)[None, :]
    x_row = X + rows.to(tl.int64) * stride_x
    x = tl.load(x_row[:, None, None] + col[None, :, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(x_row[:, None] + DV + d[None, :], mask=mp, other=0.0).to(tl.float32)
    dst = C + slot * W
    if FMT == 0:
        if ROUND_BF16:
            x = round_to_bf16(x)
            xp = round_to_bf16(xp)
        tl.store(dst[:, None, None] + col[None, :, :], x.to(C.dtype.element_ty), mask=m)
        tl.store(dst[:, None] + DV + d[None, :], xp.to(C.dtype.element_ty), mask=mp)
    elif FMT == 1:
        s = tl.load(SCALE)
        y = round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0))
        yp = round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(xp, s), -448.0), 448.0))
        tl.store(dst[:, None, None] + col[None, :, :], y.to(tl.float8e4nv), mask=m)
        tl.store(dst[:, None] + DV + d[None, :], yp.to(tl.float8e4nv), mask=mp)
    else:
        amax = tl.maximum(tl.max(tl.abs(x), 2), 1e-4)  # [BLOCK_T, NGP]; 1e-4 = AMAX_FLOOR
        e = pow2_scale_exponent(amax)
        scale = (e << 23).to(tl.float32, bitcast=True)
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exactly
        y = round_to_e4m3(x * inv[:, :, None])
        tl.store(dst[:, None, None] + col[None, :, :], y.to(tl.float8e4nv), mask=m)
        tl.store(C_SC + slot[:, None] * (W // 4) + DV // 4 + g[None, :], scale,
                 mask=ok[:, None] & (g < NG)[None, :])
        tl.store(C_PE + slot[:, None] * (W // 2) + (DV + 4 * NG) // 2 + d[None, :],
                 round_to_bf16(xp).to(tl.bfloat16), mask=mp)


@triton.jit
def _gather_latent_kernel(C, C_SC, C_PE, SCALE, SLOTS, O, N, stride_o,
                          W: tl.constexpr, DV: tl.constexpr, DPE: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr,
                          NGP: tl.constexpr, BLOCK_DPE: tl.constexpr, FMT: tl.constexpr, BLOCK_T: tl.constexpr,
                          ROUND_BF16: tl.constexpr):
    """BLOCK_T output rows: the tokens of their slots, dequantized (zeros for a negative slot)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    slot = tl.load(SLOTS + rows, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (slot >= 0)
    g = tl.arange(0, NGP)
    col = g[:, None] * GW + tl.arange(0, GW)[None, :]
    col_ok = (col < DV)[None, :, :]
    d = tl.arange(0, BLOCK_DPE)
    d_ok = (d < DPE)[None, :]
    src = C + slot * W
    v = tl.load(src[:, None, None] + col[None, :, :], mask=ok[:, None, None] & col_ok, other=0.0).to(tl.float32)
    if FMT == 2:
        vp = tl.load(C_PE + slot[:, None] * (W // 2) + (DV + 4 * NG) // 2 + d[None, :], mask=ok[:, None] & d_ok,
                     other=0.0).to(tl.float32)
        sc = tl.load(C_SC + slot[:, None] * (W // 4) + DV // 4 + g[None, :], mask=ok[:, None] & (g < NG)[None, :],
                     other=0.0)
        v = v * sc[:, :, None]
    else:
        vp = tl.load(src[:, None] + DV + d[None, :], mask=ok[:, None] & d_ok, other=0.0).to(tl.float32)
    if FMT == 1:
        s = tl.load(SCALE)
        v = v * s
        vp = vp * s
    if ROUND_BF16:
        v = round_to_bf16(v)
        vp = round_to_bf16(vp)
    o_row = O + rows.to(tl.int64) * stride_o
    tl.store(o_row[:, None, None] + col[None, :, :], v.to(O.dtype.element_ty), mask=row_ok[:, None, None] & col_ok)
    tl.store(o_row[:, None] + DV + d[None, :], vp.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)


# ---------------------------------------------------------------------------------------------------------
# Wrappers


def _views(cache: torch.Tensor, layout: KVCacheLayout):
    """(values, scales, rope) views of a contiguous cache as the kernels index them: for fp8_ds_mla the bytes as e4m3,
    fp32 and bf16 (token t's scales at t * W / 4 + R / 4, its rope at t * W / 2 + (R + 4 G) / 2)."""
    if layout.kind == "fp8_ds_mla":
        flat = cache.view(-1, layout.width)
        return flat.view(torch.float8_e4m3fn), flat.view(torch.float32), flat.view(torch.bfloat16)
    return cache, cache, cache


def _tiles(layout: KVCacheLayout) -> dict:
    dv = layout.kv_lora_rank
    gw = min(GROUP, triton.next_power_of_2(dv))
    block_dpe = max(2, triton.next_power_of_2(max(layout.rope_dim, 1)))
    return dict(W=layout.width, DV=dv, DPE=layout.rope_dim, NG=layout.num_groups, GW=gw,
                NGP=triton.next_power_of_2(-(-dv // gw)), BLOCK_DPE=block_dpe, FMT=layout.code)


def _check_slots(slots: torch.Tensor, n: int, device: torch.device, name: str) -> None:
    if slots.dim() != 1 or slots.shape[0] != n:
        raise ValueError(f"{name} must be [{n}], got {tuple(slots.shape)}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {slots.dtype}")
    if slots.device != device:
        raise ValueError(f"{name} must be on the cache's device {device}, got {slots.device}")


def write_latent(cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor, layout: KVCacheLayout,
                 scale: torch.Tensor | None = None) -> None:
    """Write latent [T, D] into cache slots slot_mapping [T] (page * page_size + offset; negative: skipped),
    quantized to ``layout`` in the same kernel. ``scale``: the fp8 layout's [1] float32 tensor, else None.
    One launch, no allocation, no host sync."""
    layout.check_cache(cache)
    layout.check_scale(scale, cache.device)
    if not cache.is_contiguous():
        raise ValueError("the cache must be contiguous (slots index its flat token rows)")
    if latent.dim() != 2 or latent.shape[1] != layout.dim or latent.stride(-1) != 1:
        raise ValueError(f"latent must be [T, {layout.dim}] with contiguous rows, got {tuple(latent.shape)}")
    if latent.dtype not in (torch.bfloat16, torch.float16, torch.float32) or latent.device != cache.device:
        raise ValueError(f"latent must be bf16, fp16 or fp32 on {cache.device}, got {latent.dtype} on {latent.device}")
    _check_slots(slot_mapping, latent.shape[0], cache.device, "slot_mapping")
    T = latent.shape[0]
    if T == 0:
        return
    vals, scs, pes = _views(cache, layout)
    block_t = 8 if cache.is_cuda else 32
    _write_latent_kernel[(triton.cdiv(T, block_t),)](
        latent, slot_mapping, vals, scs, pes, scale if scale is not None else vals, T, latent.stride(0),
        BLOCK_T=block_t, ROUND_BF16=cache.dtype == torch.bfloat16, **_tiles(layout), num_warps=4)


def gather_latent(cache: torch.Tensor, slots: torch.Tensor, layout: KVCacheLayout, scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens of ``slots`` [N] dequantized: [N, D] of ``out_dtype`` (bf16 or fp32; rows of negative slots are
    zeros). ``out`` (optional): [N, D] of out_dtype with contiguous rows."""
    layout.check_cache(cache)
    layout.check_scale(scale, cache.device)
    if not cache.is_contiguous():
        raise ValueError("the cache must be contiguous (slots index its flat token rows)")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if slots.dim() != 1:
        raise ValueError(f"slots must be [N], got {tuple(slots.shape)}")
    _check_slots(slots, slots.shape[0], cache.device, "slots")
    N = slots.shape[0]
    if out is None:
        out = torch.empty(N, layout.dim, dtype=out_dtype, device=cache.device)
    elif out.shape != (N, layout.dim) or out.dtype != out_dtype or out.device != cache.device or out.stride(-1) != 1:
        raise ValueError(f"out must be [{N}, {layout.dim}] {out_dtype} on {cache.device} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if N == 0:
        return out
    vals, scs, pes = _views(cache, layout)
    block_t = 8 if cache.is_cuda else 32
    _gather_latent_kernel[(triton.cdiv(N, block_t),)](
        vals, scs, pes, scale if scale is not None else vals, slots, out, N, out.stride(0),
        BLOCK_T=block_t, ROUND_BF16=out_dtype == torch.bfloat16, **_tiles(layout), num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------
# Torch references (torch's casts and float64 scale arithmetic; nothing shared with the kernels)


def quantize_reference(latent: torch.Tensor, layout: KVCacheLayout, scale: torch.Tensor | None = None) -> torch.Tensor:
    """latent [T, D] -> the cache rows [T, width] of ``layout`` (``storage_dtype``)."""
    x = latent.float()
    R = layout.kv_lora_rank
    if layout.kind == "auto":
        return latent.to(layout.model_dtype)
    if layout.kind == "fp8":
        return (x / scale.float().reshape(())).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    T, G = x.shape[0], layout.num_groups
    lat = torch.zeros(T, G * GROUP, dtype=torch.float32, device=x.device)
    lat[:, :R] = x[:, :R]
    groups = lat.view(T, G, GROUP)
    amax = groups.abs().amax(-1).clamp_min(AMAX_FLOOR).double()
    s = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))).float()  # [T, G], powers of two
    q = (groups / s[..., None]).view(T, -1)[:, :R].to(torch.float8_e4m3fn)
    rows = torch.empty(T, layout.width, dtype=torch.uint8, device=x.device)
    rows[:, :R] = q.view(torch.uint8)
    rows[:, R:R + 4 * G] = s.contiguous().view(torch.uint8)
    rows[:, R + 4 * G:] = x[:, R:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return rows


def dequantize_reference(rows: torch.Tensor, layout: KVCacheLayout, scale: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cache rows [..., width] of ``layout`` -> the values [..., D] (product in fp32, then cast to out_dtype)."""
    R = layout.kv_lora_rank
    if layout.kind == "auto":
        return rows.to(out_dtype)
    if layout.kind == "fp8":
        return (rows.float() * scale.float().reshape(())).to(out_dtype)
    G = layout.num_groups
    b = rows.contiguous()
    lat = b[..., :R].view(torch.float8_e4m3fn).float()
    s = b[..., R:R + 4 * G].contiguous().view(torch.float32)  # [..., G]
    lat = lat * s.repeat_interleave(GROUP, -1)[..., :R]
    pe = b[..., R + 4 * G:].contiguous().view(torch.bfloat16).float()
    return torch.cat([lat, pe], -1).to(out_dtype)
