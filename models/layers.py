"""Small building blocks: RMSNorm, the SwiGLU MLP, and the vocabulary-parallel embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mla_runner.models.parallel import Parallel


class RMSNorm(nn.Module):
    """Normalized in fp32 (bf16 sums of squares over 7168 channels lose digits), scaled in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers, every routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VocabParallelEmbedding(nn.Embedding):
    """Rank r holds rows [r*V/W, (r+1)*V/W) of the table: each rank looks up the ids in its range, zeros for the
    rest, and the sum over ranks is the full lookup. A plain ``nn.Embedding`` at world size 1."""

    def __init__(self, vocab_size: int, hidden_size: int, par: Parallel = Parallel()) -> None:
        super().__init__(par.part(vocab_size), hidden_size)
        self.par, self.start = par, par.span(vocab_size)[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.world == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.par.all_reduce(rows.masked_fill(outside[:, None], 0))
