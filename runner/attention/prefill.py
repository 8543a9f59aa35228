"""The metadata of a step's prompt chunks (``mla_runner.models.context.PrefillMetadata``), built once per step and
read by every MLA layer's non-absorbed attention.

A chunk of P new tokens of a request with C tokens already in the cache (earlier chunks, a prefix-cache hit, a
preempted request coming back) attends causally to its own tokens, and to all C cached ones. The cached ones are
gathered from the latent cache and up-projected by every layer, so they are cut into slices whose up-projected keys
and values fit a bounded workspace: slice k holds, of every request, its context tokens [k * w, (k + 1) * w), with
w the workspace's tokens shared evenly among the requests that have context (whole pages). The slots of each slice
are computed on the device from the block table.
"""
from __future__ import annotations

import torch

from mla_runner.models.context import ContextChunk, PrefillMetadata

# Up-projected context keys and values of one slice, in bytes (k_nope and v of every head): 1 GiB is 16k tokens at
# 128 heads in bf16 (256 values per head per token).
CONTEXT_WORKSPACE_BYTES = 1 << 30


def context_chunk_tokens(num_heads: int, kv_width: int, itemsize: int, page_size: int,
                         workspace_bytes: int = CONTEXT_WORKSPACE_BYTES) -> int:
    """Context tokens per slice: what fits the workspace at ``kv_width`` (nope + v) values per head, whole pages."""
    tokens = workspace_bytes // (num_heads * kv_width * itemsize)
    return max(page_size, tokens // page_size * page_size)


def build_prefill_metadata(q_lens: list[int], context_lens: list[int], block_table: torch.Tensor, page_size: int,
                           chunk_tokens: int) -> PrefillMetadata:
    """The step's P prompt chunks: request b has ``q_lens[b]`` new tokens after ``context_lens[b]`` cached ones,
    its pages in row b of ``block_table`` [P, max_pages] (on the device); context slices of at most ``chunk_tokens``
    tokens."""
    device = block_table.device
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    meta = PrefillMetadata(num_tokens=cu_q[-1], cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                           max_q_len=max(q_lens))
    with_context = sum(c > 0 for c in context_lens)
    if not with_context:
        return meta
    width = max(page_size, chunk_tokens // with_context // page_size * page_size)
    rows = torch.arange(len(q_lens), device=device)
    for start in range(0, max(context_lens), width):
        counts = [min(max(c - start, 0), width) for c in context_lens]
        total = sum(counts)
        cu_k = [0]
        for n in counts:
            cu_k.append(cu_k[-1] + n)
        cu_k_dev = torch.tensor(cu_k, dtype=torch.int32, device=device)
        owner = torch.repeat_interleave(rows, torch.tensor(counts, device=device), output_size=total)
        pos = torch.arange(total, device=device) - cu_k_dev[owner] + start
        slots = block_table[owner, pos // page_size].long() * page_size + pos % page_size
        meta.context.append(ContextChunk(slots=slots, cu_seqlens_k=cu_k_dev))
    return meta
