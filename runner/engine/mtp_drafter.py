"""MTP drafting (``speculative=mtp``, docs/speculative.md#4-the-engine): DeepSeek-V3's MTP layer proposes each
request's drafts on the device at the end of a step, from the target's hidden states of that step.

Row i of the MTP layer is main-model position i with the token after it, t_{i+1}, and the target's final-normed
hidden state h_i there (models/mtp.py). After a step the token after every position the target computed validly is
known: the next prompt token inside a prompt, the sampled token after a prompt's last position, and after a verify
step the emitted tokens (position start + j is followed by emitted token j, for j = 0 .. accepted drafts). The first
pass runs the MTP layer over exactly those rows, each request's rows causal after its cached ones, and writes the MTP
layer's cache there: below a request's ``num_computed`` its cache holds what the request's own tokens give, as the
target's does. A prompt's chunks before its last have no drafts to make but still write their rows.

The last row of a request (position P, the last emitted token as t_{P+1}) gives draft 1, the argmax of the MTP
logits: drafts are one-hot, as n-gram drafts are, so rejection sampling stays exact. Draft j > 1 applies the layer
again on its own output: row P + j - 1 takes draft j - 1 as its token and the previous pass's output y (after
shared_head.norm) as its hidden state, one token per request through the same cache. A request drafts at most
``draft_room`` tokens (its max_tokens and max_model_len).

Those further passes write the cache at positions P + 1 .. P + k - 1, past the target's; the next steps compute those
positions and write them again before anything reads them. Where they run past the request's pages they write into
pages of their own (``scratch_pages_per_slot`` per batch slot), which the MTP layer's cache holds after the pages the
block manager hands out.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mla_runner.attention import StepInputs
from mla_runner.engine.drafters import draft_room
from mla_runner.engine.request import Request
from mla_runner.engine.scheduler import ScheduledBatch
from mla_runner.models.context import ForwardContext, PrefillMetadata
from mla_runner.models.mtp import MTPModule


def scratch_pages_per_slot(num_tokens: int, page_size: int) -> int:
    """Pages the chained passes of one request may need past its own: they write k - 1 positions after the last one
    the target computed, which its pages hold."""
    return -(-(num_tokens - 1) // page_size)


@dataclass
class _Drafting:
    """A request that drafts after this step: its index in the batch, the position of its last MTP row (P), how many
    drafts it may make and its row of the chained passes' block table (its pages, then its scratch pages)."""

    index: int
    last: int
    room: int
    pages: list[int]


