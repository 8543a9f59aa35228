"""Eager steps with prompt chunks (docs/scheduling.md): the step's requests of one new token of their own first (plain
decodes, or a last token and its drafts), through the backend's absorbed attention, then the prompt chunks, in the
form ``EagerStep.chunk_metadata`` picks; logits at every token of the first ones and at each chunk's last token.

Plain decodes come from the model runner's decode buffers (its ``decode_part``), with the decode step's metadata;
decodes with drafts (speculative decoding) from host lists, through the backend's ``build_chunk_metadata``
(per-request q_len, each causal over its own tokens after its cached ones).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from mla_runner.attention import AttentionBackend, StepInputs
from mla_runner.attention.prefill import absorbed_is_cheaper, build_prefill_metadata
from mla_runner.engine.piecewise import PiecewiseForward
from mla_runner.engine.request import Request
from mla_runner.engine.scheduler import ScheduledBatch
from mla_runner.models.context import ForwardContext, PrefillMetadata


def slot_of(req: Request, position: int, page_size: int) -> int:
    """The cache slot of the request's token at ``position``."""
    return req.pages[position // page_size] * page_size + position % page_size


def verify_rows(reqs: list[Request], num_new: list[int], page_size: int
                ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids, positions and cache slots of requests that feed their last token and their drafts (``num_new`` =
    1 + d, d = 0 for a plain decode), and each request's KV length after them."""
    ids, positions, slots, seq_lens = [], [], [], []
    for req, n in zip(reqs, num_new):
        start = req.num_computed
        ids += [req.token_at(start), *req.draft_token_ids[: n - 1]]
        positions += range(start, start + n)
        slots += [slot_of(req, p, page_size) for p in range(start, start + n)]
        seq_lens.append(start + n)
    return ids, positions, slots, seq_lens


class EagerStep:
    def __init__(self, model, backend: AttentionBackend, page_size: int, context_chunk_tokens: int,
                 device: torch.device, decode_part: Callable[[list[Request]], tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, Any]]):
        """``context_chunk_tokens``: the cached tokens a non-absorbed chunk attends at a time; ``decode_part(reqs)``:
        the plain decodes' token ids, positions, slots (device tensors) and metadata."""
        self.model, self.backend, self.args = model, backend, model.args
        self.page_size, self.context_chunk_tokens, self.device = page_size, context_chunk_tokens, device
        self.decode_part = decode_part
        # set by the model runner where graphs run and piecewise_cuda_graphs is on: steps of up to its largest bucket
        # replay its pieces
        self.piecewise: PiecewiseForward | None = None

    def logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [rows, vocab] at every token of the first ``num_decode`` requests and at each chunk's last token,
        and the final hidden states [T, hidden_size] of the step's tokens in batch order."""
        D, device, size = batch.num_decode, self.device, self.page_size
        chunks, q_lens = batch.requests[D:], batch.num_new[D:]
        metadata = None
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        first_ids = first_positions = first_slots = empty
        if batch.has_drafts:
            (first_ids, first_positions, first_slots), metadata = self._verify_inputs(batch.requests[:D],
                                                                                      batch.num_new[:D])
        elif D:
            first_ids, first_positions, first_slots, metadata = self.decode_part(batch.requests[:D])
        T = first_ids.shape[0]
        ids, positions, slots = [first_ids], [first_positions], [first_slots]
        prefill = None
        if chunks:
            block_table = torch.zeros(len(chunks), max(len(r.pages) for r in chunks), dtype=torch.int32)
            for i, (req, n) in enumerate(zip(chunks, q_lens)):
                start = req.num_computed
                pages = torch.tensor(req.pages, dtype=torch.int64)
                block_table[i, : len(req.pages)] = pages.to(torch.int32)
                pos = torch.arange(start, start + n)
                ids.append(torch.tensor(req.token_ids[start : start + n]))
                positions.append(pos)
                slots.append(pages[pos // size] * size + pos % size)
            prefill = self.chunk_metadata(q_lens, [r.num_computed for r in chunks], block_table.to(device))
        on_device = [t.to(device, non_blocking=True) for t in (*ids[1:], *positions[1:], *slots[1:])]
        P = len(chunks)
        ctx = ForwardContext(positions=torch.cat([positions[0], *on_device[P : 2 * P]]),
                             slot_mapping=torch.cat([slots[0], *on_device[2 * P :]]),
                             backend=self.backend, attn_metadata=metadata, prefill=prefill)
        input_ids = torch.cat([ids[0], *on_device[:P]])
        if self.piecewise is not None and self.piecewise.bucket(input_ids.shape[0]) is not None:
            hidden = self.piecewise.forward(input_ids, ctx)
        else:
            hidden = self.model(input_ids, ctx)
        last = list(range(T)) + [T + end - 1 for end in itertools.accumulate(q_lens)]
        return self.model.compute_logits(hidden[torch.tensor(last, device=device)]), hidden

    def _verify_inputs(self, reqs: list[Request], num_new: list[int]
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], Any]:
        """``verify_rows`` on the device, and the absorbed metadata of their attention (``build_chunk_metadata``)."""
        ids, positions, slots, seq_lens = verify_rows(reqs, num_new, self.page_size)
        block_table = torch.zeros(len(reqs), max(len(r.pages) for r in reqs), dtype=torch.int32)
        for i, req in enumerate(reqs):
            block_table[i, : len(req.pages)] = torch.tensor(req.pages, dtype=torch.int32)
        i32 = dict(dtype=torch.int32, device=self.device)
        inputs = StepInputs(seq_lens=torch.tensor(seq_lens, **i32),
                            qo_indptr=torch.tensor(list(itertools.accumulate(num_new, initial=0)), **i32),
                            block_table=block_table.to(self.device), q_len=max(num_new), seq_lens_host=seq_lens,
                            q_lens_host=list(num_new))
        tensors = tuple(torch.tensor(x, dtype=torch.int64).to(self.device, non_blocking=True)
                        for x in (ids, positions, slots))
        return tensors, self.backend.build_chunk_metadata(inputs)

    def chunk_metadata(self, q_lens: list[int], context_lens: list[int], block_table: torch.Tensor
                       ) -> PrefillMetadata:
        """The step's prompt chunks: in absorbed form where the backend runs it and it takes fewer FLOPs (short chunks
        after a long context: ``absorbed_is_cheaper``), else non-absorbed with context slices."""
        a = self.args
        if self.backend.capabilities.absorbed_chunks and absorbed_is_cheaper(
                q_lens, context_lens, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim):
            seq_lens = [c + n for c, n in zip(context_lens, q_lens)]
            cu_q = list(itertools.accumulate(q_lens, initial=0))
            i32 = dict(dtype=torch.int32, device=self.device)
            inputs = StepInputs(seq_lens=torch.tensor(seq_lens, **i32), qo_indptr=torch.tensor(cu_q, **i32),
                                block_table=block_table, q_len=max(q_lens), seq_lens_host=seq_lens,
                                q_lens_host=list(q_lens))
            return PrefillMetadata(num_tokens=cu_q[-1], cu_seqlens_q=inputs.qo_indptr, max_q_len=max(q_lens),
                                   absorbed=self.backend.build_chunk_metadata(inputs))
        return build_prefill_metadata(q_lens, context_lens, block_table, self.page_size, self.context_chunk_tokens)
