"""The prompt chunks' metadata (mla_runner.attention.prefill): offsets of the new tokens, and context slices whose
slots are each request's cached positions in order, bounded by the workspace, in whole pages."""
from __future__ import annotations

import torch

from mla_runner.attention.prefill import (
    ABSORBED_MAX_Q_LEN,
    absorbed_is_cheaper,
    build_prefill_metadata,
    context_chunk_tokens,
)


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


def test_absorbed_form_for_short_chunks_after_long_context_by_flop_count():
    dims = dict(kv_lora_rank=512, rope_dim=64, nope_dim=128, v_dim=128)  # DeepSeek-V3

    def flops(n, c):  # per head, the work both forms share left out
        pairs = n * c + n * (n + 1) // 2
        return 2 * (512 + 64 + 512) * pairs, 2 * (128 + 64 + 128) * pairs + 2 * 512 * (128 + 128) * c

    for q_lens, ctx in (([1], [100]), ([128], [32768]), ([170], [32768]), ([171], [32768]), ([64, 200], [8000, 500]),
                        ([16], [0]), ([64], [64])):
        absorbed, mha = (sum(f) for f in zip(*(flops(n, c) for n, c in zip(q_lens, ctx))))
        assert absorbed_is_cheaper(q_lens, ctx, **dims) == (absorbed < mha), (q_lens, ctx)
    assert absorbed_is_cheaper([128], [32768], **dims) and not absorbed_is_cheaper([171], [32768], **dims)
    assert not absorbed_is_cheaper([16], [0], **dims)  # without context never
    assert not absorbed_is_cheaper([ABSORBED_MAX_Q_LEN + 1], [10**7], **dims)  # past the longest it runs