@dataclass
class _FirstPass:
    """The first pass's rows, request after request: the token after each position, the position, its row of the
    target's hidden states and its cache slot; per request its row count and cached tokens."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    slots: list[torch.Tensor] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)


class MTPDrafter:
    def __init__(self, mtp: MTPModule, backend, num_tokens: int, page_size: int, max_model_len: int,
                 first_scratch_page: int, chunk_metadata: Callable[[list[int], list[int], torch.Tensor],
                                                                   PrefillMetadata]):
        """``first_scratch_page``: where the MTP cache's scratch pages start (``scratch_pages_per_slot`` for each of
        the batch's slots after it); ``chunk_metadata(q_lens, context_lens, block_table)``: the model runner's
        metadata of prompt chunks, which the MTP rows of prompt chunks take as the target's rows do."""
        self.mtp, self.backend, self.k = mtp, backend, num_tokens
        self.page_size, self.max_model_len = page_size, max_model_len
        self.first_scratch_page = first_scratch_page
        self.scratch_per_slot = scratch_pages_per_slot(num_tokens, page_size)
        self.chunk_metadata = chunk_metadata
        self.device = mtp.lm_head.weight.device

    def draft(self, batch: ScheduledBatch, hidden: torch.Tensor, emitted: Sequence[Sequence[int]]
              ) -> list[list[int]]:
        """The drafts of each request of ``batch`` for its next step (none for a prompt with chunks still to come);
        ``hidden`` [T, hidden_size]: the target's output at the step's tokens, in batch order; ``emitted``: the tokens
        the step gave each request (the sampled one, or its accepted drafts and the target's token)."""
        rows, drafting = self._first_pass_rows(batch, emitted)
        y = self._first_pass(batch, rows, hidden)
        drafts: list[list[int]] = [[] for _ in batch.requests]
        if not drafting:
            return drafts
        last_rows = list(itertools.accumulate(rows.q_lens))
        y = y[torch.tensor([last_rows[r.index] - 1 for r in drafting], device=self.device)]
        tokens = self.mtp.compute_logits(y).argmax(-1)
        out = torch.full((len(drafting), self.k), -1, dtype=torch.long, device=self.device)
        out[:, 0] = tokens
        table = _block_table([r.pages for r in drafting]).to(self.device)
        active = list(range(len(drafting)))
        for j in range(2, max(r.room for r in drafting) + 1):
            keep = [a for a, r in enumerate(active) if drafting[r].room >= j]
            active = [active[a] for a in keep]
            keep_index, index = (torch.tensor(x, device=self.device) for x in (keep, active))
            y = self._chain(y[keep_index], tokens[keep_index], [drafting[r] for r in active], table[index], j)
            tokens = self.mtp.compute_logits(y).argmax(-1)
            out[index, j - 1] = tokens
        for r, row in zip(drafting, out.tolist()):
            drafts[r.index] = row[: r.room]
        return drafts

    def room(self, req: Request, emitted: Sequence[int]) -> int:
        """How many drafts the request may make after a step that emitted ``emitted`` (none: a prompt's chunk)."""
        if not emitted:
            return 0
        return draft_room(self.k, req.params.max_tokens, len(req.output_token_ids) + len(emitted),
                          req.num_tokens + len(emitted), self.max_model_len)

    def _first_pass_rows(self, batch: ScheduledBatch, emitted: Sequence[Sequence[int]]
                         ) -> tuple[_FirstPass, list[_Drafting]]:
        """The first pass's rows (on the host) and the requests that draft."""
        rows, drafting, ps = _FirstPass(), [], self.page_size
        for i, (req, offset, n, d) in enumerate(zip(batch.requests, itertools.accumulate(batch.num_new, initial=0),
                                                    batch.num_new, batch.num_drafts)):
            start, out = req.num_computed, list(emitted[i])
            # the token after each position: the step's own tokens inside a prompt, then what the step emitted
            following = _tokens(req, start + 1, start + n - d) + out if out else _tokens(req, start + 1, start + n + 1)
            m = len(following)
            rows.ids += following
            rows.positions += range(start, start + m)
            rows.rows += range(offset, offset + m)
            position = torch.arange(start, start + m)
            rows.slots.append(torch.tensor(req.pages)[position // ps] * ps + position % ps)
            rows.q_lens.append(m)
            rows.contexts.append(start)
            room = self.room(req, out)
            if room:
                first = self.first_scratch_page + len(drafting) * self.scratch_per_slot
                pages = req.pages + list(range(first, first + self.scratch_per_slot))
                last = start + m - 1
                drafting.append(_Drafting(i, last, room, pages[: -(-(last + room) // ps)]))
        return rows, drafting

    def _first_pass(self, batch: ScheduledBatch, rows: _FirstPass, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP layer over the first pass's rows (each request's causal after its cached ones), in the target step's
        two forms: its first ``num_decode`` requests absorbed, its prompt chunks after them as the runner's chunk
        metadata says."""
        D, reqs = batch.num_decode, batch.requests
        metadata = prefill = None
        if D:
            table = _block_table([r.pages for r in reqs[:D]]).to(self.device)
            metadata = self.backend.build_chunk_metadata(self._inputs(rows.q_lens[:D], rows.contexts[:D], table))
        if D < len(reqs):
            prefill = self.chunk_metadata(rows.q_lens[D:], rows.contexts[D:],
                                          _block_table([r.pages for r in reqs[D:]]).to(self.device))
        ctx = ForwardContext(positions=self._long(rows.positions), slot_mapping=torch.cat(rows.slots).to(self.device),
                             backend=self.backend, attn_metadata=metadata, prefill=prefill)
        return self.mtp(self._long(rows.ids), hidden[self._long(rows.rows)], ctx)

    def _chain(self, y: torch.Tensor, tokens: torch.Tensor, reqs: list[_Drafting], table: torch.Tensor, j: int
               ) -> torch.Tensor:
        """Pass j >= 2: one row per request, at position P + j - 1, its previous draft as the token and the previous
        pass's output as the hidden state; ``table``: their rows of the chained passes' block table."""
        positions = [r.last + j - 1 for r in reqs]
        slots = [r.pages[p // self.page_size] * self.page_size + p % self.page_size for r, p in zip(reqs, positions)]
        ctx = ForwardContext(positions=self._long(positions), slot_mapping=self._long(slots), backend=self.backend,
                             attn_metadata=self.backend.build_chunk_metadata(
                                 self._inputs([1] * len(reqs), positions, table)))
        return self.mtp(tokens, y, ctx)

    def _inputs(self, q_lens: list[int], contexts: list[int], block_table: torch.Tensor) -> StepInputs:
        """Absorbed attention of requests with ``q_lens`` new rows after ``contexts`` cached ones."""
        seq_lens = [c + q for c, q in zip(contexts, q_lens)]
        i32 = dict(dtype=torch.int32, device=self.device)
        return StepInputs(seq_lens=torch.tensor(seq_lens, **i32),
                          qo_indptr=torch.tensor(list(itertools.accumulate(q_lens, initial=0)), **i32),
                          block_table=block_table, q_len=max(q_lens), seq_lens_host=seq_lens,
                          q_lens_host=list(q_lens))

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)


def _tokens(req: Request, lo: int, hi: int) -> list[int]:
    """The request's tokens at positions [lo, hi) of its prompt plus output."""
    return req.token_ids[lo:hi] if hi - lo > 1 else [req.token_at(p) for p in range(lo, hi)]


def _block_table(pages: list[list[int]]) -> torch.Tensor:
    table = torch.zeros(len(pages), max(map(len, pages)), dtype=torch.int32)
    for i, row in enumerate(pages):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return table
