"""Tensor / expert parallelism: which slice of each tensor a rank holds, and the collectives that join them.

One table (``SPLIT_DIM``) says which dimension of each projection is split across ranks: column parallel
(output rows split: q_b_proj / q_proj and kv_b_proj by heads, MLP gate/up by intermediate channels, the
embedding and lm_head by vocabulary) or row parallel (input columns split: o_proj by heads, down_proj by
intermediate channels). Everything else is replicated (norms, q_a_proj, kv_a_proj_with_mqa, the router): the
latent KV cache is shared by all heads, so every rank computes and stores all of it. Routed experts are either
whole on one rank (``moe="ep"``: rank r holds experts [r*E/W, (r+1)*E/W)) or split like an MLP (``moe="tp"``).

Every rank holds a contiguous 1/world of a split dimension, so its shard of a weight is ``w[start:stop]`` or
``w[:, start:stop]``, which torch tensors and safetensors' lazy slices (``get_slice``) both support: a rank
reads only its rows or columns from disk. At world size 1 every helper is the identity and no collective runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch

MOE_MODES = ("ep", "tp")
T = TypeVar("T")

# Module name (its last part) -> the weight dimension split across ranks: 0 column parallel, 1 row parallel.
SPLIT_DIM = {
    "q_proj": 0, "q_b_proj": 0, "kv_b_proj": 0, "o_proj": 1,
    "gate_proj": 0, "up_proj": 0, "down_proj": 1,
    "embed_tokens": 0, "lm_head": 0,
}
_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Parallel:
    """This process's place in the tensor-parallel group; ``Parallel()`` is a single process."""

    rank: int = 0
    world: int = 1
    moe: str = "ep"  # ep: whole experts spread over ranks; tp: every expert split like a dense MLP

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world or self.moe not in MOE_MODES:
            raise ValueError(f"bad parallel layout: rank {self.rank} of {self.world}, moe={self.moe!r}")

    def part(self, n: int) -> int:
        """This rank's share of ``n`` items (``layout_problem`` has checked that world divides n)."""
        return n // self.world

    def span(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of ``n`` items."""
        k = self.part(n)
        return self.rank * k, (self.rank + 1) * k

    def owned_experts(self, n_experts: int) -> range:
        """Global ids of the routed experts this rank holds."""
        return range(*self.span(n_experts)) if self.moe == "ep" else range(n_experts)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (identity at world size 1). Every rank ends with the same bits."""
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [N, n] concatenated along the last dimension in rank order: [N, world * n]."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.contiguous())  # the list form: every backend and torch version
        return torch.cat(parts, dim=-1)

    def agree(self, value: int, device: torch.device, largest: bool = False) -> int:
        """The smallest (or ``largest``) of every rank's host-side ``value``: for sizes that must be equal on
        all ranks (KV pages), or the slowest rank's share of work."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        op = torch.distributed.ReduceOp
        torch.distributed.all_reduce(t, op=op.MAX if largest else op.MIN)
        return int(t.item())

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank: for what rank 0 alone reads from its disk."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def layout_problem(args: Any, par: Parallel) -> Optional[str]:
    """Why the model (``ModelArgs``) cannot be split over ``par.world`` ranks; None when it can."""
    sizes = {"num_attention_heads": args.num_attention_heads, "intermediate_size": args.intermediate_size,
             "vocab_size": args.vocab_size,
             "moe_intermediate_size * n_shared_experts": args.moe_intermediate_size * args.n_shared_experts}
    sizes.update({"n_routed_experts": args.n_routed_experts} if par.moe == "ep"
                 else {"moe_intermediate_size": args.moe_intermediate_size})
    for name, n in sizes.items():
        if n % par.world:
            return f"{name}={n} is not divisible by the world size {par.world}"
    return None


def shard_dim(name: str, par: Parallel) -> Optional[int]:
    """The dimension of tensor ``name`` (a weight or its ``weight_scale_inv``) split across ranks; None when
    every rank that holds it holds all of it."""
    if par.world == 1 or (par.moe == "ep" and _EXPERT.match(name)):
        return None
    module, _, attr = name.rpartition(".")
    return SPLIT_DIM.get(module.rpartition(".")[2]) if attr.startswith("weight") else None


def foreign_expert(name: str, par: Parallel, n_experts: int) -> bool:
    """A routed expert's tensor that another rank holds (expert parallel): never read here."""
    m = _EXPERT.match(name)
    return m is not None and int(m.group(1)) not in par.owned_experts(n_experts)


def index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    """The index of rows (dim 0) or columns (dim 1) [start, stop)."""
    return (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))


def read_shard(src: Any, shape: tuple[int, ...], dim: Optional[int], par: Parallel) -> torch.Tensor:
    """This rank's shard of a tensor of full ``shape``; ``src`` is a tensor or a safetensors slice."""
    return src[:] if dim is None else src[index(dim, *par.span(shape[dim]))]


def read_fp8_shard(w_src: Any, s_src: Any, shape: tuple[int, ...], dim: Optional[int], par: Parallel,
                   block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[slice, ...]]]:
    """This rank's shard of an FP8 weight of full ``shape`` with its block scales: (weight, scale, crop).

    When the shard starts and ends on block boundaries (the real models at TP <= 8), weight and scale are the
    shard's own and ``crop`` is None. Otherwise the whole blocks that cover it are read and ``crop`` is the
    shard's place in their dequantized product: ``dequantize_fp8_block(weight, scale)[crop]``.
    """
    if dim is None:
        return w_src[:], s_src[:], None
    start, stop = par.span(shape[dim])
    b = block[dim]
    lo, hi = start // b * b, min(-(-stop // b) * b, shape[dim])
    w, s = w_src[index(dim, lo, hi)], s_src[index(dim, lo // b, -(-hi // b))]
    return w, s, None if (lo, hi) == (start, stop) else index(dim, start - lo, stop - lo)


def fp8_aligned(name: str, local_shape: tuple[int, ...], par: Parallel, block: tuple[int, int]) -> bool:
    """Whether every rank's shard of weight ``name`` falls on block boundaries (so it can stay in FP8)."""
    dim = shard_dim(name, par)
    return dim is None or local_shape[dim] % block[dim] == 0
