"""Counter-based random numbers for sampling: one stream of uniforms per (seed, position, stream) key.

``uniform_noise(seeds, positions, width, stream)`` gives row r the uniforms u[r, v], v < width, of Philox-4x32-10
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) keyed by ``seeds[r]`` (64 bits: the key's
two words) at the counter (v, positions[r] low word, stream, positions[r] high word), first output word only; the
word w becomes u = ((w >> 9) + 0.5) * 2^-23, exact in float32 and in [2^-24, 1 - 2^-24] (23 bits: with 24, the
largest value would round to 1.0), so -log(u) is a positive, finite exponential variate.

Nothing is stateful: the same key gives the same numbers in any batch, in any order, eager or replayed in a CUDA
graph, which is what lets the sampler run inside the captured decode step with every request's own seed
(``mla_runner.engine.sampler``). The Triton kernel and the torch reference compute the same words in integer
arithmetic, so they agree bit for bit (CPU runs use the reference; the GPU runs the kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUNDS = 10
MUL_A, MUL_B = 0xD2511F53, 0xCD9E8D57  # the round multipliers
WEYL_A, WEYL_B = 0x9E3779B9, 0xBB67AE85  # the key increments
MASK32 = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1  # seeds are reduced to 63 bits on the host (``seed_key``)
# the same constants for the kernel (Triton reads module globals only as constexpr)
_ROUNDS = tl.constexpr(ROUNDS)
_MUL_A = tl.constexpr(MUL_A)
_MUL_B = tl.constexpr(MUL_B)
_WEYL_A = tl.constexpr(WEYL_A)
_WEYL_B = tl.constexpr(WEYL_B)
_MASK32 = tl.constexpr(MASK32)


def seed_key(seed: int) -> int:
    """A Python int seed as the non-negative int64 key the kernels read (vLLM seeds may be any int)."""
    return seed & SEED_MASK


@triton.jit
def _uniform_kernel(out_ptr, seeds_ptr, positions_ptr, width, stride_out, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    position = tl.load(positions_ptr + row).to(tl.int64)
    k0 = (seed & _MASK32).to(tl.uint32)
    k1 = ((seed >> 32) & _MASK32).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    c0 = cols.to(tl.uint32)
    c1 = zero + (position & _MASK32).to(tl.uint32)
    c2 = zero + STREAM
    c3 = zero + ((position >> 32) & _MASK32).to(tl.uint32)
    a = zero + _MUL_A
    b = zero + _MUL_B
    for _ in tl.static_range(_ROUNDS):
        n0 = tl.umulhi(b, c2) ^ c1 ^ k0
        n2 = tl.umulhi(a, c0) ^ c3 ^ k1
        c1 = b * c2
        c3 = a * c0
        c0 = n0
        c2 = n2
        k0 = k0 + _WEYL_A
        k1 = k1 + _WEYL_B
    u = ((c0 >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    tl.store(out_ptr + row * stride_out + cols, u, mask=cols < width)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, width: int, stream: int = 0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, width] fp32 uniforms in (0, 1) keyed by ``seeds`` [R] and ``positions`` [R] (non-negative int64) and the
    ``stream`` number; on the device of ``seeds``: the Triton kernel on a GPU (graph-capturable: no allocation with
    ``out`` given, no sync), the torch reference elsewhere."""
    if seeds.shape != positions.shape or seeds.dim() != 1:
        raise ValueError(f"seeds and positions must be [R] alike, got {tuple(seeds.shape)} and "
                         f"{tuple(positions.shape)}")
    if seeds.device.type != "cuda":
        return uniform_noise_reference(seeds, positions, width, stream)
    R = seeds.shape[0]
    if out is None:
        out = torch.empty(R, width, dtype=torch.float32, device=seeds.device)
    if R and width:
        BLOCK = 1024
        _uniform_kernel[(R, triton.cdiv(width, BLOCK))](out, seeds, positions, width, out.stride(0), STREAM=stream,
                                                         BLOCK=BLOCK)
    return out


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, width: int, stream: int = 0) -> torch.Tensor:
    """[R, width] fp32 Exp(1) variates -log(u) of ``uniform_noise``'s uniforms: positive and finite."""
    return uniform_noise(seeds, positions, width, stream).log_().neg_()


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b (a < 2^32 constant, b [..] int64 holding values < 2^32), in int64 without
    overflow: b split in 16-bit halves."""
    low_part = a * (b & 0xFFFF)  # < 2^48
    high_part = a * (b >> 16)  # < 2^48
    low = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (low >> 32), low & MASK32


def uniform_noise_reference(seeds: torch.Tensor, positions: torch.Tensor, width: int, stream: int = 0
                            ) -> torch.Tensor:
    """``uniform_noise`` in torch int64 arithmetic (32-bit words held in int64), the kernel's reference."""
    R, device = seeds.shape[0], seeds.device
    seeds, positions = seeds.long()[:, None], positions.long()[:, None]
    k0, k1 = seeds & MASK32, (seeds >> 32) & MASK32
    c0 = torch.arange(width, dtype=torch.long, device=device)[None, :].expand(R, width)
    c1 = (positions & MASK32).expand(R, width)
    c2 = torch.full((R, width), stream & MASK32, dtype=torch.long, device=device)
    c3 = ((positions >> 32) & MASK32).expand(R, width)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(MUL_B, c2)
        hi_a, lo_a = _mulhilo(MUL_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + WEYL_A) & MASK32, (k1 + WEYL_B) & MASK32
    return ((c0 >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
