"""The metadata of a step's prompt chunks (``mla_runner.models.context.PrefillMetadata``), built once per step and
read by every MLA layer, and the choice of the form they are attended in.

Short chunks after a long context are cheaper in the absorbed form, the decode form (``absorbed_is_cheaper``): it
reads the latent cache as it is, where the non-absorbed form must up-project every cached key again. Otherwise:

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

# The longest prompt chunk run in the absorbed form (its q_len * heads rows sized by it); past the FLOP crossover
# (``absorbed_is_cheaper``: about 170 tokens at long context) the non-absorbed form is cheaper anyway.
ABSORBED_MAX_Q_LEN = 256
# Up-projected context keys and values of one slice, in bytes (k_nope and v of every head): 1 GiB is 16k tokens at
# 128 heads in bf16 (256 values per head per token).
CONTEXT_WORKSPACE_BYTES = 1 << 30


def context_chunk_tokens(num_heads: int, kv_width: int, itemsize: int, page_size: int,
                         workspace_bytes: int = CONTEXT_WORKSPACE_BYTES) -> int:
    """Context tokens per slice: what fits the workspace at ``kv_width`` (nope + v) values per head, whole pages."""
    tokens = workspace_bytes // (num_heads * kv_width * itemsize)
    return max(page_size, tokens // page_size * page_size)


def absorbed_is_cheaper(q_lens: list[int], context_lens: list[int], kv_lora_rank: int, rope_dim: int,
                        nope_dim: int, v_dim: int) -> bool:
    """Whether prompt chunks of ``q_lens`` new tokens after ``context_lens`` cached ones take fewer FLOPs in the
    absorbed form than in the non-absorbed one, all together (per head, the work both forms share left out: the
    projections of the new tokens).

    Per query-key pair the absorbed form costs 2 (kv_lora_rank + rope + kv_lora_rank) FLOPs (1088 at DeepSeek-V3's
    widths), the non-absorbed form 2 (nope + rope + v) (320), but it up-projects each cached key first, 2 kv_lora_rank
    (nope + v) (262144): a chunk of n tokens after c cached ones is cheaper absorbed when 768 * n * (c + (n + 1) / 2)
    < 262144 * c, about n < 170 at long context, never without context."""
    if max(q_lens) > ABSORBED_MAX_Q_LEN:
        return False
    pair_extra = 2 * (2 * kv_lora_rank + rope_dim) - 2 * (nope_dim + rope_dim + v_dim)
    up_project = 2 * kv_lora_rank * (nope_dim + v_dim)
    pairs = sum(n * c + n * (n + 1) // 2 for n, c in zip(q_lens, context_lens))
    return pair_extra * pairs < up_project * sum(context_lens)


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
