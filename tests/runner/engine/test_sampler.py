"""The sampler against the distributions it must draw from."""
from __future__ import annotations

import pytest
import torch

from mla_runner.engine.sampler import sample
from mla_runner.errors import ConfigError
from mla_runner.sampling import SamplingParams


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n draws from one row of logits, as a histogram over the vocabulary."""
    torch.manual_seed(seed)
    rows = logits.expand(n, -1).contiguous()
    tokens = sample(rows, [params] * n, [None] * n)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, [SamplingParams(temperature=0)] * 5, [None] * 5), logits.argmax(-1))


def test_temperature_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        freq = draw(logits, SamplingParams(temperature=t), 40000)
        expected = torch.softmax(logits[0] / t, -1)
        assert torch.allclose(freq, expected, atol=0.01), (t, freq, expected)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits[0], -1)
    freq = draw(logits, SamplingParams(temperature=1.0, top_k=2), 40000)
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], p[:2] / p[:2].sum(), atol=0.01)
    # top_p keeps the smallest prefix whose mass reaches p: here the first two tokens (0.665 + 0.245)
    freq = draw(logits, SamplingParams(temperature=1.0, top_p=0.8), 40000)
    assert freq[2:].sum() == 0 and freq[1] > 0.2
    assert torch.equal(sample(logits, [SamplingParams(temperature=1.0, top_k=1)], [None]), torch.tensor([0]))


def test_seeded_requests_do_not_depend_on_the_batch():
    logits = torch.randn(3, 100)
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0), SamplingParams(temperature=0)]

    def gen(seed):
        g = torch.Generator()
        g.manual_seed(seed)
        return g

    first = sample(logits, params, [gen(7), None, None])
    alone = sample(logits[:1], params[:1], [gen(7)])
    assert first[0] == alone[0]
    assert first[2] == logits[2].argmax()


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
