"""The steady state of speculative decoding, run from persistent buffers: one CUDA graph per (batch bucket, q_len)
for the target's verify step and one for the MTP layer's drafting after it, where the backend's step can be captured
(docs/speculative.md#5-cuda-graphs); the same calls run eagerly otherwise.

``VerifyStep``: requests that each feed 1 + d tokens, their last token and their d >= 0 drafts, and nothing else.
Request b's n_b = 1 + d_b tokens are rows offset_b .. offset_b + n_b of the step's T rows, causal after its cached
tokens; n_b differs between requests (one near its ``max_tokens`` drafts fewer). A step whose largest q_len is Q
replays the graph of (bucket(B), Q), which runs bucket * Q rows: rows past T are padding (token 0 at position 0,
written into the scratch slot), and so are the batch slots past B (seq_len 0, one row each: the attention writes
nothing for them). The metadata is built inside the graph from the buffers (qo_indptr, seq_lens, the block table),
so a replay whose requests have other q_lens and lengths is planned anew on the device. The step leaves the final
hidden states of its rows in ``hidden``, where the MTP layer reads them.

``MTPDraftStep``: after a verify step, the MTP layer's passes (engine/mtp_drafter.py says what they compute): a first
pass over request b's m_b = accepted + 1 rows (the emitted tokens as the tokens after them, the verify step's hidden
states), then k - 1 chained passes of one row per request, all in one graph per (bucket(B), Q), Q the verify step's.
A chained pass past a request's ``draft_room`` runs its row as a dummy (position 0, written into the scratch slot)
whose draft is dropped.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from mla_runner.attention import AttentionBackend, StepInputs
from mla_runner.engine.cuda_graphs import LazyGraphs, batch_buckets
from mla_runner.engine.eager_step import slot_of
from mla_runner.models.context import ForwardContext


class _Rows:
    """Persistent per-row and per-request inputs of one absorbed step: token ids, positions and cache slots of up to
    ``max_rows`` rows; lengths and query offsets of up to ``max_batch`` requests."""

    def __init__(self, max_rows: int, max_batch: int, device: torch.device):
        # two copies a step: the rows' three columns in one tensor, the requests' two in another
        self.columns = torch.zeros(3, max_rows, dtype=torch.int64, device=device)
        self.ids, self.positions, self.slots = self.columns
        self.lengths = torch.zeros(2, max_batch + 1, dtype=torch.int32, device=device)
        self.seq_lens, self.qo_indptr = self.lengths[0, :max_batch], self.lengths[1]

    def fill(self, ids: list[int], positions: list[int], slots: list[int], q_lens: list[int], seq_lens: list[int]
             ) -> None:
        """Rows and requests from the host (padding included)."""
        rows, B = len(ids), len(q_lens)
        self.columns[:, :rows].copy_(torch.tensor([ids, positions, slots], dtype=torch.int64), non_blocking=True)
        lengths = torch.tensor([[*seq_lens, 0], list(itertools.accumulate(q_lens, initial=0))], dtype=torch.int32)
        self.lengths[:, : B + 1].copy_(lengths, non_blocking=True)

    def context(self, backend: AttentionBackend, block_table: torch.Tensor, bs: int, rows: int, q_len: int,
                seq_lens_host: list[int] | None, q_lens_host: list[int] | None) -> ForwardContext:
        """The forward context of the first ``bs`` requests and ``rows`` rows, its metadata built now."""
        inputs = StepInputs(seq_lens=self.seq_lens[:bs], qo_indptr=self.qo_indptr[: bs + 1],
                            block_table=block_table[:bs], q_len=q_len, seq_lens_host=seq_lens_host,
                            q_lens_host=q_lens_host)
        return ForwardContext(positions=self.positions[:rows], slot_mapping=self.slots[:rows], backend=backend,
                              attn_metadata=backend.build_metadata(inputs))


class _Padding:
    """How a step of B requests and T rows is laid out: eagerly exactly (bs = B, rows = T); in a graph, the bucket's
    bs slots and bs * Q rows."""

    def __init__(self, buckets: list[int] | None, B: int, T: int, Q: int):
        self.bs = B if buckets is None else next(b for b in buckets if b >= B)
        self.rows = T if buckets is None else self.bs * Q
        self.B, self.T = B, T

    def rows_of(self, values: list[int], pad: int) -> list[int]:
        return values + [pad] * (self.rows - self.T)

    def requests_of(self, values: list[int], pad: int) -> list[int]:
        return values + [pad] * (self.bs - self.B)


class VerifyStep:
    def __init__(self, model, backend: AttentionBackend, block_table: torch.Tensor, max_q_len: int,
                 scratch_slot: int, dtype: torch.dtype, graphs: bool):
        """``block_table``: the runner's device block table [max_batch, max_pages], whose first B rows the caller
        fills for the step; ``dtype``: the model's hidden states'; ``graphs``: replay CUDA graphs (the backend's step
        can be captured)."""
        max_batch, device = block_table.shape[0], block_table.device
        self.model, self.backend, self.block_table = model, backend, block_table
        self.max_q_len, self.scratch_slot = max_q_len, scratch_slot
        self.inputs = _Rows(max_batch * max_q_len, max_batch, device)
        self.hidden = torch.zeros(max_batch * max_q_len, model.args.hidden_size, dtype=dtype, device=device)
        self.buckets = batch_buckets(max_batch) if graphs else None
        self.graphs = LazyGraphs() if graphs else None

    def logits(self, ids: list[int], positions: list[int], slots: list[int], q_lens: list[int],
               seq_lens: list[int]) -> torch.Tensor:
        """The target's logits [T, vocab] fp32 at each of the T = sum(q_lens) rows, request after request; ``seq_lens``:
        each request's cached tokens plus its rows."""
        Q = max(q_lens)
        if Q > self.max_q_len:
            raise ValueError(f"a verify step of q_len {Q} is over the {self.max_q_len} its buffers hold")
        pad = _Padding(self.buckets, len(q_lens), len(ids), Q)
        self.inputs.fill(pad.rows_of(ids, 0), pad.rows_of(positions, 0), pad.rows_of(slots, self.scratch_slot),
                         pad.requests_of(q_lens, 1), pad.requests_of(seq_lens, 0))
        if self.graphs is None:
            return self.forward(pad.bs, pad.rows, Q, seq_lens, q_lens)
        return self.graphs.replay((pad.bs, Q), functools.partial(self.forward, pad.bs, pad.rows, Q))[: pad.T]

    def forward(self, bs: int, rows: int, q_len: int, seq_lens_host: list[int] | None = None,
                q_lens_host: list[int] | None = None) -> torch.Tensor:
        """Metadata, model and logits over the first ``bs`` requests and ``rows`` rows of the buffers: what a graph
        captures (host lengths only eagerly, for a backend that plans on the host)."""
        ctx = self.inputs.context(self.backend, self.block_table, bs, rows, q_len, seq_lens_host, q_lens_host)
        hidden = self.model(self.inputs.ids[:rows], ctx)
        self.hidden[:rows].copy_(hidden)
        return self.model.compute_logits(hidden)


