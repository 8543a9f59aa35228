"""Pages of the latent KV cache: which are free, which belong to which request, which hold a known prefix, and the
host copy of the decode step's block table.

Automatic prefix caching (vLLM's scheme): once a page is full, it is keyed by a hash of its tokens chained with the
hash of the page before it, so a key names the whole prefix up to the page's end. A request admitted later whose
prompt starts with the same pages takes them (their reference count goes up) and computes only its own tokens.
Pages whose count drops to zero go back to the free list but keep their key: a later request can still hit them
until they are handed out again, least recently freed first, with unkeyed pages (useless to anyone) before keyed
ones. The last token of a prompt is never taken from the cache: its logits are what the step samples.

With MTP drafting (``key_next_token``) a page also holds the MTP layer's cache, whose entry at the page's last position
depends on the token after the page (the MTP layer reads token i + 1 at position i). The key then covers that token
too, so a page is found only by a request whose tokens agree with everything its contents were computed from, and a
page is keyed only once the token after it is known.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from mla_runner.engine.request import Request


def page_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full page: its tokens chained onto the key of the page before it (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """A request's page list only grows (``allocate`` extends it in place) until ``free`` or ``trim`` replaces it
    with a new one: ``BlockTable`` relies on that to rewrite only what changed."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 key_next_token: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.key_next_token = key_next_token  # a page's key covers the token after it (MTP drafting)
        self.refs = [0] * num_pages  # requests holding each page
        self.page_key: list[bytes | None] = [None] * num_pages  # the prefix key of a full, cached page
        self.cached: dict[bytes, int] = {}  # prefix key -> the page that holds it
        # pages held by no request, in the order they are handed out (an OrderedDict as an LRU with O(1) removal)
        self.free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    # ------------------------------------------------------------------------------------------ prefix cache
    def match_prefix(self, req: Request) -> list[int]:
        """The cached pages that start ``req``'s tokens, in order (none with caching off, nor for a request that asks
        for prompt logprobs: they need the logits of every prompt position); they are not taken yet."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        tokens, keys = req.token_ids, req.page_keys
        pages = []
        for i in range((len(tokens) - 1) // self.page_size):  # the last token is always computed
            if i == len(keys):
                keys.append(self._key(keys, tokens, i))
            page = self.cached.get(keys[i])
            if page is None:
                break
            pages.append(page)
        return pages

    def admit(self, req: Request, hit: list[int], num_new_tokens: int) -> bool:
        """Give a waiting request the cached pages ``hit`` (from ``match_prefix``) and pages for ``num_new_tokens``
        more tokens after them; False (nothing taken) when the free pages do not suffice. Sets ``req.num_computed``
        to the tokens the hit covers."""
        in_free_list = sum(self.refs[p] == 0 for p in hit)
        fresh = self.pages_needed(len(hit) * self.page_size + num_new_tokens) - len(hit)
        if fresh + in_free_list > self.num_free:
            return False
        for page in hit:
            self._take(page)
        req.pages.extend(hit)
        req.num_computed = req.num_cached_tokens = len(hit) * self.page_size
        if self.enable_prefix_caching:
            self.queries += req.num_tokens
            self.hits += req.num_computed
        self.allocate(req, req.num_computed + num_new_tokens)
        return True

    def cache_full_pages(self, req: Request) -> None:
        """Key the pages ``req`` has filled since the last call, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(req.num_computed // self.page_size, len(req.pages))
        if self.key_next_token:  # the token after the page is part of its key
            full = min(full, (req.num_tokens - 1) // self.page_size)
        keys, tokens = req.page_keys, None
        while req.num_keyed_pages < full:
            i = req.num_keyed_pages
            if i == len(keys):
                tokens = tokens or req.token_ids
                keys.append(self._key(keys, tokens, i))
            page, key = req.pages[i], keys[i]
            # a page whose prefix another request has already cached (both computed it at once) stays unkeyed
            if self.page_key[page] is None and key not in self.cached:
                self.page_key[page] = key
                self.cached[key] = page
            req.num_keyed_pages += 1

    def _key(self, keys: list[bytes], tokens: list[int], i: int) -> bytes:
        """The key of page i of ``tokens``, chained onto ``keys[i - 1]`` (with ``key_next_token``, the token after the
        page is hashed with it)."""
        end = (i + 1) * self.page_size + (1 if self.key_next_token else 0)
        return page_hash(keys[i - 1] if i else b"", tokens[i * self.page_size:end])

    def reset_prefix_cache(self) -> None:
        """Forget every key (pages in use stay with their requests)."""
        self.cached.clear()
        self.page_key = [None] * self.num_pages

    # ----------------------------------------------------------------------------------------------- pages
    def allocate(self, req: Request, num_tokens: int) -> None:
        """Give ``req`` enough pages for its first ``num_tokens`` tokens."""
        need = self.pages_needed(num_tokens) - len(req.pages)
        if need > self.num_free:
            raise RuntimeError(f"KV cache: {need} pages needed, {self.num_free} free")
        for _ in range(max(need, 0)):
            page = next(iter(self.free_pages))
            self._take(page)
            key = self.page_key[page]
            if key is not None:  # evicted: its prefix is no longer cached
                del self.cached[key]
                self.page_key[page] = None
            req.pages.append(page)

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        """Whether ``req`` can hold its first ``num_tokens`` tokens."""
        return self.pages_needed(num_tokens) - len(req.pages) <= self.num_free

    def free(self, req: Request) -> None:
        """Drop ``req``'s hold on its pages, last page first (a prefix's tail is evicted before its head)."""
        self._release(reversed(req.pages))
        req.pages = []
        req.num_computed = req.num_keyed_pages = 0

    def trim(self, req: Request, num_tokens: int) -> None:
        """Release ``req``'s pages past those its first ``num_tokens`` tokens need (a verify step allocated pages
        for drafts it rejected). Such pages were never keyed: only pages of computed tokens are. The page list is
        replaced by a shorter one, so ``BlockTable`` rewrites the request's row."""
        keep = self.pages_needed(num_tokens)
        if len(req.pages) > keep:
            self._release(reversed(req.pages[keep:]))
            req.pages = req.pages[:keep]

    def _release(self, pages) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free_pages[page] = None
                if self.page_key[page] is None:
                    self.free_pages.move_to_end(page, last=False)

    def _take(self, page: int) -> None:
        if self.refs[page] == 0:
            del self.free_pages[page]
        self.refs[page] += 1


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
