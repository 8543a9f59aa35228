"""The decode step (metadata build, model, logits) captured in CUDA graphs, one per batch-size bucket, and
``LazyGraphs``, graphs captured the first time a step needs them (speculative steps: engine/spec_steps.py).

Buckets are 1, 2, 4, 8, then multiples of 16 up to ``max_batch_size``; they are captured largest first
into one shared memory pool, reading the engine's persistent decode buffers. A step of B requests replays
the smallest bucket >= B with the unused slots padded: seq_len 0 (the attention writes nothing for them),
token 0 at position 0, and their latent vector written into a scratch slot no request owns.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

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


class LazyGraphs:
    """Graphs captured on first use, one per key, into one memory pool; what a captured call returned stays alive (in
    the pool), so later captures never reuse its memory. A capture runs the call twice (warm-up and capture) on what
    the step's buffers hold: the step must write nothing but what a replay writes."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def replay(self, key: Hashable, step: Callable[[], Any]) -> Any:
        """Replay the graph of ``key`` (capturing ``step`` first if it has none); what the captured call returned."""
        if key not in self._graphs:
            graph, out = capture(step, pool=self._pool)
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out
