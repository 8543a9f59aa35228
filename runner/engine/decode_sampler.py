"""Sampling of decode steps from persistent buffers, in a CUDA graph where the decode step itself is one.

A step of one token per request writes its requests' settings and draw keys into buffers sized once for
``max_batch_size`` (two copies to the device: ``SamplingTensors.host_rows``) and runs ``sampler.choose`` on them,
so the tokens are the same as ``sampler.sample``'s for the same logits. Where the model's decode step is a graph
replay, ``choose`` is one too: one graph per (batch bucket, ``Steps``), captured the first time a step needs it,
into a memory pool of its own, reading the bucket's logits where the model's graph leaves them. A greedy batch
without penalties copies nothing and replays an argmax.

Penalties read each request's output counts and prompt mask from [max_batch_size + 1, vocab] tables on the device
(allocated at the first penalized request: 5 bytes a vocabulary entry a row): a penalized request holds a row, built
from its token ids when it has none or when its row is behind its output (steps sampled elsewhere: with prompt
chunks, with drafts), then counted forward inside the step (the sampled token's count + 1). Other requests, and
the bucket's padding slots, point at the last row, whose contents nothing reads (their settings are neutral).

Steps this does not take (``takes``) go through ``sampler.sample``: a request that asks for logprobs (copied to the
host as they are made) or is under its ``min_tokens`` (its stop ids masked).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mla_runner.engine.request import Request
from mla_runner.engine.sampler import DrawKeys, SamplingTensors, Steps, choose
from mla_runner.kernels.cuda_graph import capture
from mla_runner.sampling import SamplingParams

PADDING = SamplingParams(temperature=0)  # the settings of a bucket's padding slots


class DecodeSampler:
    def __init__(self, max_batch: int, vocab_size: int, device: torch.device):
        self.max_batch, self.vocab_size, self.device = max_batch, vocab_size, device
        self.floats = torch.zeros(max_batch, 6, dtype=torch.float32, device=device)
        self.ints = torch.zeros(max_batch, 4, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.scratch_row = max_batch
        self.count_rows = torch.full((max_batch,), max_batch, dtype=torch.int64, device=device)
        self.counts: torch.Tensor | None = None  # [max_batch + 1, V] int32: each row's output counts
        self.in_prompt: torch.Tensor | None = None  # [max_batch + 1, V] bool
        self._rows: dict[int, int] = {}  # request id -> its row
        self._counted: dict[int, int] = {}  # request id -> how many of its outputs its row counts
        self._graphs: dict[tuple[int, Steps], tuple[torch.cuda.CUDAGraph, int]] = {}  # -> graph, its logits' address
        self._pool = None

    @staticmethod
    def takes(reqs: Sequence[Request]) -> bool:
        return all(r.params.logprobs is None and len(r.output_token_ids) >= r.params.min_tokens for r in reqs)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def sample(self, logits: torch.Tensor, reqs: Sequence[Request], seeds: Sequence[int], graph: bool) -> list[int]:
        """The next token of each request (``takes(reqs)``) from ``logits`` [bs, V] fp32, bs >= len(reqs) (the rows
        after them: padding); ``graph``: replay a graph per (bs, steps), ``logits`` being the same tensor every time
        for a bs (a decode graph's output)."""
        B, bs = len(reqs), logits.shape[0]
        params = [r.params for r in reqs]
        steps = Steps.of(params, self.vocab_size)
        if steps.penalties and self.counts is None:
            self.counts = torch.zeros(self.max_batch + 1, self.vocab_size, dtype=torch.int32, device=self.device)
            self.in_prompt = torch.zeros(self.max_batch + 1, self.vocab_size, dtype=torch.bool, device=self.device)
        run = functools.partial(self._choose, logits, steps)
        replay = None
        if graph:
            replay = self._graph(bs, steps, run, logits)  # captured before the buffers are filled: see _graph
        if steps.sampled or steps.penalties:
            positions = [len(r.output_token_ids) for r in reqs] + [0] * (bs - B)
            floats, ints = SamplingTensors.host_rows(params + [PADDING] * (bs - B),
                                                     DrawKeys(list(seeds) + [0] * (bs - B), positions),
                                                     self.vocab_size)
            self.floats[:bs].copy_(floats, non_blocking=True)
            self.ints[:bs].copy_(ints, non_blocking=True)
        if steps.penalties:
            self._fill_count_rows(reqs, bs)
        if replay is not None:
            replay()
        else:
            run()
        tokens = self.tokens[:B].tolist()
        for r in reqs:
            if r.params.penalized:
                self._counted[r.request_id] += 1
        return tokens

    def release(self, req: Request) -> None:
        """Free a finished request's row."""
        self._rows.pop(req.request_id, None)
        self._counted.pop(req.request_id, None)

    def _choose(self, logits: torch.Tensor, steps: Steps) -> None:
        bs = logits.shape[0]
        if not (steps.sampled or steps.penalties):
            self.tokens[:bs].copy_(logits.argmax(dim=-1))
            return
        t = SamplingTensors.of(self.floats[:bs], self.ints[:bs])
        counts = in_prompt = rows = None
        if steps.penalties:
            rows = self.count_rows[:bs]
            counts, in_prompt = self.counts[rows], self.in_prompt[rows]
        tokens, _ = choose(logits, t, steps, counts, in_prompt)
        self.tokens[:bs].copy_(tokens)
        if steps.penalties:
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def _graph(self, bs: int, steps: Steps, run, logits: torch.Tensor):
        """The replay of (bs, steps)' graph, captured now if it is not yet. Capturing runs ``choose`` twice (warm-up
        and capture) on whatever the buffers hold, with every slot pointing at the scratch row, so no request's
        counts move."""
        key = (bs, steps)
        if key not in self._graphs:
            self.count_rows[:bs].fill_(self.scratch_row)
            g, _ = capture(run, pool=self._pool)
            self._pool = g.pool()
            self._graphs[key] = (g, logits.data_ptr())
        g, address = self._graphs[key]
        if address != logits.data_ptr():
            raise RuntimeError(f"the sampler graph of batch {bs} reads another logits tensor than it was captured on")
        return g.replay

    def _fill_count_rows(self, reqs: Sequence[Request], bs: int) -> None:
        """Point each penalized request at its row (taking one, and building it from its token ids, where it has
        none or its row is behind its output), the others at the scratch row."""
        ids = {r.request_id for r in reqs}
        rows = []
        for r in reqs:
            if not r.params.penalized:
                rows.append(self.scratch_row)
                continue
            row = self._rows.get(r.request_id)
            if row is None:
                row = self._rows[r.request_id] = self._free_row(ids)
                self.in_prompt[row].zero_()
                self.in_prompt[row, torch.tensor(r.prompt_token_ids, device=self.device)] = True
                self._counted[r.request_id] = -1
            if self._counted[r.request_id] != len(r.output_token_ids):
                self.counts[row].zero_()
                if r.output_token_ids:
                    out = torch.tensor(r.output_token_ids, device=self.device)
                    self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                self._counted[r.request_id] = len(r.output_token_ids)
            rows.append(row)
        rows += [self.scratch_row] * (bs - len(reqs))
        self.count_rows[:bs].copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)

    def _free_row(self, batch_ids: set[int]) -> int:
        """A row no request holds, else one held by a request outside this batch (a preempted or waiting one: it
        rebuilds its row when it comes back); a batch holds at most max_batch requests, so there is one."""
        used = set(self._rows.values())
        free = next((row for row in range(self.max_batch) if row not in used), None)
        if free is not None:
            return free
        owner = next(rid for rid in self._rows if rid not in batch_ids)
        self._counted.pop(owner, None)
        return self._rows.pop(owner)
