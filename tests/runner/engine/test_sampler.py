"""The sampler against plain references on hand-made logits: the distribution each setting must draw from (written
out row by row here, from the definitions), the penalties' logits, min_tokens' mask, logprobs of the raw logits."""
from __future__ import annotations

import pytest
import torch

from mla_runner.engine.sampler import DrawKeys, apply_penalties, sample
from mla_runner.errors import ConfigError
from mla_runner.sampling import SamplingParams

DRAWS = 40000  # histogram error about 0.0025 per entry: compared with atol 0.01


def keys(n: int, first_seed: int = 0) -> DrawKeys:
    """n rows of their own seeds, each drawing its first output token: independent draws."""
    return DrawKeys(range(first_seed, first_seed + n), [0] * n)


def tokens(logits: torch.Tensor, params: list[SamplingParams], **kwargs) -> torch.Tensor:
    return sample(logits, params, keys(len(params)), **kwargs).tokens


def draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS) -> torch.Tensor:
    """n draws from one row of logits, as a histogram over the vocabulary."""
    rows = logits.expand(n, -1).contiguous()
    return torch.bincount(tokens(rows, [params] * n), minlength=logits.shape[-1]).float() / n


def reference_probs(logits: list[float], p: SamplingParams) -> torch.Tensor:
    """The distribution vLLM's definitions give, token by token: softmax at the temperature; min_p drops tokens under
    min_p times the largest probability; top_k keeps the k most likely; top_p keeps, of what is left (renormalized),
    the most likely tokens until their mass reaches top_p (the one that crosses it included)."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / p.temperature, -1).tolist()
    top = max(probs)
    kept = {v: q for v, q in enumerate(probs) if q >= p.min_p * top}
    order = sorted(kept, key=lambda v: -kept[v])
    if p.top_k > 0:
        order = order[: p.top_k]
    total = sum(kept[v] for v in order)
    chosen, mass = [], 0.0
    for v in order:
        if mass >= p.top_p:
            break
        chosen.append(v)
        mass += kept[v] / total
    out = torch.zeros(len(logits), dtype=torch.float64)
    for v in chosen:
        out[v] = kept[v]
    return (out / out.sum()).float()


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(tokens(logits, [SamplingParams(temperature=0)] * 5), logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.5}, {"temperature": 1.0}, {"temperature": 2.0},
    {"top_k": 2}, {"top_p": 0.8}, {"min_p": 0.3},
    {"top_k": 3, "top_p": 0.8},  # top-k first: top_p over the three kept, renormalized (two reach 0.8)
    {"temperature": 1.5, "min_p": 0.1, "top_k": 4, "top_p": 0.9},
    {"temperature": 0.7, "min_p": 0.05, "top_p": 0.95},
])
def test_draws_follow_the_reference_distribution(kwargs):
    row = [3.0, 2.0, 1.5, 1.0, 0.0, -1.0]
    params = SamplingParams(**kwargs)
    expected = reference_probs(row, params)
    freq = draw(torch.tensor([row]), params)
    assert torch.equal(freq > 0, expected > 0), (freq, expected)  # the same support, exactly
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_each_row_has_its_own_settings():
    """Rows of one batch with different settings draw from their own distributions."""
    row = [3.0, 2.0, 1.5, 1.0, 0.0, -1.0]
    settings = [SamplingParams(top_k=2), SamplingParams(min_p=0.3, temperature=2.0), SamplingParams(temperature=0),
                SamplingParams(top_p=0.5)]
    n = 20000
    logits = torch.tensor([row]).expand(n * len(settings), -1).contiguous()
    drawn = tokens(logits, [p for p in settings for _ in range(n)]).view(len(settings), n)
    for p, got in zip(settings, drawn):
        expected = torch.nn.functional.one_hot(torch.tensor(0), 6).float() if p.greedy else reference_probs(row, p)
        assert torch.allclose(torch.bincount(got, minlength=6).float() / n, expected, atol=0.015), p


def reference_penalties(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    out = []
    for v, x in enumerate(logits):
        if v in prompt or v in output:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        count = output.count(v)
        out.append(x - p.frequency_penalty * count - p.presence_penalty * (count > 0))
    return out


def test_penalties_equal_their_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=g) * 3
    prompts = [[1, 2, 2, 3], [0, 11], [], [5, 5, 5]]
    outputs = [[3, 3, 7], [], [4, 4, 4, 9], [5, 6]]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.25),
              SamplingParams(repetition_penalty=0.8),
              SamplingParams(frequency_penalty=2.0),
              SamplingParams(presence_penalty=1.5, repetition_penalty=2.0)]
    got = apply_penalties(logits, params, prompts, outputs)
    for i in range(4):
        expected = torch.tensor(reference_penalties(logits[i].tolist(), prompts[i], outputs[i], params[i]))
        torch.testing.assert_close(got[i], expected)


def test_penalties_steer_greedy_and_leave_other_rows_alone():
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0]] * 3)
    prompts, outputs = [[0], [0], [0]], [[], [0], []]
    params = [SamplingParams(temperature=0, repetition_penalty=1.1),  # 5.0 / 1.1 < 4.9
              SamplingParams(temperature=0, presence_penalty=0.2),  # 0 was generated: 4.8 < 4.9
              SamplingParams(temperature=0)]
    got = tokens(logits, params, prompt_ids=prompts, output_ids=outputs)
    assert got.tolist() == [1, 1, 0]


def test_min_tokens_masks_eos_and_stop_ids():
    """Below min_tokens neither EOS (the engine's ids) nor a stop id can be drawn, even where they dominate; from
    min_tokens on they are back. The mask applies under ignore_eos too (as in vLLM)."""
    logits = torch.tensor([[9.0, 8.0, 0.0, 1.0, -1.0]] * 5)
    eos = (0,)
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[1, 99]),  # 99: outside the vocabulary
              SamplingParams(temperature=0)]
    outputs = [[4], [4, 4], [], [2], []]
    got = tokens(logits, params, output_ids=outputs, eos_token_ids=eos)
    assert got.tolist()[:3] == [3, 0, 1] and got[4] == 0
    rows = logits[3:4].expand(DRAWS, -1)
    drawn = tokens(rows, params[3:4] * DRAWS, output_ids=outputs[3:4] * DRAWS, eos_token_ids=eos)
    freq = torch.bincount(drawn, minlength=5).float() / DRAWS
    expected = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), -1)
    assert freq[:2].sum() == 0 and torch.allclose(freq[2:], expected, atol=0.01)


def test_logprobs_are_of_the_raw_logits():
    """The sampled token's logprob and rank and the top k are the log-softmax of the logits as given: before
    penalties, masks and temperature (vLLM's raw_logprobs)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 20, generator=g)
    logits[0] = torch.linspace(-2, 2, 20)[torch.randperm(20, generator=g)]  # the top one / 1.5 is below the third
    params = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5, min_tokens=1),
              SamplingParams(temperature=0.5, top_k=4, logprobs=0),
              SamplingParams(temperature=0)]
    out = sample(logits, params, keys(3), prompt_ids=[[int(logits[0].argmax())], [], []], output_ids=[[], [], []],
                 eos_token_ids=(int(logits[0].argsort()[-2]),))
    host = out.logprobs.to_host([p.logprobs for p in params])
    reference = torch.log_softmax(logits.double(), -1)
    for i in (0, 1):
        token, entry = int(out.tokens[i]), host[i]
        order = reference[i].argsort(descending=True).tolist()
        assert entry.token_id == token and entry.rank == order.index(token) + 1
        assert entry.logprob == pytest.approx(float(reference[i, token]), abs=1e-6)
        assert entry.top_ids == order[: params[i].logprobs]
        assert entry.top_logprobs == pytest.approx(reference[i, order[: params[i].logprobs]].tolist(), abs=1e-6)
    assert out.tokens[0] == logits[0].argsort()[-3]  # the top one penalized below the third, the second masked
    assert host[2] is None


