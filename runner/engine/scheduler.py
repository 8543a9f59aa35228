"""Continuous batching with chunked prefill, vLLM v1's shape: one token budget per step, shared by every request.

Each step the running requests come first, in order: each takes what it still needs (one token for a request that
is decoding, the rest of its prompt for one being prefilled), as far as ``max_num_batched_tokens`` allows, so a long
prompt is prefilled chunk by chunk while the others keep decoding in the same steps. What is left of the budget
admits waiting requests (their cached prefix first: ``BlockManager.admit``) up to ``max_batch_size`` running.
While requests decode, the prompt chunks of a step also share ``chunk_attention_budget`` query-key pairs: a chunk of
n tokens after c cached ones attends n * c + n (n + 1) / 2 of them, so deep into a long prompt its chunks shrink and
the decoding requests' steps stay short (at least ``MIN_CHUNK`` tokens a step, so the prompt still advances).
When a request cannot get pages for its tokens, the newest running request is preempted: its pages are released
(their prefix stays cached until evicted) and it goes back to the front of the queue, to be computed again (prompt
plus what it generated so far) when pages free up; no request is admitted in a step that preempted one.

Speculative decoding (docs/speculative.md, section 4): a decoding request with drafts (``draft_token_ids``) is
scheduled as one request of 1 + d tokens, its last token and its d drafts, counted against the budget and given pages
like any other tokens. Its drafts are cut to what the budget and the free pages hold before any request is preempted
for them (a request never preempts another for its drafts); a preempted request drops its drafts.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from mla_runner.engine.block_manager import BlockManager
from mla_runner.engine.request import Request, Status

MIN_CHUNK = 16  # tokens a prompt chunk gets under the attention budget however long its context


def chunk_within(pairs: int, context: int, wanted: int) -> int:
    """The most of ``wanted`` tokens after ``context`` cached ones whose causal attention stays within ``pairs``
    query-key pairs (n * context + n (n + 1) / 2 <= pairs), at least ``min(MIN_CHUNK, wanted)``."""
    n = int(math.isqrt(max(0, (2 * context + 1) ** 2 + 8 * pairs)) - (2 * context + 1)) // 2
    while n * context + n * (n + 1) // 2 > pairs:  # isqrt's rounding
        n -= 1
    return min(wanted, max(n, MIN_CHUNK))


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new[i]`` tokens of ``requests[i]``, starting at its ``num_computed``; of them the last
    ``num_drafts[i]`` are its drafts (``draft_token_ids``), verified by the step. Requests with one new token of their
    own (decoding, with or without drafts, or the last token of a prompt) come first, then the chunks of prompts."""

    requests: list[Request]
    num_new: list[int]
    num_drafts: list[int] = field(default_factory=list)  # empty: none

    def __post_init__(self) -> None:
        if not self.num_drafts:
            self.num_drafts = [0] * len(self.requests)

    @property
    def num_decode(self) -> int:
        """The leading requests with one new token of their own (and their drafts)."""
        return next((i for i, (n, d) in enumerate(zip(self.num_new, self.num_drafts)) if n - d > 1),
                    len(self.num_new))

    @property
    def has_drafts(self) -> bool:
        return any(self.num_drafts)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def completes(self, i: int) -> bool:
        """Whether the step computes the last token of request i, so a token is sampled for it (or, with drafts,
        its drafts are verified)."""
        req = self.requests[i]
        return req.num_computed + self.num_new[i] - self.num_drafts[i] == req.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, chunk_attention_budget: int = 0):
        self.blocks = block_manager
        self.chunk_attention_budget = chunk_attention_budget
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        # the chunks' query-key pairs, bounded only in a step where requests decode
        decoding = self.enable_chunked_prefill and self.chunk_attention_budget > 0 and any(
            r.num_tokens - r.num_computed == 1 for r in self.running)
        pairs = self.chunk_attention_budget if decoding else None
        scheduled: list[tuple[Request, int]] = []
        queue, kept = list(self.running), []
        preempted = False
        while queue:
            req = queue.pop(0)
            n = min(req.num_tokens - req.num_computed, budget)
            if req.draft_token_ids:  # decoding: its last token, then as many drafts as the budget and pages hold
                room = (len(req.pages) + self.blocks.num_free) * self.blocks.page_size - req.num_computed
                n = min(1 + len(req.draft_token_ids), budget, max(room, 1))
                del req.draft_token_ids[max(n - 1, 0):]
            elif n > 1 and pairs is not None:
                n = chunk_within(pairs, req.num_computed, n)
                pairs = max(0, pairs - _pairs(n, req.num_computed))
            if n > 0:
                while not self.blocks.can_allocate(req, req.num_computed + n):
                    preempted = True
                    if not queue:
                        self._preempt(req)
                        req = None
                        break
                    self._preempt(queue.pop())
                if req is None:
                    break
                self.blocks.allocate(req, req.num_computed + n)
                scheduled.append((req, n))
                budget -= n
            kept.append(req)
        self.running = deque(kept)

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            hit = self.blocks.match_prefix(req)
            cached = len(hit) * self.blocks.page_size
            remaining = req.num_tokens - cached
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                break
            if n > 1 and pairs is not None:
                if pairs == 0:
                    break
                n = chunk_within(pairs, cached, n)
            if not self.blocks.admit(req, hit, n):
                break
            req.status = Status.RUNNING
            self.running.append(self.waiting.popleft())
            scheduled.append((req, n))
            budget -= n
            if n > 1 and pairs is not None:
                pairs = max(0, pairs - _pairs(n, cached))

        drafts = [len(r.draft_token_ids) for r, _ in scheduled]
        # stable: decodes (with their drafts) first, then the prompt chunks, each group in running order
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i][1] - drafts[i] > 1)
        return ScheduledBatch([scheduled[i][0] for i in order], [scheduled[i][1] for i in order],
                              [drafts[i] for i in order])

    def abort_all(self) -> list[Request]:
        """Drop every waiting and running request (their pages freed); returns them."""
        dropped = [*self.running, *self.waiting]
        for req in self.running:
            self.blocks.free(req)
        self.running.clear()
        self.waiting.clear()
        return dropped

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.status = Status.FINISHED

    def _preempt(self, req: Request) -> None:
        self.blocks.free(req)
        req.draft_token_ids.clear()
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1


def _pairs(n: int, context: int) -> int:
    """Query-key pairs of a chunk of ``n`` tokens after ``context`` cached ones (causal)."""
    return n * context + n * (n + 1) // 2
