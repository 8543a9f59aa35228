"""The engine: a model, its paged latent KV cache, a scheduler and the step loop.

Each step is a prefill of newly admitted requests or a decode of every running request. Prefill goes
through the torch reference attention (any correct path will do there); decode goes through the
configured backend with metadata built once per step by the configured strategy, shared by every layer.
Decode inputs live in persistent buffers sized once for ``max_batch_size``, so the positions the layers
read are the step's input buffer itself.

Under torchrun every rank runs this same engine over its shard of the model (runner/distributed.py): its
own heads' backend and metadata, the whole latent cache, the same scheduler steps; CUDA graphs capture the
step with its collectives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from models.context import ForwardContext
from models.parallel import layout_problem
from runner.attention import StepMetadata, TorchAttention, make_backend
from runner.block_manager import BlockManager, BlockTable
from runner.checkpoint import ModelSource
from runner.config import RunConfig
from runner.cuda_graphs import DecodeGraphs
from runner.distributed import setup
from runner.errors import ConfigError, UserError
from runner.metadata import make_metadata_builder
from runner.request import Request
from runner.sampling import SamplingParams, sample
from runner.scheduler import Scheduler

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A stop string that first shows up at a step ends in the text of that step's token, so each step decodes only the
# last (longest stop string's length + STOP_WINDOW) generated tokens to look for one (tokens that decode to no
# character of their own, byte pieces of one character, are what the margin is for); the whole output is decoded
# once, when one shows, to cut it. Decoding the whole output every step cost O(output) a step per request.
STOP_WINDOW = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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
    def allocate(cls, max_batch: int, max_pages_per_seq: int, device: torch.device) -> "DecodeBuffers":
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


class Engine:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.par, self.device = setup(cfg.parallel, resolve_device(cfg.device))
        self.progress = cfg.progress and self.par.rank == 0
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)
        self.source = ModelSource.resolve(cfg.model)
        self.args = self.source.args
        problem = layout_problem(self.args, self.par)
        if problem is not None:
            raise ConfigError(f"model={cfg.model.name} cannot be split over {self.par.world} processes: {problem}")
        heads = self.par.part(self.args.num_attention_heads)  # this rank's attention heads
        if cfg.max_model_len > self.args.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={cfg.max_model_len} is larger than the model's "
                f"max_position_embeddings={self.args.max_position_embeddings}"
            )
        kv_lora_rank = self.args.kv_lora_rank
        self.backend = make_backend(cfg.attention.name, self.device, kv_lora_rank, heads, cfg.page_size)
        self.prefill_backend = TorchAttention(kv_lora_rank)
        use_graphs = self._use_cuda_graphs()  # checked before the weights load: a bad combination fails fast
        self.fp8 = self.source.use_fp8(cfg.weights, self.device)

        self.model = self.source.load(self.dtype, self.device, self.progress, fp8=self.fp8, par=self.par)
        self.tokenizer = self.source.tokenizer()
        eos = self.args.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

        self.page_size = cfg.page_size
        self.max_pages_per_seq = -(-cfg.max_model_len // cfg.page_size)
        latent_dim = kv_lora_rank + self.args.qk_rope_head_dim
        attention_layers = self.model.attention_layers
        bytes_per_page = len(attention_layers) * cfg.page_size * latent_dim * self.dtype.itemsize
        num_pages = cfg.num_pages or self.par.agree(self._default_num_pages(bytes_per_page), self.device)
        if num_pages < self.max_pages_per_seq:
            raise ConfigError(
                f"the KV cache holds {num_pages * cfg.page_size} tokens ({num_pages} pages), fewer than "
                f"max_model_len={cfg.max_model_len}: raise num_pages or kv_cache_memory_fraction, or lower "
                "max_model_len"
            )
        # One page more than the block manager hands out: CUDA-graph padding slots write their latent there.
        self.kv_cache = torch.zeros(
            len(attention_layers), num_pages + 1, cfg.page_size, latent_dim, dtype=self.dtype, device=self.device
        )
        self.scratch_slot = num_pages * cfg.page_size
        for attn, cache in zip(attention_layers, self.kv_cache):
            attn.kv_cache = cache
        self.blocks = BlockManager(num_pages, cfg.page_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_batch_size, max_prefill_tokens=max(cfg.max_model_len, 2048))
        self.buffers = DecodeBuffers.allocate(cfg.max_batch_size, self.max_pages_per_seq, self.device)
        self.block_table = BlockTable(cfg.max_batch_size, self.max_pages_per_seq)
        self.metadata = make_metadata_builder(
            cfg.metadata,
            num_heads=heads,
            max_batch=cfg.max_batch_size,
            max_pages_per_seq=self.max_pages_per_seq,
            page_size=cfg.page_size,
            kv_lora_rank=kv_lora_rank,
            rope_dim=self.args.qk_rope_head_dim,
            device=self.device,
        )
        self.graphs = DecodeGraphs(self._decode_forward, cfg.max_batch_size, self.progress) if use_graphs else None

    def _default_num_pages(self, bytes_per_page: int) -> int:
        """Pages for max_batch_size full-length requests, capped on a GPU by the configured fraction of the
        memory left free by the weights."""
        wanted = self.cfg.max_batch_size * self.max_pages_per_seq
        if self.device.type != "cuda":
            return wanted
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(wanted, int(free * self.cfg.kv_cache_memory_fraction) // bytes_per_page)

    def _use_cuda_graphs(self) -> bool:
        """Graphs wherever they can work; ``cuda_graphs=true`` where they cannot is a config error."""
        cfg = self.cfg
        reasons = []
        if self.device.type != "cuda":
            reasons.append("device=cuda")
        if cfg.metadata.strategy != "persistent":
            reasons.append("metadata=persistent (per_step builds its metadata on the host and runs eager)")
        if cfg.attention.name not in ("triton", "flashmla"):
            reasons.append(f"attention=triton or flashmla (attention={cfg.attention.name} reads lengths on the host)")
        if cfg.cuda_graphs and reasons:
            raise ConfigError(f"cuda_graphs=true needs {' and '.join(reasons)}")
        return not reasons if cfg.cuda_graphs is None else cfg.cuda_graphs

    # ----------------------------------------------------------------------------------------- requests
    def make_request(self, index: int, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: Optional[str] = None) -> Request:
        """A request, or a ``UserError`` saying why this prompt cannot run (nothing is queued then)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise UserError(f"prompt {index} is empty")
        if n >= self.cfg.max_model_len:
            raise UserError(
                f"prompt {index} has {n} tokens, max_model_len={self.cfg.max_model_len} leaves no room to generate"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise UserError(f"prompt {index} has token id {bad[0]} outside the vocabulary (size {self.args.vocab_size})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        return Request(index, prompt, list(prompt_token_ids), params, generator)

    def run(self, requests: Iterable[Request], on_finish: Callable[[Request], None] | None = None,
            progress: bool | None = None) -> list[Request]:
        """Run requests to completion, all batched together; returns them in the order given."""
        requests = list(requests)
        for req in requests:
            self.scheduler.add(req)
        show = self.progress if progress is None else progress and self.par.rank == 0
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not show or not requests, leave=False)
        start, generated = time.perf_counter(), 0
        with torch.inference_mode():
            while self.scheduler.has_work():
                finished, n_new = self.step()
                generated += n_new
                for req in finished:
                    bar.update(1)
                    if on_finish is not None:
                        on_finish(req)
                bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
        return requests

    # --------------------------------------------------------------------------------------------- step
    def step(self) -> tuple[list[Request], int]:
        """One prefill or decode step; returns the requests it finished and the tokens it generated."""
        batch, is_prefill = self.scheduler.schedule()
        logits = self._prefill(batch) if is_prefill else self._decode(batch)
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch]).tolist()
        now = time.perf_counter()
        finished = []
        for req, token in zip(batch, tokens):
            req.output_token_ids.append(token)
            req.first_token_time = req.first_token_time or now
            if self._check_finished(req):
                req.finish_time = now
                self.scheduler.finish(req)
                finished.append(req)
        return finished, len(batch)

    def _prefill(self, batch: list[Request]) -> torch.Tensor:
        """Write the latent vectors of every token of each request; logits of each request's last token."""
        ids, positions, slots, qo_indptr, seq_lens = [], [], [], [0], []
        for req in batch:
            n = req.num_tokens
            ids.extend(req.token_ids)
            positions.extend(range(n))
            slots.extend(self._slot(req, p) for p in range(n))
            qo_indptr.append(qo_indptr[-1] + n)
            seq_lens.append(n)
            req.num_cached = n
        device = self.device
        block_table = torch.zeros(len(batch), self.max_pages_per_seq, dtype=torch.int32)
        for i, req in enumerate(batch):
            block_table[i, : len(req.pages)] = torch.tensor(req.pages, dtype=torch.int32)
        meta = StepMetadata(
            qo_indptr=torch.tensor(qo_indptr, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_table=block_table.to(device),
        )
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            backend=self.prefill_backend,
            attn_metadata=meta,
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=device), ctx)
        last = torch.tensor(qo_indptr[1:], device=device) - 1
        return self.model.compute_logits(hidden[last])

    def _decode(self, batch: list[Request]) -> torch.Tensor:
        """One new token per request through the configured backend and metadata strategy."""
        B = len(batch)
        seq_lens = [req.num_cached + 1 for req in batch]
        buf = self.buffers
        buf.input_ids[:B].copy_(torch.tensor([req.last_token_id for req in batch]), non_blocking=True)
        buf.positions[:B].copy_(torch.tensor([req.num_cached for req in batch]), non_blocking=True)
        buf.slot_mapping[:B].copy_(torch.tensor([self._slot(req, req.num_cached) for req in batch]), non_blocking=True)
        buf.seq_lens[:B].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        buf.block_table[:B].copy_(self.block_table.update(batch), non_blocking=True)
        for req in batch:
            req.num_cached += 1
        if self.graphs is None:
            return self._decode_forward(B, seq_lens_host=seq_lens)
        bs = self.graphs.bucket(B)
        buf.input_ids[B:bs].zero_()
        buf.positions[B:bs].zero_()
        buf.slot_mapping[B:bs].fill_(self.scratch_slot)
        buf.seq_lens[B:bs].zero_()
        return self.graphs.replay(B)

    def _decode_forward(self, bs: int, seq_lens_host: Optional[list[int]] = None) -> torch.Tensor:
        """Metadata, model and logits over the first ``bs`` decode slots: the part CUDA graphs capture."""
        buf = self.buffers
        meta = self.metadata.build(
            buf.seq_lens[:bs], buf.qo_indptr[: bs + 1], buf.block_table[:bs],
            seq_lens_host=seq_lens_host, q_lens_host=None if seq_lens_host is None else [1] * bs,
        )
        meta = self.backend.plan(meta, q_len=1)
        ctx = ForwardContext(
            positions=buf.positions[:bs], slot_mapping=buf.slot_mapping[:bs], backend=self.backend, attn_metadata=meta
        )
        return self.model.compute_logits(self.model(buf.input_ids[:bs], ctx))

    def _slot(self, req: Request, position: int) -> int:
        return req.pages[position // self.page_size] * self.page_size + position % self.page_size

    def _check_finished(self, req: Request) -> bool:
        """Set the finish reason and final text of a request that is done; False while it goes on."""
        params, token = req.params, req.output_token_ids[-1]
        cut = self._cut_at_stop_string(req) if params.stop else None
        if not params.ignore_eos and token in self.eos_token_ids:
            req.finish_reason = "stop"
        elif cut is not None:
            req.finish_reason, req.text = "stop", cut
            return True
        elif len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= self.cfg.max_model_len:
            req.finish_reason = "length"
        else:
            return False
        req.text = self.detokenize(req.output_token_ids)
        return True

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of generated tokens ('' for a model without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _cut_at_stop_string(self, req: Request) -> Optional[str]:
        """The text before the first stop string, if the text so far contains one (checked every step, so only
        the newest tokens need decoding: see STOP_WINDOW)."""
        stops = [s for s in req.params.stop if s]
        if not stops:
            return None
        tail = self.detokenize(req.output_token_ids[-(max(map(len, stops)) + STOP_WINDOW):])
        if not any(s in tail for s in stops):
            return None
        text = self.detokenize(req.output_token_ids)
        cuts = [text.find(s) for s in stops if s in text]
        return text[: min(cuts)] if cuts else None
