"""The model runner: the model on its device and everything a step needs there.

It owns the weights, the paged latent KV cache, the decode step's input buffers, the attention backend (which builds
the step's metadata), the CUDA graphs of the decode step and the sampling call. The engine loop hands it a scheduled
batch (each request with its tokens, pages, how many of its tokens are cached and how many the step computes) and gets
a sampled token back for each request whose last token the step computed; it keeps no queue and never changes a
request.

A step of one token per request (decode) writes into buffers sized once for ``max_batch_size``, so the positions the
layers read are the step's input buffer itself, and runs the configured backend, whose metadata every layer shares;
with CUDA graphs, the metadata build, the model and the logits of such a step are one graph replay per batch bucket,
and its sampling another (``engine/decode_sampler.py``, docs/sampling.md).
A step with chunks of prompts runs eager: the one-token requests first, through the same backend, then the chunks,
through the non-absorbed prefill attention with the step's ``PrefillMetadata``; logits only at each request's last
token of the step, and at every prompt position of a request that asks for prompt logprobs (made from the hidden
states, ``engine/prompt_logprobs.py``).

With speculative decoding (docs/speculative.md#4-the-engine) a request that verifies drafts feeds its last token and
its d drafts (q_len = 1 + d) and attends in absorbed form, causal over them after its cached tokens; logits at every
one of its positions, which the ``Verifier`` turns into the tokens it emits. A step of such requests and plain decodes
only (the steady state) is a ``VerifyStep`` (engine/spec_steps.py): persistent buffers, the metadata built on the
device, a graph replay per (batch bucket, q_len) with CUDA graphs. With ``speculative=mtp`` the MTP layer then drafts
each request's next tokens from the step's hidden states: an ``MTPDraftStep`` after a verify step (a graph replay
too), the ``MTPDrafter`` (engine/mtp_drafter.py, eager) after a step with prompt chunks, whose verifications run eager
too (through the backend's ``build_chunk_metadata``). The MTP layer has a slice of the paged cache of its own (same
pages and slots as the main layers).
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from mla_runner.attention import AttentionSpec, StepInputs, check_choice, make_backend
from mla_runner.attention.prefill import context_chunk_tokens
from mla_runner.config import TORCH_DTYPES, RunConfig, SpeculativeConfig
from mla_runner.engine.block_manager import BlockTable
from mla_runner.engine.checkpoint import ModelSource
from mla_runner.engine.cuda_graphs import DecodeGraphs, batch_buckets
from mla_runner.engine.decode_sampler import DecodeSampler
from mla_runner.engine.eager_step import EagerStep, slot_of, verify_rows
from mla_runner.engine.kv_cache import KVCache, kv_cache_pages
from mla_runner.engine.mtp_drafter import MTPDrafter, scratch_pages_per_slot
from mla_runner.engine.piecewise import PiecewiseForward
from mla_runner.engine.profiling import StepProfiler
from mla_runner.engine.prompt_logprobs import prompt_logprob_rows
from mla_runner.engine.prompt_logprobs import prompt_logprobs as prompt_logprobs_of
from mla_runner.engine.request import Request
from mla_runner.engine.sampler import DrawKeys, TokenLogprobs, sample
from mla_runner.engine.scheduler import ScheduledBatch
from mla_runner.engine.spec_steps import MTPDraftStep, VerifyStep
from mla_runner.engine.verifier import Verifier
from mla_runner.errors import ConfigError
from mla_runner.kernels.kv_cache import KVCacheLayout
from mla_runner.models.context import ForwardContext
from mla_runner.models.parallel import Parallel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


class StepOutput(NamedTuple):
    """What a step gives the engine, per request of its batch."""

    # the tokens it emits, in order: the sampled one, or 1 to d + 1 for a request that verified d drafts (its accepted
    # drafts, then the target's own token); none for a prompt with chunks still to come
    tokens: list[list[int]]
    logprobs: list[list[TokenLogprobs]]  # one per emitted token, where its request asks for logprobs (else none)
    prompt_logprobs: list[list[TokenLogprobs]]  # those of the prompt tokens this step made, in order, where asked
    drafts: list[list[int]]  # speculative=mtp: the MTP layer's drafts for the request's next step (else none)


@dataclass
class DecodeBuffers:
    """The decode step's inputs, allocated once at their largest size and filled in place every step."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    seq_lens: torch.Tensor  # [max_batch] int32
    qo_indptr: torch.Tensor  # [max_batch + 1] int32
    block_table: torch.Tensor  # [max_batch, max_pages_per_seq] int32

    @classmethod
    def allocate(cls, max_batch: int, max_pages_per_seq: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(max_batch, dtype=torch.int64),
            positions=zeros(max_batch, dtype=torch.int64),
            slot_mapping=zeros(max_batch, dtype=torch.int64),
            seq_lens=zeros(max_batch),
            qo_indptr=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            block_table=zeros(max_batch, max_pages_per_seq),
        )


