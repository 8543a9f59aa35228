"""Continuous batching without a model: page accounting, admission, preemption, the decode block table."""
from __future__ import annotations

import torch

from mla_runner.engine.block_manager import BlockManager, BlockTable
from mla_runner.engine.request import Request, Status
from mla_runner.engine.scheduler import Scheduler
from mla_runner.sampling import SamplingParams


def simulate(num_pages: int, page_size: int, prompts: list[int], max_tokens: list[int], max_batch: int = 8):
    """Drive the scheduler as the engine does; check the page bookkeeping after every step, and on decode steps
    the incrementally kept block table against one built from scratch."""
    blocks = BlockManager(num_pages, page_size)
    sched = Scheduler(blocks, max_batch, max_prefill_tokens=64)
    max_pages = -(-max(p + m for p, m in zip(prompts, max_tokens)) // page_size)
    table = BlockTable(max_batch, max_pages)
    reqs = [Request(i, i, None, list(range(n)), SamplingParams(max_tokens=m))
            for i, (n, m) in enumerate(zip(prompts, max_tokens))]
    for r in reqs:
        sched.add(r)
    steps = 0
    while sched.has_work():
        batch, is_prefill = sched.schedule()
        assert batch, "a step with nothing to run would spin forever"
        if not is_prefill:
            assert [r.last_token_id for r in batch] == [r.token_ids[-1] for r in batch]
            rows = table.update(batch)
            fresh = torch.zeros(len(batch), max_pages, dtype=torch.int32)
            for i, r in enumerate(batch):
                fresh[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
            assert torch.equal(rows, fresh), f"block table differs from a fresh build at step {steps}"
        for r in batch:
            r.num_cached = r.num_tokens if is_prefill else r.num_cached + 1
            assert len(r.pages) == -(-r.num_cached // page_size), "pages must cover exactly the cached tokens"
            r.output_token_ids.append(0)
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r)
        owned = [p for r in reqs for p in r.pages]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert len(owned) + blocks.num_free == num_pages
        steps += 1
        assert steps < 10_000
    return reqs, sched


def test_everything_fits():
    reqs, sched = simulate(num_pages=32, page_size=4, prompts=[5, 1, 8, 3], max_tokens=[6, 3, 9, 1])
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions == 0


def test_a_full_cache_preempts_and_still_finishes_every_request():
    reqs, sched = simulate(num_pages=6, page_size=4, prompts=[5, 6, 7, 4], max_tokens=[12, 10, 9, 11])
    assert all(r.status is Status.FINISHED and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions > 0


def test_batch_size_limit():
    blocks = BlockManager(100, 4)
    sched = Scheduler(blocks, max_batch_size=2, max_prefill_tokens=64)
    for i in range(5):
        sched.add(Request(i, i, None, [1, 2, 3], SamplingParams()))
    batch, is_prefill = sched.schedule()
    assert is_prefill and [r.index for r in batch] == [0, 1]
    batch, is_prefill = sched.schedule()
    assert not is_prefill and len(batch) == 2
