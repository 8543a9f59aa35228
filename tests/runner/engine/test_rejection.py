"""Verification of drafts: greedy on hand-made logits with each request's own number of drafts; speculative sampling
against the target distribution it must reproduce, by chi-square tests on a vocabulary of 8; forced acceptance's
mean; the per-position statistics by hand."""
from __future__ import annotations

import math

import pytest
import torch

from mla_runner.engine.rejection import PAD, AcceptanceStats, forced_num_accepted, verify
from mla_runner.engine.sampler import DrawKeys

V = 8
DRAWS = 200_000  # requests in one batch, each one draw
# chi-square 0.999 quantiles (scipy.stats.chi2.ppf(0.999, df)): a correct sampler fails one test in a thousand seeds
CHI2_999 = {6: 22.46, 42: 76.08, 49: 85.35, 56: 94.46}


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts.double() - expected.double()) ** 2 / expected.double()).sum())


def flat(columns: list[torch.Tensor]) -> torch.Tensor:
    """Per-request columns [B] (or [B, V]) interleaved into the flat layout: request 0's, then request 1's, ..."""
    return torch.stack(columns, dim=1).flatten(0, 1)


def test_greedy_accepts_up_to_the_first_mismatch_then_the_targets_token():
    # five requests with 0, 1, 3, 3 and 1 drafts; logits chosen by hand so that each row's argmax is the listed token
    argmax = [[4],              # no draft: the bonus row only
              [2, 5],           # its draft 2 matches, bonus 5
              [1, 3, 0, 6],     # drafts 1, 7, 0: the second differs, the target's 3 replaces it
              [2, 2, 2, 1],     # drafts 2, 2, 2: all match, bonus 1
              [7, 0]]           # draft 6 differs at once: the target's 7
    drafts = [[], [2], [1, 7, 0], [2, 2, 2], [6]]
    logits = torch.full((sum(map(len, argmax)), V), -1.0)
    for row, token in enumerate(t for rows in argmax for t in rows):
        logits[row, token] = 2.0
        logits[row, (token + 1) % V] = 1.5  # a close second, never chosen
    out = verify(torch.tensor([t for d in drafts for t in d]), torch.tensor([len(d) for d in drafts]),
                 logits.argmax(dim=-1), max_drafts=3)
    X = PAD
    assert out.tokens.tolist() == [[4, X, X, X], [2, 5, X, X], [1, 3, X, X], [2, 2, 2, 1], [7, X, X, X]]
    assert out.num_accepted.tolist() == [0, 1, 1, 3, 0]
    assert out.num_tokens.tolist() == [1, 2, 2, 4, 1]


