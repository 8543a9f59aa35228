"""Pages of the latent KV cache: which are free, which belong to which request."""
from __future__ import annotations

from collections import deque

from runner.request import Request


class BlockManager:
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
