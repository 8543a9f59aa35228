"""Pages of the latent KV cache: which are free, which belong to which request, and the host copy of the
decode step's block table."""
from __future__ import annotations

from collections import deque

import torch

from mla_runner.engine.request import Request


class BlockManager:
    """A request's page list only grows (``allocate`` extends it in place) until ``free`` replaces it with an
    empty one: ``BlockTable`` relies on that to rewrite only what changed."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.free_pages: deque[int] = deque(range(num_pages))

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_needed(num_tokens) <= self.num_free

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Give ``req`` enough pages for its first ``num_tokens`` tokens."""
        need = self.pages_needed(num_tokens) - len(req.pages)
        if need > self.num_free:
            raise RuntimeError(f"KV cache: {need} pages needed, {self.num_free} free")
        req.pages.extend(self.free_pages.popleft() for _ in range(max(need, 0)))

    def can_append(self, req: Request) -> bool:
        """Whether ``req`` can grow by one token (a new page only at a page boundary)."""
        return self.pages_needed(req.num_cached + 1) - len(req.pages) <= self.num_free

    def free(self, req: Request) -> None:
        self.free_pages.extend(req.pages)
        req.pages = []
        req.num_cached = 0


class BlockTable:
    """The decode step's block table on the host, [max_batch, max_pages] int32, row i = the pages of the
    request in batch slot i. A row is written only where its slot changed hands (or the request's page list was
    replaced) and extended where the request grew pages, so a step costs O(batch), not O(batch x pages)
    (rebuilding it every step costs 1.7 ms at 64 requests of 16k tokens:
    docs/mla_decode.md#63-the-engines-share-of-a-step)."""

    def __init__(self, max_batch: int, max_pages: int):
        self.rows = torch.zeros(max_batch, max_pages, dtype=torch.int32)
        self._pages: list[list[int] | None] = [None] * max_batch  # the page list each row was written from
        self._written = [0] * max_batch  # how many of its pages are in the row

    def update(self, batch: list[Request]) -> torch.Tensor:
        """Rows [0, len(batch)) for this batch, in slot order; entries past a request's pages are 0. The rows are
        rewritten in place by the next call: a copy to the device from them must have read them by then (the
        engine's does: from pageable memory, CUDA stages the bytes before the copy call returns; a pinned table
        would need an event to wait on)."""
        for i, req in enumerate(batch):
            pages, done = req.pages, self._written[i]
            if self._pages[i] is not pages:  # another request, or this one's pages were freed and reallocated
                self.rows[i, :done] = 0
                done = 0
            if len(pages) > done:
                self.rows[i, done:len(pages)] = torch.tensor(pages[done:], dtype=torch.int32)
            self._pages[i], self._written[i] = pages, len(pages)
        return self.rows[:len(batch)]