def test_greedy_batch_without_any_draft():
    out = verify(torch.zeros(0, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.tensor([3, 5]), max_drafts=2)
    assert out.tokens.tolist() == [[3, PAD, PAD], [5, PAD, PAD]] and out.num_accepted.tolist() == [0, 0]


def distributions(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p1 [V] (target, first position), q1 [V] (draft, far from p1, one token it never proposes and one the target
    never takes), P2 [V, V] and Q2 [V, V] (second position given the first token), p3 [V] (bonus)."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    p1[3] = 0.0
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q1[5] = 0.0
    P2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, 1)
    Q2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, 1)
    p3 = torch.softmax(torch.randn(V, generator=g), 0)
    return p1 / p1.sum(), q1 / q1.sum(), P2, Q2, p3


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot_draft"])
def test_speculative_sampling_reproduces_the_target_distribution(one_hot):
    """200k requests with two drafts each, in one batch. The first emitted token follows p1; given that the first
    draft was accepted (it is then x1), the second follows P2[x1]; the first draft is accepted with probability
    sum_x min(p1(x), q1(x)) (one-hot drafts: sum_x q1(x) p1(x)). Drafts are drawn from q1 and Q2[x1] either way: a
    one-hot draft (ngram) is a deterministic proposal given the context, which q only randomizes across requests."""
    torch.manual_seed(1)
    p1, q1, P2, Q2, p3 = distributions(0)
    B = DRAWS
    x1 = torch.multinomial(q1, B, replacement=True)
    x2 = torch.multinomial(Q2[x1], 1)[:, 0]
    bonus = torch.multinomial(p3, B, replacement=True)
    target_probs = flat([p1.expand(B, V), P2[x1], p3.expand(B, V)])
    draft_probs = None if one_hot else flat([q1.expand(B, V), Q2[x1]])
    # the sampler's tokens at the draft rows are not read for sampled requests: give them a token never drawn there
    target_tokens = flat([torch.full((B,), 3), torch.full((B,), 3), bonus])
    out = verify(flat([x1, x2]), torch.full((B,), 2), target_tokens, max_drafts=2, target_probs=target_probs,
                 draft_probs=draft_probs, keys=DrawKeys(range(B), [0] * B))

    first = out.tokens[:, 0]
    counts = torch.bincount(first, minlength=V)
    assert counts[3] == 0  # the target never takes it
    expected = p1 * B
    nonzero = expected > 0
    assert chi_square(counts[nonzero], expected[nonzero]) < CHI2_999[6]  # 7 tokens with mass: 6 degrees of freedom
    assert 0.5 * (counts.double() / B - p1.double()).abs().sum() < 0.01  # total variation

    accept_rate = float((q1 * p1).sum() if one_hot else torch.minimum(p1, q1).sum())
    accepted = out.num_accepted >= 1
    assert abs(accepted.double().mean().item() - accept_rate) < 4 * math.sqrt(accept_rate * (1 - accept_rate) / B)
    assert torch.equal(first[accepted], x1[accepted])

    # the second token given an accepted first draft, cell by cell over (x1, second)
    second = out.tokens[accepted, 1]
    joint = torch.bincount(x1[accepted] * V + second, minlength=V * V).view(V, V)
    seen = joint.sum(dim=1) > 0  # first tokens ever accepted (not 3, which p1 never takes, nor 5, never drafted)
    expected = joint.sum(dim=1, keepdim=True) * P2
    assert chi_square(joint[seen], expected[seen]) < CHI2_999[int(seen.sum()) * (V - 1)]
    assert (out.num_tokens == out.num_accepted + 1).all()
    assert torch.equal(out.tokens[out.num_accepted == 2, 2], bonus[out.num_accepted == 2])  # the sampler's bonus


def test_seeded_requests_draw_the_same_whatever_the_batch_and_greedy_rows_stay_greedy():
    p1, q1, P2, Q2, p3 = distributions(1)
    torch.manual_seed(0)
    B = 64
    x = torch.multinomial(q1, B, replacement=True)
    target_probs = flat([p1.expand(B, V), p3.expand(B, V)])
    draft_probs = q1.expand(B, V).contiguous()
    target_tokens = flat([torch.full((B,), int(p1.argmax())), torch.full((B,), 6)])

    def run(rows: slice, greedy_every: int) -> torch.Tensor:
        n = len(range(B)[rows])
        keys = DrawKeys(list(range(1000, 1000 + B))[rows], [3] * n)
        is_greedy = torch.arange(B)[rows] % greedy_every == 0
        return verify(x[rows], torch.ones(n, dtype=torch.long), target_tokens.view(B, 2)[rows].flatten(), 1,
                      target_probs=target_probs.view(B, 2, V)[rows].flatten(0, 1), draft_probs=draft_probs[rows],
                      is_greedy=is_greedy, keys=keys).tokens

    whole = run(slice(None), greedy_every=3)
    assert torch.equal(run(slice(10, 20), greedy_every=3), whole[10:20])
    greedy = torch.arange(B) % 3 == 0
    top = int(p1.argmax())  # a greedy request keeps its draft only where it is the argmax, then the bonus 6
    expected = torch.tensor([[top, 6] if t == top else [top, PAD] for t in x.tolist()])
    assert torch.equal(whole[greedy], expected[greedy])
    assert not torch.equal(whole[~greedy], expected[~greedy])  # the sampled rows do draw


