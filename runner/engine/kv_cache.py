"""The run's paged latent KV cache: how many pages fit, and one pool that every attention layer's cache is a slice
of, in the run's layout (``mla_runner.kernels.kv_cache``)."""
from __future__ import annotations

from typing import Optional

import torch

from mla_runner.kernels.kv_cache import KVCacheLayout, write_latent


def kv_cache_pages(wanted: int, bytes_per_page: int, free_bytes: Optional[int], fraction: float) -> int:
    """Pages of the KV cache with ``num_pages`` unset: ``wanted`` (max_batch_size full-length requests), capped where
    the device's free memory is known (a GPU, once the weights are loaded) by ``fraction`` of it; ``bytes_per_page``
    over all layers, from the cache's layout, so an FP8 layout fits 1152 / 576 = 2x (``fp8``) or 1152 / 656 = 1.76x
    (``fp8_ds_mla``) the pages of a bf16 cache."""
    if free_bytes is None:
        return wanted
    return min(wanted, int(free_bytes * fraction) // bytes_per_page)


class KVCache:
    """``num_pages`` pages the block manager hands out and one more, whose slots CUDA-graph padding writes: each main
    layer's [num_pages + 1, page_size, width] slice (``cache``), then the MTP layer's (``mtp_cache``) with
    ``mtp_scratch_pages`` after it for its chained drafts. With the ``fp8`` layout, one per-tensor scale per layer on
    the device (``scales``: a new value needs no graph recapture)."""

    def __init__(self, layout: KVCacheLayout, num_layers: int, num_mtp_layers: int, num_pages: int, page_size: int,
                 mtp_scratch_pages: int, scale: float, device: torch.device):
        L, M, pages = num_layers, num_mtp_layers, num_pages + 1
        self.layout, self.page_size = layout, page_size
        self.pool = layout.allocate(L * pages + M * (pages + mtp_scratch_pages), page_size, device)
        self.cache = self.pool[: L * pages].view(L, pages, page_size, layout.width)
        self.mtp_cache = self.pool[L * pages :] if M else None
        self.scales = (torch.full((L + M,), scale, dtype=torch.float32, device=device)
                       if layout.kind == "fp8" else None)
        self.scratch_slot = num_pages * page_size

    @property
    def layers(self) -> list[torch.Tensor]:
        """Each attention layer's cache [pages, page_size, width]: the main layers', then the MTP layer's."""
        return [*self.cache, *([] if self.mtp_cache is None else [self.mtp_cache])]

    def attach(self, attention_layers) -> None:
        """Give each attention layer (the main ones, then the MTP one) its cache, layout and scale."""
        for i, (attn, cache) in enumerate(zip(attention_layers, self.layers)):
            attn.kv_cache, attn.kv_layout = cache, self.layout
            attn.kv_scale = self.scales[i : i + 1] if self.scales is not None else None

    def describe(self) -> dict:
        """The cache's figures for ``result.json``: bytes a token over all layers, GiB."""
        return {"kv_bytes_per_token": self.layout.bytes_per_token * len(self.layers),
                "kv_cache_gib": round(self.pool.numel() * self.pool.element_size() / 2**30, 3)}

    def randomize(self, dtype: torch.dtype) -> None:
        """Fill every page of every layer with N(0, 1) latent vectors, written in the cache's layout (for benchmarks
        that decode over a context they did not prefill; ``normal_()`` of a bf16 cache)."""
        layout, chunk = self.layout, 1 << 16
        for i, cache in enumerate(self.layers):
            if not layout.is_fp8:
                cache.normal_()
                continue
            rows = cache.shape[0] * self.page_size
            scale = self.scales[i : i + 1] if self.scales is not None else None
            for start in range(0, rows, chunk):
                slots = torch.arange(start, min(start + chunk, rows), device=cache.device)
                latent = torch.randn(len(slots), layout.dim, device=cache.device, dtype=dtype)
                write_latent(cache, latent, slots, layout, scale)
