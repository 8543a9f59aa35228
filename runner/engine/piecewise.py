"""Steps with prompt chunks in CUDA graphs, piece by piece: everything but the attention replayed, the attention
eager (``piecewise_cuda_graphs=true``).

A step that carries a prompt chunk beside the running decodes cannot be one graph: its chunk's metadata (the context
slices, the form it is attended in) is planned on the host every step. Run eagerly, a 4-layer DeepSeek-V3 step with a
64-token chunk beside 32 decodes took about 18 ms of host time for 7.8 ms of GPU work (docs/scheduling.md section 4):
the GPU waited on Python's launches. Here the model runs as L + 1 graphs a bucket of token counts, cut at each layer's
attention (vLLM's piecewise graphs):

    piece 0:     embedding, then layer 0 up to its attention (MLA.project: projections, RoPE, the cache write)
    attention i: eager, over the step's real tokens (MLA.attend, with the step's metadata)
    piece i + 1: layer i after its attention (o_proj, MLP or MoE), then layer i + 1 up to its attention, or the
                 final norm after the last layer

A step of T tokens replays the bucket Tb >= T: the rows past T take token 0 at position 0 and write their latent
vectors into the scratch slot; the attention reads only the first T rows, and only those leave. The pieces read and
write fixed buffers; the residual stream alternates between two, so that a piece, run twice when its graph is
captured on first use and again by the replay, computes the same thing each time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mla_runner.engine.cuda_graphs import LazyGraphs
from mla_runner.models.context import ForwardContext

# Token counts of a step that replay graphs (the fixed buffers hold the largest); steps of more tokens run eagerly,
# where a layer's GEMMs over thousands of tokens take long beside its launches
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)


class PiecewiseForward:
    def __init__(self, model, scratch_slot: int, device: torch.device, dtype: torch.dtype, graphs: bool,
                 buckets: tuple[int, ...] = TOKEN_BUCKETS):
        """``graphs``: replay the pieces (on a GPU); without, they run as they are, in the same order over the same
        buffers (the CPU tests' path)."""
        self.model, self.scratch_slot, self.buckets = model, scratch_slot, tuple(sorted(buckets))
        self.graphs = LazyGraphs() if graphs else None
        a, T = model.args, self.buckets[-1]
        attn = model.model.layers[0].self_attn
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slots = (torch.zeros(T, **i64) for _ in range(3))
        self.x = [torch.zeros(T, a.hidden_size, dtype=dtype, device=device) for _ in range(2)]
        self.q_nope = torch.zeros(T, attn.n_heads, attn.nope_dim, dtype=dtype, device=device)
        self.q_pe = torch.zeros(T, attn.n_heads, attn.rope_dim, dtype=dtype, device=device)
        self.latent = torch.zeros(T, attn.kv_lora_rank + attn.rope_dim, dtype=dtype, device=device)
        self.o = torch.zeros(T, attn.n_heads, attn.v_dim, dtype=dtype, device=device)
        self.hidden = torch.zeros(T, a.hidden_size, dtype=dtype, device=device)

    def bucket(self, num_tokens: int) -> int | None:
        """The bucket a step of ``num_tokens`` tokens replays; None past the largest (the step runs eagerly)."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The model's forward (final hidden states [T, hidden_size], after the norm) for a step of T tokens that
        fits a bucket; ``ctx`` as for ``model.forward``."""
        T = input_ids.shape[0]
        Tb = self.bucket(T)
        if Tb is None:
            raise ValueError(f"a step of {T} tokens is past the largest bucket ({self.buckets[-1]})")
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(ctx.positions)
        self.slots[:T].copy_(ctx.slot_mapping)
        self.input_ids[T:Tb].zero_()
        self.positions[T:Tb].zero_()
        self.slots[T:Tb].fill_(self.scratch_slot)
        self.o[T:Tb].zero_()  # the attention writes the first T rows only: the padding's stay finite
        layers = self.model.model.layers
        self._run((Tb, 0), lambda: self._first(Tb))
        for i, layer in enumerate(layers):
            layer.self_attn.attend(self.q_nope[:T], self.q_pe[:T], self.latent[:T], ctx, out=self.o[:T])
            self._run((Tb, i + 1), lambda i=i: self._after(Tb, i))
        return self.hidden[:T]

    def _run(self, key: tuple[int, int], piece: Callable[[], None]) -> None:
        if self.graphs is None:
            piece()
        else:
            self.graphs.replay(key, piece)

    def _piece_ctx(self, Tb: int) -> ForwardContext:
        """What ``MLA.project`` reads: the bucket's positions and slots (no metadata)."""
        return ForwardContext(positions=self.positions[:Tb], slot_mapping=self.slots[:Tb], backend=None,
                              attn_metadata=None)

    def _project(self, Tb: int, layer, x: torch.Tensor) -> None:
        rope = self.model.model.rotary_emb(self.positions[:Tb])
        q_nope, q_pe, latent = layer.attention_inputs(x, self._piece_ctx(Tb), rope)
        self.q_nope[:Tb].copy_(q_nope)
        self.q_pe[:Tb].copy_(q_pe)
        self.latent[:Tb].copy_(latent)

    def _first(self, Tb: int) -> None:
        x = self.x[0][:Tb]
        x.copy_(self.model.model.embed_tokens(self.input_ids[:Tb]))
        self._project(Tb, self.model.model.layers[0], x)

    def _after(self, Tb: int, i: int) -> None:
        """Layer i after its attention, reading the residual stream from x[i % 2] and writing x[(i + 1) % 2]; then the
        next layer's projections, or the final norm."""
        layers = self.model.model.layers
        x = self.x[(i + 1) % 2][:Tb]
        x.copy_(layers[i].after_attention(self.x[i % 2][:Tb], self.o[:Tb]))
        if i + 1 < len(layers):
            self._project(Tb, layers[i + 1], x)
        else:
            self.hidden[:Tb].copy_(self.model.model.norm(x))