@pytest.mark.parametrize("length,k", [(1.8, 1), (2.5, 3), (1.0, 2), (4.0, 3), (3.3, 3)])
def test_forced_acceptance_length_is_the_mean_tokens_per_step(length, k):
    B = DRAWS
    g = torch.Generator().manual_seed(5)
    accepted = forced_num_accepted(length, torch.full((B,), k), generator=g)
    whole = math.floor(length - 1)
    assert set(accepted.unique().tolist()) <= {whole, whole + 1}  # the least-variance choice
    frac = length - 1 - whole
    assert abs(accepted.double().mean().item() + 1 - length) < 4 * math.sqrt(frac * (1 - frac) / B) + 1e-12
    again = forced_num_accepted(length, torch.full((B,), k), generator=torch.Generator().manual_seed(5))
    assert torch.equal(accepted, again)


def test_forced_acceptance_emits_the_drafts_then_the_targets_token():
    drafts = [[], [3, 4], [5, 6, 7], [1]]
    num_drafts = torch.tensor([len(d) for d in drafts])
    forced = forced_num_accepted(2.5, num_drafts, generator=torch.Generator().manual_seed(0))
    assert (forced <= num_drafts).all() and forced[0] == 0
    target_tokens = torch.arange(100, 100 + int(num_drafts.sum()) + 4)  # row r holds 100 + r
    out = verify(torch.tensor([t for d in drafts for t in d]), num_drafts, target_tokens, max_drafts=3,
                 target_probs=torch.full((int(target_tokens.numel()), V), 1.0 / V), forced_accepted=forced)
    starts = [0, 1, 4, 8]  # each request's first target row
    for b, d in enumerate(drafts):
        a = int(forced[b])
        assert out.tokens[b, : a + 1].tolist() == d[:a] + [100 + starts[b] + a]
    assert torch.equal(out.num_accepted, forced)


def test_acceptance_statistics_per_position():
    stats = AcceptanceStats(max_drafts=3)
    stats.add(torch.tensor([3, 3, 1, 0]), torch.tensor([2, 0, 1, 0]))
    stats.add(torch.tensor([2, 3]), torch.tensor([2, 3]))
    s = stats.summary()
    # drafted at positions 0, 1, 2: 5, 4, 3 request-steps; accepted there: 4, 3, 1
    assert s["acceptance_rate_per_position"] == pytest.approx([4 / 5, 3 / 4, 1 / 3])
    assert s["mean_acceptance_length"] == pytest.approx(1 + 8 / 5)  # 5 request-steps drafted, 8 drafts accepted
    assert (s["num_draft_tokens"], s["num_accepted_tokens"], s["num_verify_steps"]) == (12, 8, 5)
    assert math.isnan(AcceptanceStats(2).summary()["mean_acceptance_length"])


@pytest.mark.parametrize("forced", [None, 2.5])
def test_argmax_requests_are_verified_on_the_host_as_on_the_device(forced):
    """Verifier.emit's host path (every request greedy, nothing else asked) emits what the device path emits for
    the same requests once one of them asks for logprobs (which sends the step down the device path), and counts the
    same statistics: drafts matching the argmax up to a mismatch, all of them, none, a request without drafts."""
    from types import SimpleNamespace

    from mla_runner.config import SpeculativeConfig
    from mla_runner.engine.verifier import Verifier
    from mla_runner.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    V, num_drafts = 11, [3, 3, 0, 2]
    logits = torch.randn(sum(num_drafts) + len(num_drafts), V, generator=gen)
    argmax = logits.argmax(-1).tolist()
    drafts = [argmax[0:1] + [(argmax[1] + 1) % V, 4], argmax[4:7], [], [(argmax[9] + 1) % V, 5]]

    def requests(logprobs):
        return [SimpleNamespace(params=SamplingParams(temperature=0.0, logprobs=logprobs if i == 0 else None),
                                draft_token_ids=d, output_token_ids=[1, 2], prompt_token_ids=[3])
                for i, d in enumerate(drafts)]

    spec = SpeculativeConfig(method="ngram", num_tokens=3, force_acceptance_length=forced)
    host, device = Verifier(spec, torch.device("cpu")), Verifier(spec, torch.device("cpu"))
    got, entries = host.emit(logits, requests(None), num_drafts, [0] * 4, ())
    want, _ = device.emit(logits, requests(1), num_drafts, [0] * 4, ())
    assert got == want and entries == [[]] * 4
    assert host.stats.summary() == device.stats.summary()
    if forced is None:
        assert got == [argmax[0:2], argmax[4:8], argmax[8:9], argmax[9:10]]
