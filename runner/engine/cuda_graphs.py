"""The decode step (metadata build, model, logits) captured in CUDA graphs, one per batch-size bucket.

Buckets are 1, 2, 4, 8, then multiples of 16 up to ``max_batch_size``; they are captured largest first
into one shared memory pool, reading the engine's persistent decode buffers. A step of B requests replays
the smallest bucket >= B with the unused slots padded: seq_len 0 (the attention writes nothing for them),
token 0 at position 0, and their latent vector written into a scratch slot no request owns.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mla_runner.kernels.cuda_graph import capture


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    def __init__(self, step: Callable[[int], torch.Tensor], max_batch_size: int, progress: bool = True):
        """``step(bs)`` runs one decode step over the first ``bs`` slots of the decode buffers and returns
        its logits; it must neither synchronize nor allocate outside the graph's pool."""
        self.buckets = batch_buckets(max_batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in tqdm(sorted(self.buckets, reverse=True), desc="capturing CUDA graphs", disable=not progress,
                       leave=False):
            graph, self.logits[bs] = capture(functools.partial(step, bs), pool=pool)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def replay(self, batch_size: int) -> torch.Tensor:
        """Logits of the first ``batch_size`` slots; the caller has padded the slots up to ``bucket``."""
        bs = self.bucket(batch_size)
        self.graphs[bs].replay()
        return self.logits[bs][:batch_size]