def test_a_row_draws_by_its_key_alone():
    """The same key draws the same token whatever else is in the batch and wherever the row sits; another seed or
    another position draws afresh (over many rows, differently)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 100, generator=g)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 64
    seeds, positions = list(range(100, 164)), [5] * 64
    whole = sample(logits, params, DrawKeys(seeds, positions)).tokens
    order = torch.randperm(64, generator=g)
    shuffled = sample(logits[order], params, DrawKeys([seeds[i] for i in order], positions)).tokens
    assert torch.equal(shuffled, whole[order])
    assert torch.equal(sample(logits[7:9], params[:2], DrawKeys(seeds[7:9], positions[:2])).tokens, whole[7:9])
    later = sample(logits, params, DrawKeys(seeds, [6] * 64)).tokens
    other = sample(logits, params, DrawKeys([s + 1000 for s in seeds], positions)).tokens
    assert (later != whole).sum() > 32 and (other != whole).sum() > 32


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}, {"n": 0},
                                    {"min_p": 1.5}, {"presence_penalty": 2.5}, {"frequency_penalty": -3},
                                    {"repetition_penalty": 0}, {"logprobs": -1}, {"prompt_logprobs": -2},
                                    {"n": 1.5}, {"logprobs": True}, {"seed": "1"}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ConfigError, match=f"^SamplingParams.{next(iter(kwargs))}=") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)
