"""Continuous batching: admit waiting requests while pages allow, then decode everything running together.

A step is either a prefill of newly admitted requests or a decode of all running ones. When a decode
step runs out of pages, the newest running request is preempted: its pages are freed and it goes back to
the front of the queue, to be recomputed (prompt plus what it generated so far) when pages free up.
"""
from __future__ import annotations

from collections import deque

from mla_runner.engine.block_manager import BlockManager
from mla_runner.engine.request import Request, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Request], bool]:
        """The requests of the next step and whether it is a prefill."""
        batch: list[Request] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            req = self.waiting[0]
            if batch and num_tokens + req.num_tokens > self.max_prefill_tokens:
                break
            if not self.blocks.can_allocate(req.num_tokens + 1):
                break
            self.blocks.allocate(req, req.num_tokens)
            req.status = Status.RUNNING
            batch.append(self.waiting.popleft())
            num_tokens += req.num_tokens
        if batch:
            self.running.extend(batch)
            return batch, True

        while self.running:
            req = self.running.popleft()
            while not self.blocks.can_append(req):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(req)
                    break
            else:
                self.blocks.allocate(req, req.num_cached + 1)
                batch.append(req)
        self.running.extend(batch)
        return batch, False

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
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
