"""Random MLA decode problems (a paged latent cache with shuffled pages, queries, lengths and q_lens) for the
benchmark task, the benchmarks and the tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Problem:
    q: torch.Tensor  # [T, H, D]
    kv_cache: torch.Tensor  # [num_pages, page, D]
    seq_lens: torch.Tensor  # [B] int32
    qo_indptr: torch.Tensor  # [B+1] int32
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens_host: list[int]
    q_lens_host: list[int]
    max_pages: int


def make_problem(seq_lens: list[int], q_lens: list[int], num_heads: int, page_size: int, *,
                 kv_lora_rank: int = 512, rope_dim: int = 64, dtype=torch.bfloat16, device="cpu",
                 max_pages: int | None = None, extra_pages: int = 3, seed: int = 0,
                 nan_tail: bool = False) -> Problem:
    """Random q and cache; the pages of all requests shuffled over a pool with spare pages.

    Block-table entries past a request's pages hold -1 (must never be read). ``nan_tail`` fills the rows
    past each request's length in its last page with NaN (unwritten cache rows may hold anything).
    """
    g = torch.Generator().manual_seed(seed)
    B, D = len(seq_lens), kv_lora_rank + rope_dim
    need = [-(-L // page_size) for L in seq_lens]
    max_pages = max_pages or max(max(need), 1)
    num_pages = sum(need) + extra_pages
    dev = torch.device(device)
    # the cache (the one big tensor) is drawn where it lives: benchmarks make gigabytes of it
    kv = torch.randn(num_pages, page_size, D, generator=torch.Generator(dev).manual_seed(seed), device=dev,
                     dtype=dtype)
    perm = torch.randperm(num_pages, generator=g)
    bt = torch.full((B, max_pages), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[at:at + n].int()
        at += n
        if nan_tail and n and seq_lens[b] % page_size:
            kv[int(bt[b, n - 1]), seq_lens[b] % page_size:] = float("nan")
    qo = [0]
    for n in q_lens:
        qo.append(qo[-1] + n)
    q = torch.randn(qo[-1], num_heads, D, generator=g).to(dtype)
    return Problem(q=q.to(dev), kv_cache=kv, seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                   qo_indptr=torch.tensor(qo, dtype=torch.int32, device=dev), block_table=bt.to(dev),
                   seq_lens_host=list(seq_lens), q_lens_host=list(q_lens), max_pages=max_pages)