class ModelRunner:
    verifier: Optional[Verifier] = None  # set by speculate(): steps may verify drafts
    drafter: Optional[MTPDrafter] = None  # set by speculate() with speculative=mtp: steps draft with the MTP layer
    verify_step: Optional[VerifyStep] = None  # set by speculate(): steps of decodes and verifications only
    draft_step: Optional[MTPDraftStep] = None  # set by speculate() with speculative=mtp: drafting after a verify step

    def __init__(self, cfg: RunConfig, source: ModelSource, par: Parallel, device: torch.device, progress: bool,
                 eos_token_ids: Sequence[int] = (), fit_max_model_len: bool = False):
        """``eos_token_ids``: what ``min_tokens`` masks besides a request's stop ids. ``fit_max_model_len``: lower
        ``max_model_len`` to what the KV cache holds where it holds less (``self.max_model_len``), instead of an
        error."""
        self.cfg, self.par, self.device = cfg, par, device
        self.eos_token_ids = tuple(eos_token_ids)
        self.args = args = source.args
        self.dtype = resolve_dtype(cfg.dtype, device)
        torch.manual_seed(cfg.seed)
        self.page_size = cfg.page_size
        self.max_pages_per_seq = -(-cfg.max_model_len // cfg.page_size)
        speculating = cfg.speculative.method != "none"
        try:
            layout = KVCacheLayout(cfg.kv_cache_dtype, args.kv_lora_rank, args.qk_rope_head_dim, self.dtype)
        except ValueError as e:  # the model's widths do not fit the layout
            raise ConfigError(f"kv_cache_dtype={cfg.kv_cache_dtype}: {e}") from None
        spec = AttentionSpec(num_heads=par.part(args.num_attention_heads), kv_lora_rank=args.kv_lora_rank,
                             rope_dim=args.qk_rope_head_dim, page_size=cfg.page_size, dtype=self.dtype,
                             device=device, max_batch=cfg.max_batch_size, max_pages_per_seq=self.max_pages_per_seq,
                             max_q_len=1 + cfg.speculative.num_tokens if speculating else 1,
                             kv_cache_dtype=cfg.kv_cache_dtype)
        # the backend and the graph decision come before the weights load: a combination that cannot run fails fast
        self.backend = make_backend(cfg.attention.name, cfg.metadata.strategy, spec,
                                    num_kv_splits=cfg.metadata.num_kv_splits, dram_ratio=cfg.metadata.dram_ratio)
        self.use_graphs = self._use_cuda_graphs()
        self.fp8 = source.use_fp8(cfg.weights, device)
        mtp = cfg.speculative.method == "mtp"
        start = time.perf_counter()
        self.model = source.load(self.dtype, device, progress, fp8=self.fp8, par=par, mtp=mtp)
        self.load_seconds = time.perf_counter() - start

        mtp_layers = self.model.mtp.attention_layers if mtp else []
        attention_layers = self.model.attention_layers + mtp_layers
        bytes_per_page = len(attention_layers) * cfg.page_size * layout.bytes_per_token
        self.num_pages = cfg.num_pages or par.agree(self._default_num_pages(bytes_per_page), device)
        self.max_model_len = cfg.max_model_len
        if self.num_pages < self.max_pages_per_seq and fit_max_model_len:
            self.max_model_len = self.num_pages * cfg.page_size  # the step buffers keep the width they were made with
        elif self.num_pages < self.max_pages_per_seq:
            raise ConfigError(
                f"the KV cache holds {self.num_pages * cfg.page_size} tokens ({self.num_pages} pages), fewer than "
                f"max_model_len={cfg.max_model_len}: raise num_pages or kv_cache_memory_fraction, or lower "
                "max_model_len"
            )
        M = len(mtp_layers)
        scratch = cfg.max_batch_size * scratch_pages_per_slot(cfg.speculative.num_tokens, cfg.page_size) if M else 0
        self.kv = KVCache(layout, len(self.model.attention_layers), M, self.num_pages, cfg.page_size, scratch,
                          cfg.kv_cache_scale, device)
        self.kv.attach(attention_layers)
        self.buffers = DecodeBuffers.allocate(cfg.max_batch_size, self.max_pages_per_seq, device)
        self.block_table = BlockTable(cfg.max_batch_size, self.max_pages_per_seq)
        # with MTP drafting every decode step is a verify step (the drafts need its hidden states): no decode graphs
        self.graphs = (DecodeGraphs(self._decode_forward, cfg.max_batch_size, progress)
                       if self.use_graphs and not mtp else None)
        self.eager_step = EagerStep(self.model, self.backend, cfg.page_size,
                                    context_chunk_tokens(spec.num_heads, args.qk_nope_head_dim + args.v_head_dim,
                                                         self.dtype.itemsize, cfg.page_size),
                                    device, self._decode_part)
        if self.use_graphs and cfg.piecewise_cuda_graphs:
            self.eager_step.piecewise = PiecewiseForward(self.model, self.kv.scratch_slot, device, self.dtype,
                                                         graphs=True)
        self.decode_sampler = DecodeSampler(cfg.max_batch_size, args.vocab_size, device)
        self._seeds: dict[int, int] = {}  # request id -> the seed of its draws
        self.profiler: Optional[StepProfiler] = None  # set by profile()

    def profile(self, path: Path) -> None:
        """Trace a few of the coming steps into ``path`` (see ``mla_runner.engine.profiling``); ``end_profile``
        writes what was traced when the run ends first."""
        self.profiler = StepProfiler(path, self.device)

    def end_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
            self.profiler = None

    def _traced(self, label: str):
        return self.profiler.step(label) if self.profiler is not None else contextlib.nullcontext()

    @property
    def resolved(self) -> dict[str, Any]:
        """What the run's ``auto`` settings came to, and the sizes the cache and graphs were made with."""
        dtype = str(self.dtype).removeprefix("torch.")
        attention = self.backend.label().removeprefix("attention=")  # "triton metadata=persistent", "torch"
        layout = self.kv.layout
        return {"device": str(self.device), "dtype": dtype, "attention": attention,
                "weights": "fp8" if self.fp8 else dtype,
                "kv_cache_dtype": dtype if layout.kind == "auto" else layout.kind,
                "kv_cache_scale": self.cfg.kv_cache_scale if layout.kind == "fp8" else None,
                **self.kv.describe(), "page_size": self.page_size,
                "kv_pages": self.num_pages, "kv_tokens": self.num_pages * self.page_size,
                "max_model_len": self.max_model_len, "cuda_graphs": self.use_graphs,
                "piecewise_cuda_graphs": self.eager_step.piecewise is not None,
                "graph_batch_sizes": batch_buckets(self.cfg.max_batch_size) if self.use_graphs else [],
                "load_seconds": round(self.load_seconds, 2)}

    def _default_num_pages(self, bytes_per_page: int) -> int:
        """Pages for max_batch_size full-length requests, capped on a GPU by the configured fraction of the
        memory left free by the weights (``kv_cache_pages``)."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        return kv_cache_pages(self.cfg.max_batch_size * self.max_pages_per_seq, bytes_per_page, free,
                              self.cfg.kv_cache_memory_fraction)

    def _use_cuda_graphs(self) -> bool:
        """Graphs wherever the backend's step can be captured; ``cuda_graphs=true`` where it cannot is a config
        error (checked again here, with the device resolved)."""
        cfg = self.cfg
        check_choice(cfg.attention.name, cfg.metadata.strategy, cuda_graphs=cfg.cuda_graphs, device=self.device.type)
        possible = self.device.type == "cuda" and self.backend.capabilities.cuda_graphs
        return possible if cfg.cuda_graphs is None else cfg.cuda_graphs

    @contextlib.contextmanager
    def eager(self):
        """Steps run inside without graph replays (a benchmark whose module hooks must see the step)."""
        saved = self.graphs, self.verify_step, self.draft_step, self.eager_step.piecewise
        self.graphs = self.verify_step = self.draft_step = self.eager_step.piecewise = None
        try:
            yield
        finally:
            self.graphs, self.verify_step, self.draft_step, self.eager_step.piecewise = saved

    # ----------------------------------------------------------------------------------------------- steps
    def speculate(self, spec: SpeculativeConfig) -> None:
        """Let steps verify drafts (``ScheduledBatch.num_drafts``), with ``spec``'s settings; with ``mtp``, draft
        with the MTP layer after each step (``StepOutput.drafts``)."""
        if 1 + spec.num_tokens > self.backend.spec.max_q_len:
            raise ValueError(f"speculative.num_tokens={spec.num_tokens}: the backend was made for steps of up to "
                             f"{self.backend.spec.max_q_len} tokens a request")
        self.verifier = Verifier(spec, self.device, seed=self.cfg.seed)
        if self.backend.capabilities.varlen_q:
            self.verify_step = VerifyStep(self.model, self.backend, self.buffers.block_table, 1 + spec.num_tokens,
                                          self.kv.scratch_slot, self.dtype, self.use_graphs)
        if spec.method == "mtp":
            self.drafter = MTPDrafter(self.model.mtp, self.backend, spec.num_tokens, self.page_size,
                                      self.max_model_len, self.num_pages + 1, self.eager_step.chunk_metadata)
            if self.verify_step is not None:
                self.draft_step = MTPDraftStep(self.model.mtp, self.verify_step, spec.num_tokens, self.page_size,
                                               self.num_pages + 1, self.drafter.scratch_per_slot)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run one scheduled step: the tokens of each request whose last token the step computes (the sampled one,
        or those its verified drafts give; none for the others: prompts with chunks still to come), the log
        probabilities its request asks for and, drafting with the MTP layer, each request's drafts."""
        reqs, D = batch.requests, batch.num_decode
        label = f"decode of {D} requests" if D == len(reqs) else f"step of {D} decodes, {len(reqs) - D} prompt chunks"
        if batch.has_drafts:
            label += f", {sum(batch.num_drafts)} drafts"
        prompt_rows, targets, owners = prompt_logprob_rows(batch)
        prompt_logprobs: list[list[TokenLogprobs]] = [[] for _ in reqs]
        plain = D == len(reqs) and not batch.has_drafts and self.drafter is None
        verifying = D == len(reqs) and not plain and self.verify_step is not None
        graphed = plain and self.graphs is not None
        with self._traced(label):
            if plain or verifying:
                # a prompt position's row is its request's logits row (one row a token)
                logits = self.decode_logits(reqs) if plain else self._verify_logits(reqs, batch.num_new)
                if prompt_rows:
                    index = torch.tensor(prompt_rows, device=logits.device)
                    prompt_logprobs = prompt_logprobs_of(lambda lo, hi: logits[index[lo:hi]], targets, owners, reqs,
                                                         self.device)
            else:
                logits, hidden = self.eager_step.logits(batch)
                if prompt_rows:
                    index = torch.tensor(prompt_rows, device=self.device)
                    prompt_logprobs = prompt_logprobs_of(
                        lambda lo, hi: self.model.compute_logits(hidden[index[lo:hi]]), targets, owners, reqs,
                        self.device)
            # the logits rows: every position of the first D requests (one, or 1 + d with drafts), then one per chunk
            done, rows, offset = [], [], 0
            for i, d in enumerate(batch.num_drafts):
                width = 1 + d if i < D else 1
                if batch.completes(i):
                    done.append(i)
                    rows += range(offset, offset + width)
                offset += width
            if len(rows) < offset:
                logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
            if batch.has_drafts:
                tokens, logprobs = self._verify(logits, [reqs[i] for i in done], [batch.num_drafts[i] for i in done])
            else:
                sampled, entries = (self._sample(logits, [reqs[i] for i in done], D == len(reqs), graphed) if done
                                    else ([], []))
                tokens = [[t] for t in sampled]
                logprobs = [[] if e is None else [e] for e in entries]
            out = StepOutput([[] for _ in reqs], [[] for _ in reqs], prompt_logprobs, [[] for _ in reqs])
            for i, emitted, entries in zip(done, tokens, logprobs):
                out.tokens[i], out.logprobs[i] = emitted, entries
            rooms = [self.drafter.room(r, t) for r, t in zip(reqs, out.tokens)] if self.drafter is not None else []
            if self.draft_step is not None and verifying and any(rooms):  # none: every request ends with the step
                out.drafts[:] = self.draft_step.draft(reqs, [r.num_computed for r in reqs], batch.num_new,
                                                      out.tokens, rooms)
            elif self.drafter is not None and not verifying:
                out.drafts[:] = self.drafter.draft(batch, hidden, out.tokens)
        return out

    def _verify(self, logits: torch.Tensor, batch: list[Request], num_drafts: list[int]
                ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
        """The tokens each request emits from its d + 1 logits rows (``Verifier.emit``); as ``_sample``, the copy to
        the host is the step's synchronization."""
        if self.verifier is None:
            raise RuntimeError("a step with drafts needs speculate() first")
        out = self.verifier.emit(logits, batch, num_drafts, [self._seed(r) for r in batch], self.eos_token_ids)
        self.backend.check()
        return out

    def _fill_decode_inputs(self, batch: list[Request]) -> list[int]:
        """Write one token per request (the one at its ``num_computed``) into the decode buffers; its KV lengths."""
        B = len(batch)
        seq_lens = [req.num_computed + 1 for req in batch]
        buf = self.buffers
        buf.input_ids[:B].copy_(torch.tensor([req.token_at(req.num_computed) for req in batch]), non_blocking=True)
        buf.positions[:B].copy_(torch.tensor([req.num_computed for req in batch]), non_blocking=True)
        buf.slot_mapping[:B].copy_(torch.tensor([slot_of(req, req.num_computed, self.page_size) for req in batch]),
                                   non_blocking=True)
        buf.seq_lens[:B].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        buf.block_table[:B].copy_(self.block_table.update(batch), non_blocking=True)
        return seq_lens

    def decode_logits(self, batch: list[Request]) -> torch.Tensor:
        """A step of one token per request, up to its logits [B, vocab] fp32: a graph replay where there are
        graphs."""
        B = len(batch)
        seq_lens = self._fill_decode_inputs(batch)
        if self.graphs is None:
            return self._decode_forward(B, seq_lens_host=seq_lens)
        buf = self.buffers
        bs = self.graphs.bucket(B)
        buf.input_ids[B:bs].zero_()
        buf.positions[B:bs].zero_()
        buf.slot_mapping[B:bs].fill_(self.kv.scratch_slot)
        buf.seq_lens[B:bs].zero_()
        return self.graphs.replay(B)

    def _verify_logits(self, reqs: list[Request], num_new: list[int]) -> torch.Tensor:
        """A step of decodes and verifications only, up to its logits [sum(num_new), vocab] fp32 (``VerifyStep``: a
        graph replay where there are graphs)."""
        self.buffers.block_table[: len(reqs)].copy_(self.block_table.update(reqs), non_blocking=True)
        ids, positions, slots, seq_lens = verify_rows(reqs, num_new, self.page_size)
        return self.verify_step.logits(ids, positions, slots, list(num_new), seq_lens)

    def _decode_part(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Plain decodes of an eager step, from the decode buffers: token ids, positions, slots and their metadata."""
        D, buf = len(reqs), self.buffers
        seq_lens = self._fill_decode_inputs(reqs)
        metadata = self.backend.build_metadata(StepInputs(
            seq_lens=buf.seq_lens[:D], qo_indptr=buf.qo_indptr[: D + 1], block_table=buf.block_table[:D],
            seq_lens_host=seq_lens, q_lens_host=[1] * D))
        return buf.input_ids[:D], buf.positions[:D], buf.slot_mapping[:D], metadata

    def _decode_forward(self, bs: int, seq_lens_host: list[int] | None = None) -> torch.Tensor:
        """Metadata, model and logits over the first ``bs`` decode slots: the part CUDA graphs capture (host
        lengths only in eager steps)."""
        buf = self.buffers
        inputs = StepInputs(seq_lens=buf.seq_lens[:bs], qo_indptr=buf.qo_indptr[: bs + 1],
                            block_table=buf.block_table[:bs], seq_lens_host=seq_lens_host,
                            q_lens_host=None if seq_lens_host is None else [1] * bs)
        ctx = ForwardContext(positions=buf.positions[:bs], slot_mapping=buf.slot_mapping[:bs], backend=self.backend,
                             attn_metadata=self.backend.build_metadata(inputs))
        return self.model.compute_logits(self.model(buf.input_ids[:bs], ctx))

    def _sample(self, logits: torch.Tensor, batch: list[Request], decode: bool = False, graphed: bool = False
                ) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
        """One token per request, on the device, and its logprobs where asked; the tokens' copy to the host is the
        step's synchronization, after which the backend reports a request its metadata had to drop. ``decode``: a
        step of plain decodes, which the decode sampler takes where the requests let it; ``graphed``: the logits are
        the decode graphs' (``decode_logits``), and the sampler replays a graph too."""
        seeds = [self._seed(r) for r in batch]
        if decode and DecodeSampler.takes(batch):
            if graphed:
                tokens = self.decode_sampler.sample(self.graphs.logits[self.graphs.bucket(len(batch))], batch, seeds,
                                                    graph=True)
            else:
                tokens = self.decode_sampler.sample(logits, batch, seeds, graph=False)
            self.backend.check()
            return tokens, [None] * len(batch)
        params = [r.params for r in batch]
        out = sample(logits, params, DrawKeys(seeds, [len(r.output_token_ids) for r in batch]),
                     [r.prompt_token_ids for r in batch], [r.output_token_ids for r in batch], self.eos_token_ids)
        tokens = out.tokens.tolist()
        self.backend.check()
        if out.logprobs is None:
            return tokens, [None] * len(batch)
        return tokens, out.logprobs.to_host([p.logprobs for p in params])

    def _seed(self, req: Request) -> int:
        """The seed of the request's draws: its own, else one made from the run's seed and its id (kept through
        preemption)."""
        if req.params.seed is not None:
            return req.params.seed
        seed = self._seeds.get(req.request_id)
        if seed is None:
            seed = self._seeds[req.request_id] = random.Random(f"{self.cfg.seed}:{req.request_id}").getrandbits(63)
        return seed

    def release(self, req: Request) -> None:
        """Forget a finished request's seed and sampling rows."""
        self._seeds.pop(req.request_id, None)
        self.decode_sampler.release(req)