class MTPDraftStep:
    def __init__(self, mtp, verify: VerifyStep, num_tokens: int, page_size: int, first_scratch_page: int,
                 scratch_per_slot: int):
        """``first_scratch_page``: the MTP cache's first scratch page, ``scratch_per_slot`` of them for each batch slot
        (the chained passes' positions past the request's pages)."""
        self.mtp, self.verify, self.k, self.page_size = mtp, verify, num_tokens, page_size
        self.first_scratch_page, self.scratch_per_slot = first_scratch_page, scratch_per_slot
        max_batch, max_pages = verify.block_table.shape
        device = verify.block_table.device
        self.first = _Rows(max_batch * verify.max_q_len, max_batch, device)
        self.hidden_rows = torch.zeros(max_batch * verify.max_q_len, dtype=torch.int64, device=device)
        self.last_rows = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.chained = [_Rows(max_batch, max_batch, device) for _ in range(num_tokens - 1)]
        self.chain_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.graphs = LazyGraphs() if verify.graphs is not None else None

    def draft(self, reqs: Sequence, positions: Sequence[int], q_lens: Sequence[int],
              emitted: Sequence[Sequence[int]], rooms: Sequence[int]) -> list[list[int]]:
        """The drafts of each request for its next step, after a verify step of ``q_lens`` rows a request (its first
        at ``positions[b]``) that emitted ``emitted[b]``: up to ``rooms[b]`` tokens."""
        B, Q, ps, scratch = len(reqs), max(q_lens), self.page_size, self.verify.scratch_slot
        ids, first_positions, slots, hidden_rows, m = [], [], [], [], []
        for req, start, offset, out in zip(reqs, positions, itertools.accumulate(q_lens, initial=0), emitted):
            ids += out
            first_positions += range(start, start + len(out))
            slots += [slot_of(req, p, ps) for p in range(start, start + len(out))]
            hidden_rows += range(offset, offset + len(out))
            m.append(len(out))
        pad = _Padding(self.verify.buckets, B, len(ids), Q)
        seq_lens = [start + n for start, n in zip(positions, m)]
        self.first.fill(pad.rows_of(ids, 0), pad.rows_of(first_positions, 0), pad.rows_of(slots, scratch),
                        pad.requests_of(m, 1), pad.requests_of(seq_lens, 0))
        self.hidden_rows[: pad.rows].copy_(torch.tensor(pad.rows_of(hidden_rows, 0)), non_blocking=True)
        self.last_rows[: pad.bs].copy_(torch.tensor(pad.requests_of(list(itertools.accumulate(m)), 1)) - 1,
                                       non_blocking=True)
        width = self.chain_table.shape[1]
        # the chained passes' pages: each request's own, then its batch slot's scratch pages
        chain_pages: list[list[int]] = []
        if self.k > 1:
            table = torch.zeros(B, width, dtype=torch.int32)
            for b, req in enumerate(reqs):
                first = self.first_scratch_page + b * self.scratch_per_slot
                chain_pages.append(req.pages + list(range(first, first + self.scratch_per_slot)))
                row = chain_pages[-1][:width]
                table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
            self.chain_table[:B].copy_(table, non_blocking=True)
        chain_lens = []
        for j, rows in enumerate(self.chained, start=2):  # pass j: position P + j - 1, P a request's last first row
            at, lens, chain_slots = [], [], []
            for b, (start, n, room) in enumerate(zip(positions, m, rooms)):
                p = start + n + j - 2
                active = j <= room
                at.append(p if active else 0)
                lens.append(p + 1 if active else 1)
                chain_slots.append(chain_pages[b][p // ps] * ps + p % ps if active else scratch)
            # the token of a chained row is the previous pass's draft, on the device: the ids buffer goes unread
            rows.fill([0] * pad.bs, pad.requests_of(at, 0), pad.requests_of(chain_slots, scratch), [1] * pad.bs,
                      pad.requests_of(lens, 0))
            chain_lens.append(lens)
        if self.graphs is None:
            drafts = self.forward(pad.bs, pad.rows, Q, seq_lens, m, chain_lens)
        else:
            drafts = self.graphs.replay((pad.bs, Q), functools.partial(self.forward, pad.bs, pad.rows, Q))
        return [row[:room] for row, room in zip(drafts[:B].tolist(), rooms)]

    def forward(self, bs: int, rows: int, q_len: int, seq_lens_host: list[int] | None = None,
                q_lens_host: list[int] | None = None, chain_lens_host: list[list[int]] | None = None
                ) -> torch.Tensor:
        """The first pass over ``rows`` rows and the chained passes, over the first ``bs`` requests: each request's k
        drafts [bs, k] (what a graph captures; host lengths only eagerly)."""
        backend, first = self.verify.backend, self.first
        ctx = first.context(backend, self.verify.block_table, bs, rows, q_len, seq_lens_host, q_lens_host)
        y = self.mtp(first.ids[:rows], self.verify.hidden[self.hidden_rows[:rows]], ctx)[self.last_rows[:bs]]
        tokens = self.mtp.compute_logits(y).argmax(-1)
        drafts = [tokens]
        for c, chained in enumerate(self.chained):
            lens = None if chain_lens_host is None else chain_lens_host[c]
            ctx = chained.context(backend, self.chain_table, bs, bs, 1, lens, None if lens is None else [1] * bs)
            y = self.mtp(tokens, y, ctx)
            tokens = self.mtp.compute_logits(y).argmax(-1)
            drafts.append(tokens)
        return torch.stack(drafts, dim=1)
