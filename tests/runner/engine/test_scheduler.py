"""Continuous batching without a model: page accounting, chunked prefill under a token budget, prefix caching,
preemption, the decode block table."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from mla_runner.engine.block_manager import BlockManager, BlockTable
from mla_runner.engine.request import Request, Status
from mla_runner.engine.scheduler import MIN_CHUNK, Scheduler, chunk_within
from mla_runner.sampling import SamplingParams


def make_requests(prompts: list[list[int]], max_tokens: list[int]) -> list[Request]:
    return [Request(i, i, None, list(p), SamplingParams(max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]


def check_pages(blocks: BlockManager, reqs: list[Request]) -> None:
    """Every page is held by as many requests as its reference count says, and free exactly when no one holds it."""
    held = Counter(p for r in reqs for p in r.pages)
    assert all(blocks.refs[p] == held[p] for p in range(blocks.num_pages))
    assert set(blocks.free_pages) == {p for p in range(blocks.num_pages) if held[p] == 0}
    for key, page in blocks.cached.items():
        assert blocks.page_key[page] == key


def simulate(reqs: list[Request], num_pages: int, page_size: int, max_batch: int = 8, budget: int = 64,
             prefix_caching: bool = True, on_step=None, drafts=None, key_next_token: bool = False):
    """Drive the scheduler as the engine does (the model's token: 7 for every request), checking after every step the
    budget, the order of the batch, page coverage and reference counts, and on steps of one token per request the
    incrementally kept block table against one built from scratch.

    ``drafts(req) -> (number drafted, number accepted)``: a decoding request drafts that many 7s after each step and
    the next step accepts that many of them (at most what the scheduler left it), as the engine books a verify
    step: the accepted drafts and the target's token appended, the cache holding all but the last, pages of rejected
    drafts released."""
    blocks = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching, key_next_token=key_next_token)
    sched = Scheduler(blocks, max_batch, max_num_batched_tokens=budget)
    max_pages = -(-max(r.num_tokens + r.params.max_tokens for r in reqs) // page_size)
    table = BlockTable(max_batch, max_pages)
    for r in reqs:
        sched.add(r)
    steps, accepts = [], {}
    while sched.has_work():
        batch = sched.schedule()
        assert batch.requests, "a step with nothing to run would spin forever"
        assert batch.num_tokens <= budget and len(batch.requests) <= max_batch
        D = batch.num_decode
        own = [n - d for n, d in zip(batch.num_new, batch.num_drafts)]
        assert all(n == 1 for n in own[:D]) and all(n > 1 for n in own[D:]) and not any(batch.num_drafts[D:])
        for r, n in zip(batch.requests, batch.num_new):
            assert len(r.pages) == -(-(r.num_computed + n) // page_size), "pages must cover exactly what is computed"
        if D == len(batch.requests) and not batch.has_drafts:
            rows = table.update(batch.requests)
            fresh = torch.zeros(D, max_pages, dtype=torch.int32)
            for i, r in enumerate(batch.requests):
                fresh[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
            assert torch.equal(rows, fresh), f"block table differs from a fresh build at step {len(steps)}"
        steps.append([(r.index, n) for r, n in zip(batch.requests, batch.num_new)])
        if on_step is not None:
            on_step(batch)
        done = [batch.completes(i) for i in range(len(batch.requests))]
        for r, n, d, sampled in zip(batch.requests, batch.num_new, batch.num_drafts, done):
            assert r.draft_token_ids == [7] * d
            accepted = min(d, accepts.get(r.request_id, 0))
            r.num_computed += n - d + accepted
            if sampled:
                r.output_token_ids += [7] * (accepted + 1)
                assert len(r.output_token_ids) <= r.params.max_tokens
            r.draft_token_ids = []
            if d:
                blocks.trim(r, r.num_tokens)
            blocks.cache_full_pages(r)
            if sampled and len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r)
            elif sampled and drafts is not None:
                drafted, accepts[r.request_id] = drafts(r)
                room = r.params.max_tokens - len(r.output_token_ids) - 1
                r.draft_token_ids = [7] * min(drafted, room)
        check_pages(blocks, reqs)
        assert len(steps) < 10_000
    return steps, sched


def test_everything_fits():
    reqs = make_requests([list(range(n)) for n in (5, 1, 8, 3)], [6, 3, 9, 1])
    steps, sched = simulate(reqs, num_pages=32, page_size=4)
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions == 0
    assert steps[0] == [(1, 1), (0, 5), (2, 8), (3, 3)]  # all admitted at once; the 1-token prompt first


def test_a_full_cache_preempts_and_still_finishes_every_request():
    reqs = make_requests([list(range(100 * i, 100 * i + n)) for i, n in enumerate((5, 6, 7, 4))], [12, 10, 9, 11])
    _, sched = simulate(reqs, num_pages=6, page_size=4)
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions > 0


def test_a_long_prompt_is_chunked_while_the_others_decode():
    reqs = make_requests([[1, 2, 3], [4, 5], list(range(10, 60))], [30, 30, 2])
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=16)
    sched.add(reqs[0])
    sched.add(reqs[1])
    chunks = []

    def run(batch):
        done = [batch.completes(i) for i in range(len(batch.requests))]
        for r, n, sampled in zip(batch.requests, batch.num_new, done):
            if r.index == 2:
                chunks.append(n)
            r.num_computed += n
            if sampled:
                r.output_token_ids.append(7)

    run(sched.schedule())  # both prompts
    sched.add(reqs[2])  # the long one arrives once the first two decode
    for _ in range(4):
        batch = sched.schedule()
        assert [r.index for r in batch.requests[:2]] == [0, 1] and batch.num_new[:2] == [1, 1], "decodes go on"
        run(batch)
    assert chunks == [14, 14, 14, 8]  # 50 tokens in the 14 the decodes leave per step
    assert reqs[2].output_token_ids == [7] and reqs[2].num_computed == 50


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = make_requests([[1] * 10, [2] * 12], [4, 4])
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.requests == [a] and batch.num_new == [10]


def test_prefix_caching_shares_full_pages_and_never_the_last_token():
    system = list(range(100, 112))  # three pages of 4
    reqs = make_requests([system + [1, 2], system + [3], system, list(system)], [2, 2, 2, 2])
    blocks = BlockManager(32, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=64)
    sched.add(reqs[0])
    batch = sched.schedule()
    first_pages = list(reqs[0].pages[:3])
    reqs[0].num_computed += batch.num_new[0]
    blocks.cache_full_pages(reqs[0])
    reqs[0].output_token_ids.append(7)
    sched.finish(reqs[0])  # its pages stay cached
    for r in reqs[1:]:
        sched.add(r)
    batch = sched.schedule()
    got = {r.index: (r.num_cached_tokens, n) for r, n in zip(batch.requests, batch.num_new)}
    # 13 tokens: 3 cached pages, 1 computed; 12 tokens (whole pages): the last page recomputed, never taken
    assert got == {1: (12, 1), 2: (8, 4), 3: (8, 4)}
    assert all(r.pages[:2] == first_pages[:2] for r in reqs[1:])
    assert reqs[1].pages[2] == first_pages[2]
    assert blocks.hits == 12 + 8 + 8 and blocks.queries == 13 + 12 + 12 + 14


def test_prefix_caching_off_shares_nothing():
    reqs = make_requests([list(range(12)) + [1], list(range(12)) + [2]], [3, 3])
    steps, _ = simulate(reqs, num_pages=32, page_size=4, prefix_caching=False)
    assert all(r.num_cached_tokens == 0 for r in reqs)
    assert steps[0] == [(0, 13), (1, 13)]


def test_freed_cached_pages_are_evicted_least_recently_freed_first_and_unkeyed_first():
    blocks = BlockManager(6, 4)
    a, b = make_requests([list(range(9)), list(range(50, 59))], [1, 1])  # 2 full pages + 1 token each
    for r in (a, b):
        assert blocks.admit(r, blocks.match_prefix(r), r.num_tokens)
        r.num_computed = r.num_tokens
        blocks.cache_full_pages(r)
    a_pages, b_pages = list(a.pages), list(b.pages)
    blocks.free(a)
    blocks.free(b)
    # unkeyed tails first (most recent free first among them), then keyed pages in the order freed: a's, then b's
    assert list(blocks.free_pages) == [b_pages[2], a_pages[2], a_pages[1], a_pages[0], b_pages[1], b_pages[0]]
    c = make_requests([list(range(100, 113))], [1])[0]  # needs 4 pages: evicts both tails and a's prefix
    assert blocks.admit(c, blocks.match_prefix(c), c.num_tokens)
    assert blocks.match_prefix(make_requests([list(range(9))], [1])[0]) == []
    assert blocks.match_prefix(make_requests([list(range(50, 59))], [1])[0]) == b_pages[:2]


def test_with_the_next_token_in_the_key_a_page_is_shared_only_where_the_token_after_it_agrees():
    """MTP drafting: the MTP layer's cache entry at a page's last position reads the token after the page, so its key
    covers that token: two prompts that agree on two pages but not on the token after them share only the first
    page (whose next token, the second page's first, they agree on); and a page is keyed only once the token after
    it is known."""
    prompts = [list(range(8)) + [50, 51], list(range(8)) + [60, 61], list(range(8)) + [50, 52]]
    for key_next_token, shared in ((True, [1, 2]), (False, [2, 2])):
        blocks = BlockManager(16, 4, key_next_token=key_next_token)
        a, b, c = make_requests(prompts, [1, 1, 1])
        assert blocks.admit(a, blocks.match_prefix(a), a.num_tokens)
        a.num_computed = a.num_tokens
        blocks.cache_full_pages(a)
        assert [blocks.match_prefix(b), blocks.match_prefix(c)] == [a.pages[:n] for n in shared]

    blocks = BlockManager(16, 4, key_next_token=True)
    whole = make_requests([list(range(100, 108))], [1])[0]  # two full pages, nothing after them yet
    assert blocks.admit(whole, [], whole.num_tokens)
    whole.num_computed = whole.num_tokens
    blocks.cache_full_pages(whole)
    assert blocks.page_key[whole.pages[0]] is not None and blocks.page_key[whole.pages[1]] is None
    whole.output_token_ids.append(7)  # the token after the second page: now it is keyed
    blocks.cache_full_pages(whole)
    assert blocks.page_key[whole.pages[1]] is not None


@pytest.mark.parametrize("prefix_caching,key_next_token", [(True, False), (False, False), (True, True)])
def test_shared_prefixes_under_preemption_finish_every_request(prefix_caching, key_next_token):
    system = list(range(200, 210))
    reqs = make_requests([system + [i] * (i + 1) for i in range(6)], [9, 3, 12, 5, 8, 10])
    _, sched = simulate(reqs, num_pages=9, page_size=4, budget=8, max_batch=4, prefix_caching=prefix_caching,
                        key_next_token=key_next_token)
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions > 0


def test_batch_size_limit():
    blocks = BlockManager(100, 4)
    sched = Scheduler(blocks, max_batch_size=2, max_num_batched_tokens=64)
    for i in range(5):
        sched.add(Request(i, i, None, [1, 2, 3], SamplingParams()))
    batch = sched.schedule()
    assert [r.index for r in batch.requests] == [0, 1] and batch.num_new == [3, 3]
    for r, n in zip(batch.requests, batch.num_new):
        r.num_computed += n
        r.output_token_ids.append(7)
    batch = sched.schedule()
    assert batch.num_decode == 2 == len(batch.requests)


def test_chunk_within_is_the_largest_chunk_under_the_pair_budget():
    for pairs in (0, 1, 100, 5000, 2**22):
        for context in (0, 1, 63, 1000, 32768):
            n = chunk_within(pairs, context, 10**6)
            cost = lambda k, c=context: k * c + k * (k + 1) // 2
            assert n == MIN_CHUNK or cost(n) <= pairs < cost(n + 1), (pairs, context, n)
    assert chunk_within(2**22, 0, 100) == 100 and chunk_within(0, 10, 5) == 5


def test_while_requests_decode_the_attention_budget_shrinks_chunks_as_their_context_grows():
    decoder, long = make_requests([[1, 2, 3], list(range(10, 1010))], [500, 1])
    blocks = BlockManager(256, 16)
    pairs = 10_000
    sched = Scheduler(blocks, 8, max_num_batched_tokens=512, chunk_attention_budget=pairs)
    sched.add(decoder)
    batch = sched.schedule()
    decoder.num_computed += batch.num_new[0]
    decoder.output_token_ids.append(7)
    sched.add(long)
    chunks = []
    while long.num_computed < long.num_tokens:
        batch = sched.schedule()
        assert batch.requests[0] is decoder and batch.num_new[0] == 1, "the decoder runs every step"
        for r, n in zip(batch.requests, batch.num_new):
            if r is long:
                assert n == min(MIN_CHUNK, r.num_tokens - r.num_computed) or \
                    n * r.num_computed + n * (n + 1) // 2 <= pairs
                chunks.append(n)
            r.num_computed += n
        decoder.output_token_ids.append(7)
    assert chunks[0] == chunk_within(pairs, 0, 511) == 140 and chunks == sorted(chunks, reverse=True)
    assert chunks[-2] == MIN_CHUNK  # deep into the prompt, the floor keeps it moving
    # alone, the prompt takes the whole token budget
    alone = make_requests([list(range(10, 1010))], [1])[0]
    sched = Scheduler(BlockManager(256, 16), 8, max_num_batched_tokens=512, chunk_attention_budget=pairs)
    sched.add(alone)
    assert sched.schedule().num_new == [512]


def test_drafts_ride_with_their_request_under_the_budget_and_preemption():
    """Requests that draft 0 to 3 tokens a step and accept some: every request still finishes with exactly its
    max_tokens, pages cover exactly what each step computes, and references stay right, through preemption and
    prefix caching."""
    g = torch.Generator().manual_seed(0)

    def drafts(req):
        d = int(torch.randint(0, 4, (1,), generator=g))
        return d, int(torch.randint(0, d + 1, (1,), generator=g))

    system = list(range(200, 210))
    reqs = make_requests([system + [i] * (i + 1) for i in range(6)], [9, 3, 12, 5, 8, 10])
    verified = []
    _, sched = simulate(reqs, num_pages=9, page_size=4, budget=8, max_batch=4, drafts=drafts,
                        on_step=lambda batch: verified.append(sum(batch.num_drafts)))
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions > 0 and sum(verified) > 10


def decoding(blocks: BlockManager, prompt: list[int], drafts: list[int]) -> Request:
    """A request whose prompt is in the cache and whose first token was sampled, with ``drafts``."""
    req = make_requests([prompt], [100])[0]
    assert blocks.admit(req, [], len(prompt))
    req.num_computed = len(prompt)
    req.output_token_ids.append(7)
    req.status = Status.RUNNING
    req.draft_token_ids = list(drafts)
    return req


def test_a_request_with_drafts_is_one_request_of_1_plus_d_tokens():
    blocks = BlockManager(32, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=7)
    a = decoding(blocks, [1, 2, 3], [4, 5, 6])
    b = decoding(blocks, [9, 9], [])
    c = decoding(blocks, [8, 8, 8, 8], [1, 2, 3])
    sched.running.extend([a, b, c])
    sched.add(make_requests([list(range(20))], [1])[0])
    batch = sched.schedule()
    # a: its token and 3 drafts; b: 1; c: what the budget leaves (2: one draft); the prompt gets nothing
    assert [r.index for r in batch.requests] == [0, 0, 0] and len(batch.requests) == 3
    assert (batch.num_new, batch.num_drafts, batch.num_decode) == ([4, 1, 2], [3, 0, 1], 3)
    assert c.draft_token_ids == [1] and all(batch.completes(i) for i in range(3))
    assert [len(r.pages) for r in (a, b, c)] == [2, 1, 2]  # pages for positions up to 3 + 3, 2, 4 + 1


def test_drafts_are_cut_to_the_free_pages_rather_than_preempting():
    blocks = BlockManager(4, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=64)
    old = decoding(blocks, [1, 2, 3, 4, 5], [])  # 2 pages
    new = decoding(blocks, [6, 7, 8], [1, 2, 3, 4])  # 1 page, 1 free: room for 5 tokens, its token and 4 drafts
    new.draft_token_ids += [5, 6]
    sched.running.extend([old, new])
    batch = sched.schedule()
    assert batch.num_new == [1, 5] and batch.num_drafts == [0, 4] and sched.num_preemptions == 0
    assert new.draft_token_ids == [1, 2, 3, 4] and blocks.num_free == 0


def test_a_preempted_request_drops_its_drafts():
    blocks = BlockManager(2, 4)
    sched = Scheduler(blocks, 8, max_num_batched_tokens=64)
    old = decoding(blocks, [1, 2, 3, 4], [])  # its next token needs the one free page
    new = decoding(blocks, [5, 6, 7], [1, 2])
    sched.running.extend([old, new])
    blocks.allocate(new, 4)
    batch = sched.schedule()
    assert batch.requests == [old] and sched.num_preemptions == 1
    assert new.status is Status.WAITING and new.draft_token_ids == [] and new.pages == []


def test_pages_of_rejected_drafts_are_released_and_never_keyed():
    blocks = BlockManager(8, 4)
    table = BlockTable(2, 8)
    req = decoding(blocks, [1, 2, 3], [10, 11, 12, 13, 14])  # token at 3, drafts at 4-8: pages 0-2
    table.update([req])
    blocks.allocate(req, req.num_computed + 6)
    assert len(req.pages) == 3
    kept = req.pages[:2]
    req.num_computed += 1 + 1  # one draft accepted: positions 3 and 4 hold tokens 7 and 10
    req.output_token_ids += [10, 99]  # the accepted draft, then the target's token at 5
    blocks.trim(req, req.num_tokens)
    blocks.cache_full_pages(req)
    assert req.pages == kept and blocks.num_free == 6
    assert list(blocks.cached.values()) == [kept[0]]  # the page of positions 4-7 is not full of computed tokens
    fresh = torch.zeros(1, 8, dtype=torch.int32)
    fresh[0, :2] = torch.tensor(kept, dtype=torch.int32)
    assert torch.equal(table.update([req]), fresh)
