"""The decode sampler (persistent buffers, counts kept on the device, CUDA graphs on a GPU) against ``sampler.sample``
from the requests' token ids: the same tokens, exactly, step after step, through rows taken, rebuilt and evicted."""
from __future__ import annotations

import pytest
import torch

from mla_runner.engine.decode_sampler import DecodeSampler
from mla_runner.engine.request import Request
from mla_runner.engine.sampler import DrawKeys, sample
from mla_runner.sampling import SamplingParams

V = 50
SETTINGS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3),
    SamplingParams(temperature=1.2, top_k=5, frequency_penalty=0.7),
    SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=0.7),
    SamplingParams(temperature=0.5, top_k=8, top_p=0.8, min_p=0.05, presence_penalty=-0.3, frequency_penalty=0.2),
]


def requests(n: int, first_id: int, g: torch.Generator) -> list[Request]:
    return [Request(first_id + i, i, None, torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=g)),),
                                                         generator=g).tolist(), SETTINGS[(first_id + i) % 6])
            for i in range(n)]


def reference(logits: torch.Tensor, reqs: list[Request]) -> list[int]:
    keys = DrawKeys([1000 + r.request_id for r in reqs], [len(r.output_token_ids) for r in reqs])
    return sample(logits, [r.params for r in reqs], keys, [r.prompt_token_ids for r in reqs],
                  [r.output_token_ids for r in reqs]).tokens.tolist()


def run_steps(sampler: DecodeSampler, batches: list[list[Request]], g: torch.Generator, device: str,
              logits_of=None) -> None:
    """Each batch in turn: the sampler's tokens equal the reference's on the same logits (3x their spread, so that
    penalties change argmaxes), then each request appends its token."""
    for reqs in batches:
        B = len(reqs)
        logits = torch.randn(B, V, generator=g) * 3
        if logits_of is None:
            got = sampler.sample(logits.to(device), reqs, [1000 + r.request_id for r in reqs], graph=False)
        else:
            static = logits_of(B)
            static[:B].copy_(logits)
            static[B:].normal_()
            got = sampler.sample(static, reqs, [1000 + r.request_id for r in reqs], graph=True)
        assert got == reference(logits.to(device), reqs), [r.params for r in reqs]
        for r, t in zip(reqs, got):
            r.output_token_ids.append(t)


def schedule(g: torch.Generator) -> list[list[Request]]:
    """Four penalized-or-not groups over a sampler of 6 rows: a batch of six, another six that evict their rows, the
    first six back (rebuilt), one request's output grown outside the sampler (a verify step's tokens), a finish."""
    first, second = requests(6, 0, g), requests(6, 6, g)
    batches = [first] * 3 + [second] * 2 + [first] * 2
    batches.append(first[:4])
    return batches


def test_decode_sampler_equals_sample_step_after_step():
    g = torch.Generator().manual_seed(0)
    sampler = DecodeSampler(max_batch=6, vocab_size=V, device=torch.device("cpu"))
    batches = schedule(g)
    run_steps(sampler, batches[:5], g, "cpu")
    batches[5][1].output_token_ids += [4, 4, 9]  # tokens emitted by a step the sampler did not see
    run_steps(sampler, batches[5:], g, "cpu")
    sampler.release(batches[0][0])
    assert batches[0][0].request_id not in sampler._rows
    greedy = [r for r in requests(3, 100, g) if r.params.greedy and not r.params.penalized]
    run_steps(sampler, [greedy], g, "cpu")


def test_takes_no_logprobs_nor_requests_under_min_tokens():
    base = Request(0, 0, None, [1, 2], SamplingParams())
    assert DecodeSampler.takes([base])
    assert not DecodeSampler.takes([base, Request(1, 0, None, [1], SamplingParams(logprobs=2))])
    under = Request(2, 0, None, [1], SamplingParams(min_tokens=2), output_token_ids=[5])
    assert not DecodeSampler.takes([under])
    under.output_token_ids.append(6)
    assert DecodeSampler.takes([under])


@pytest.mark.gpu
def test_graph_replay_equals_the_reference():
    """On a GPU: graphs per (bucket, steps) captured on first use over static logits of buckets 4 and 8, batches of
    changing size and settings; tokens equal the eager reference's."""
    g = torch.Generator().manual_seed(1)
    statics = {4: torch.zeros(4, V, device="cuda"), 8: torch.zeros(8, V, device="cuda")}
    sampler = DecodeSampler(max_batch=8, vocab_size=V, device=torch.device("cuda"))
    first, second = requests(6, 0, g), requests(3, 6, g)
    batches = [first, first, second, first[:3], second + first[:5], first[:1], first]
    run_steps(sampler, batches, g, "cuda", logits_of=lambda B: statics[4 if B <= 4 else 8])
    assert sampler.num_graphs >= 3
