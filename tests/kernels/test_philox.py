"""Counter-based noise (kernels.philox): the Triton kernel against the torch reference bit for bit (under the
interpreter without a GPU), the reference against Random123's known answer, and the uniforms' statistics."""
import math

import pytest
import torch

from mla_runner.kernels.philox import exponential_noise, seed_key, uniform_noise, uniform_noise_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_uniforms(seeds, positions, width, stream):
    """The Triton kernel itself, also on the CPU (``uniform_noise`` takes the reference there)."""
    from mla_runner.kernels import philox

    out = torch.empty(len(seeds), width, dtype=torch.float32, device=DEVICE)
    philox._uniform_kernel[(len(seeds), -(-width // 256))](
        out, torch.tensor(seeds, device=DEVICE), torch.tensor(positions, device=DEVICE), width, out.stride(0),
        STREAM=stream, BLOCK=256)
    return out.cpu()


def test_reference_gives_random123s_known_answer():
    """Philox-4x32-10 with key 0 at counter 0: Random123's known-answer test gives 0x6627e8d5 as the first word."""
    u = uniform_noise_reference(torch.tensor([0]), torch.tensor([0]), 1)
    assert float(u) == ((0x6627E8D5 >> 9) + 0.5) / 2**23


@pytest.mark.parametrize("stream", [0, 1, 2])
def test_kernel_equals_reference_bit_for_bit(stream):
    seeds = [0, 1, seed_key(-5), 2**62 + 12345, (1 << 63) - 1]
    positions = [0, 7, 2**33 + 3, 1, 0]
    width = 700  # not a multiple of the block
    expected = uniform_noise_reference(torch.tensor(seeds), torch.tensor(positions), width, stream)
    assert torch.equal(kernel_uniforms(seeds, positions, width, stream), expected)


def test_uniforms_are_uniform_and_keys_independent():
    """Over 256 keys x 4096 entries: mean 1/2, variance 1/12, a flat 16-bin histogram (chi-square below its 0.999
    quantile, 37.7 at 15 degrees of freedom), inside [2^-24, 1 - 2^-24]; rows that differ in seed, position or
    stream are uncorrelated (|r| < 5 / sqrt(n))."""
    n_keys, width = 256, 4096
    u = uniform_noise(torch.arange(n_keys, device=DEVICE), torch.zeros(n_keys, dtype=torch.long, device=DEVICE),
                      width).cpu().double()
    n = u.numel()
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert float(((counts - n / 16) ** 2 / (n / 16)).sum()) < 37.7
    assert u.min() >= 2**-24 and u.max() <= 1 - 2**-24
    seeds = torch.tensor([7, 8, 7, 7], device=DEVICE)
    positions = torch.tensor([0, 0, 1, 0], device=DEVICE)
    rows = torch.cat([uniform_noise(seeds[:3], positions[:3], width),
                      uniform_noise(seeds[3:], positions[3:], width, stream=1)]).cpu().double()
    r = torch.corrcoef(rows)
    assert (r - torch.eye(4, dtype=r.dtype)).abs().max() < 5 / math.sqrt(width)


def test_exponential_noise_is_positive_finite_with_mean_one():
    e = exponential_noise(torch.arange(64, device=DEVICE), torch.full((64,), 3, device=DEVICE), 2048).cpu().double()
    assert torch.isfinite(e).all() and (e > 0).all()
    assert abs(e.mean() - 1) < 5 / math.sqrt(e.numel())
