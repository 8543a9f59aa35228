"""The prompt chunks' metadata (mla_runner.attention.prefill): offsets of the new tokens, and context slices whose
slots are each request's cached positions in order, bounded by the workspace, in whole pages."""
from __future__ import annotations

import torch

from mla_runner.attention.prefill import build_prefill_metadata, context_chunk_tokens


def test_context_slices_cover_each_requests_cached_positions_in_order():
    page = 4
    q_lens, context = [3, 5, 2, 7], [0, 13, 4, 30]
    gen = torch.Generator().manual_seed(0)
    block_table = torch.randperm(64, generator=gen)[:4 * 8].view(4, 8).to(torch.int32)
    meta = build_prefill_metadata(q_lens, context, block_table, page, chunk_tokens=16)
    assert meta.num_tokens == 17 and meta.max_q_len == 7
    assert meta.cu_seqlens_q.tolist() == [0, 3, 8, 10, 17]
    # 16 tokens shared by the 3 requests with context: 5 each, rounded down to whole pages (4)
    width = 4
    assert len(meta.context) == -(-30 // width)
    seen = [[] for _ in q_lens]
    for i, chunk in enumerate(meta.context):
        cu = chunk.cu_seqlens_k.tolist()
        assert cu[-1] == chunk.slots.numel() <= 16
        for b in range(len(q_lens)):
            n = cu[b + 1] - cu[b]
            assert n == min(max(context[b] - i * width, 0), width)
            seen[b].extend(chunk.slots[cu[b]:cu[b + 1]].tolist())
    for b, C in enumerate(context):
        expect = [int(block_table[b, p // page]) * page + p % page for p in range(C)]
        assert seen[b] == expect


def test_no_context_no_slices_and_the_workspace_sets_the_width():
    meta = build_prefill_metadata([4, 1], [0, 0], torch.zeros(2, 3, dtype=torch.int32), 16, chunk_tokens=1024)
    assert meta.context == [] and meta.cu_seqlens_q.tolist() == [0, 4, 5]
    # 1 GiB of bf16 keys and values at 128 heads of 256: 16384 tokens; never below one page
    assert context_chunk_tokens(128, 256, 2, 64) == 16384
    assert context_chunk_tokens(128, 256, 2, 64, workspace_bytes=1000) == 64
