"""The engine loop: requests in, outputs out.

It checks each prompt, makes its requests (one per sample: ``n``), queues them, asks the scheduler for each step's
batch (decodes and chunks of prompts under one token budget), hands the batch to the model runner and books the
results: how many tokens of each request are cached (and offered to the prefix cache), its sampled token with the log
probabilities it asks for, and whether it is done (EOS, a stop id, a stop string, ``max_tokens``, the context). It
holds no tensor: the model, its cache and the step's buffers are the model runner's.

With speculative decoding each request that goes on decoding drafts up to ``speculative.num_tokens`` tokens at the end
of a step: ``ngram`` by prompt lookup over its prompt and output, on the host; ``mtp`` by the MTP layer, on the device
in the model runner's step, which hands the drafts back with the step's tokens. The next step verifies them and the
request emits 1 to d + 1 tokens, each booked as a sampled one is, up to the one that finishes it
(docs/speculative.md#4-the-engine).

Under torchrun every rank runs this same loop over its shard of the model (``mla_runner.engine.distributed``): the
same scheduler steps on the same requests, its own heads' attention, the whole latent cache.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Optional

from tqdm.auto import tqdm

from mla_runner.attention import backend_class, resolve_name
from mla_runner.attention.prefill import ABSORBED_MAX_Q_LEN
from mla_runner.config import RunConfig, SpeculativeConfig, check_speculative
from mla_runner.engine.block_manager import BlockManager
from mla_runner.engine.checkpoint import ModelSource
from mla_runner.engine.distributed import setup
from mla_runner.engine.drafters import draft_room, ngram_propose
from mla_runner.engine.model_runner import ModelRunner, resolve_device
from mla_runner.engine.request import Request
from mla_runner.engine.sampler import TokenLogprobs
from mla_runner.engine.scheduler import Scheduler
from mla_runner.errors import ConfigError, Interrupted, UserError
from mla_runner.models.config import parse_token_ids
from mla_runner.models.parallel import layout_problem
from mla_runner.sampling import Logprob, SamplingParams

log = logging.getLogger(__name__)
# A stop string that first shows up at a step ends in the text of that step's token, so each step decodes only the
# last (longest stop string's length + STOP_WINDOW) generated tokens to look for one (tokens that decode to no
# character of their own, byte pieces of one character, are what the margin is for); the whole output is decoded
# once, when one shows, to cut it.
STOP_WINDOW = 8
# Under torchrun the ranks agree on a stop (one all-reduce of an int) every this many steps, so that all of them
# stop at the same step.
STOP_CHECK_STEPS = 8


class StepDone(NamedTuple):
    finished: list[Request]  # requests the step finished
    output_tokens: int  # tokens it generated
    prompt_tokens: int  # tokens it prefilled (a preempted request's outputs included)


def check_speculative_engine(cfg: RunConfig, device) -> None:
    """What the engine can verify, before any weights load: drafts through a backend that attends q_len > 1 in
    absorbed form."""
    spec: SpeculativeConfig = cfg.speculative
    if spec.method == "none":
        return
    cls = backend_class(resolve_name(cfg.attention.name, device.type), cfg.metadata.strategy)
    if not cls.capabilities.absorbed_chunks:
        raise ConfigError(f"speculative={spec.method} verifies drafts with q_len > 1 in absorbed form, which "
                          f"{cls.label()} does not run: use attention=triton or attention=torch")
    if spec.num_tokens + 1 > ABSORBED_MAX_Q_LEN:
        raise ConfigError(f"speculative.num_tokens={spec.num_tokens}: a verify step of 1 + {spec.num_tokens} tokens "
                          f"per request is longer than the {ABSORBED_MAX_Q_LEN} the absorbed path runs")


def _rate(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 4)


class LLMEngine:
    def __init__(self, cfg: RunConfig, fit_max_model_len: bool = False):
        """``fit_max_model_len`` (``LLM(max_model_len=None)``, vLLM's default): ``cfg.max_model_len`` is replaced by
        the model's max_position_embeddings, lowered to what the KV cache holds (and to max_num_batched_tokens
        without chunked prefill)."""
        self.par, device = setup(cfg.parallel, resolve_device(cfg.device))
        self.progress = cfg.progress and self.par.rank == 0
        source = ModelSource.resolve(cfg.model)
        self.args = args = source.args
        problem = layout_problem(args, self.par)
        if problem is not None:
            raise ConfigError(f"model={cfg.model.name} cannot be split over {self.par.world} processes: {problem}")
        check_speculative(cfg.speculative, args.has_mtp, cfg.model.name)
        check_speculative_engine(cfg, device)
        if fit_max_model_len:
            fit = args.max_position_embeddings
            cfg = dataclasses.replace(cfg, max_model_len=fit if cfg.enable_chunked_prefill else
                                      min(fit, cfg.max_num_batched_tokens))
        if cfg.max_model_len > args.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={cfg.max_model_len} is larger than the model's "
                f"max_position_embeddings={args.max_position_embeddings}"
            )
        self.generation_config = source.generation_config()
        self.eos_token_ids = set(args.eos_token_ids)
        # generation_config.json's EOS ids beyond config.json's end a request as stop ids do (vLLM's
        # generation_config="auto"), except under ignore_eos
        self.extra_eos_ids = set(parse_token_ids(self.generation_config.get("eos_token_id"),
                                                 f"{source.path}/generation_config.json: field 'eos_token_id'"))
        self.extra_eos_ids -= self.eos_token_ids
        self.runner = ModelRunner(cfg, source, self.par, device, self.progress,
                                  eos_token_ids=sorted(self.eos_token_ids | self.extra_eos_ids),
                                  fit_max_model_len=fit_max_model_len)
        if self.runner.max_model_len != cfg.max_model_len:
            cfg = dataclasses.replace(cfg, max_model_len=self.runner.max_model_len)
        self.cfg = cfg
        self.speculative = cfg.speculative if cfg.speculative.method != "none" else None
        if self.speculative is not None:
            self.runner.speculate(self.speculative)
        self.tokenizer = source.tokenizer()
        blocks = BlockManager(self.runner.num_pages, cfg.page_size, cfg.enable_prefix_caching,
                              key_next_token=cfg.speculative.method == "mtp")
        self.scheduler = Scheduler(blocks, cfg.max_batch_size, cfg.max_num_batched_tokens,
                                   cfg.enable_chunked_prefill, cfg.chunk_attention_budget)
        self._request_ids = itertools.count()
        r = self.runner.resolved
        graphs = f"on for batches {', '.join(map(str, r['graph_batch_sizes']))}" if r["cuda_graphs"] else "off"
        if r["piecewise_cuda_graphs"]:
            graphs += " and, around their attention, steps with prompt chunks"
        log.info("%s on %s: %s, weights %s, attention=%s; KV cache %s, %d bytes a token: %d pages of %d = %d tokens "
                 "(%.2f GiB); max_model_len %d; CUDA graphs %s; loaded in %.1f s", cfg.model.name, r["device"],
                 r["dtype"], r["weights"], r["attention"], r["kv_cache_dtype"], r["kv_bytes_per_token"], r["kv_pages"],
                 r["page_size"], r["kv_tokens"], r["kv_cache_gib"], cfg.max_model_len, graphs, r["load_seconds"])
        if cfg.model.depth is not None:
            log.info("model.depth=%d: layers %d-%d run over the weights of the last kept layer of their kind; the "
                     "outputs are not the model's", cfg.model.depth, cfg.model.num_layers, cfg.model.depth - 1)

    # ----------------------------------------------------------------------------------------- requests
    def make_requests(self, index: int, prompt_token_ids: list[int], params: SamplingParams,
                      prompt: Optional[str] = None) -> list[Request]:
        """The ``params.n`` requests of one prompt (vLLM's parallel sampling), or a ``UserError`` saying why it
        cannot run. Each has ``n=1``; with a seed, sample i has ``seed + i`` (as in vLLM), so that the samples differ
        and each is reproducible. Only the first computes prompt logprobs, so the others may take the prompt from
        the prefix cache."""
        if params.n == 1:
            return [self.make_request(index, prompt_token_ids, params, prompt)]
        return [self.make_request(index, prompt_token_ids, dataclasses.replace(
            params, n=1, seed=None if params.seed is None else params.seed + i,
            prompt_logprobs=params.prompt_logprobs if i == 0 else None), prompt, sample_index=i)
            for i in range(params.n)]

    def make_request(self, index: int, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: Optional[str] = None, sample_index: int = 0) -> Request:
        """A request, or a ``UserError`` saying why this prompt cannot run (nothing is queued then)."""
        n = len(prompt_token_ids)
        if params.n != 1:
            raise UserError(f"prompt {index}: n={params.n} samples make several requests: use make_requests")
        if n == 0:
            raise UserError(f"prompt {index} is empty")
        if n >= self.cfg.max_model_len:
            raise UserError(
                f"prompt {index} has {n} tokens, max_model_len={self.cfg.max_model_len} leaves no room to generate"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise UserError(f"prompt {index} has token id {bad[0]} outside the vocabulary "
                            f"(size {self.args.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.args.vocab_size:
                raise UserError(f"prompt {index}: {name}={k} is more than the vocabulary holds "
                                f"({self.args.vocab_size} tokens)")
        return Request(next(self._request_ids), index, prompt, list(prompt_token_ids), params,
                       sample_index=sample_index)

    def run(self, requests: Iterable[Request], on_finish: Callable[[Request], None] | None = None,
            progress: bool | None = None, should_stop: Callable[[], bool] | None = None) -> list[Request]:
        """Run requests to completion, all batched together; returns them in the order given.

        ``should_stop`` is asked between steps: when it says yes, the requests still running are dropped and
        ``Interrupted`` is raised (the finished ones have been handed to ``on_finish``)."""
        requests = list(requests)
        for req in requests:
            self.scheduler.add(req)
        show = self.progress if progress is None else progress and self.par.rank == 0
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not show or not requests, leave=False)
        start, prompt_tokens, output_tokens, steps = time.perf_counter(), 0, 0, 0
        while self.scheduler.has_work():
            if should_stop is not None and self._stop_agreed(should_stop(), steps):
                bar.close()
                for req in self.scheduler.abort_all():
                    self.runner.release(req)
                done = sum(r.finish_reason is not None for r in requests)
                raise Interrupted(f"stopped after {done} of {len(requests)} requests finished")
            steps += 1
            done = self.step()
            prompt_tokens += done.prompt_tokens
            output_tokens += done.output_tokens
            for req in done.finished:
                bar.update(1)
                if on_finish is not None:
                    on_finish(req)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"input {prompt_tokens / elapsed:,.0f} tok/s, output {output_tokens / elapsed:,.0f} "
                                "tok/s", refresh=False)
        bar.close()
        return requests

    def _stop_agreed(self, asked: bool, step: int) -> bool:
        """Whether every rank stops now (one process: whether a stop was asked for)."""
        if self.par.world == 1:
            return asked
        return step % STOP_CHECK_STEPS == 0 and self.par.agree(int(asked), self.runner.device, largest=True) > 0

    def stats(self) -> dict:
        """Counters since the engine started, flat scalars (the run's metrics): the share of prompt tokens admitted
        that the prefix cache held and the preemptions; with speculative decoding, the acceptance
        (``AcceptanceStats.summary``): ``mean_acceptance_length`` (tokens a verify step emits per request that
        drafted), ``acceptance_rate`` (accepted / drafted tokens), ``acceptance_rate_<j>`` for draft position j = 1..k,
        and the counts. A rate with nothing to count is None."""
        blocks = self.scheduler.blocks
        out = {"prefix_cache_hit_rate": round(blocks.hits / blocks.queries, 4) if blocks.queries else 0.0,
               "preemptions": self.scheduler.num_preemptions}
        if self.runner.verifier is not None:
            s = self.runner.verifier.stats.summary()
            drafted, accepted = s["num_draft_tokens"], s["num_accepted_tokens"]
            out["mean_acceptance_length"] = _rate(s["mean_acceptance_length"])
            out["acceptance_rate"] = _rate(accepted / drafted if drafted else math.nan)
            for j, rate in enumerate(s["acceptance_rate_per_position"], 1):
                out[f"acceptance_rate_{j}"] = _rate(rate)
            out.update(num_draft_tokens=drafted, num_accepted_tokens=accepted, num_verify_steps=s["num_verify_steps"])
        return out

    # --------------------------------------------------------------------------------------------- step
    def step(self) -> StepDone:
        """One scheduled step: the requests it finished, the tokens it generated and those it prefilled."""
        batch = self.scheduler.schedule()
        out = self.runner.execute(batch)
        now = time.perf_counter()
        finished, generated, prefilled = [], 0, 0
        blocks = self.scheduler.blocks
        for req, n, d, tokens, logprobs, prompt_logprobs, drafted in zip(batch.requests, batch.num_new,
                                                                          batch.num_drafts, *out):
            decoding = n - d == 1 and req.num_computed == req.num_tokens - 1 and req.output_token_ids
            prefilled += 0 if decoding else n
            # every token the step fed the model is in the cache now, but drafts only as far as they were accepted
            # (the slots of rejected ones are written over later): the emitted tokens less the target's own
            computed = req.num_computed + n - d + max(len(tokens) - 1, 0)
            req.draft_token_ids = []
            if prompt_logprobs:
                req.prompt_logprobs.extend(map(self._logprob_entry, prompt_logprobs))
            done = False
            for i, token in enumerate(tokens):  # through the same checks one at a time: the first that ends it wins
                generated += 1
                req.output_token_ids.append(token)
                if logprobs:
                    req.logprobs.append(self._logprob_entry(logprobs[i]))
                    req.cumulative_logprob += logprobs[i].logprob
                done = self._check_finished(req)
                if done:
                    break
            req.num_computed = min(computed, req.num_tokens)
            if d:
                blocks.trim(req, req.num_tokens)  # pages taken for rejected drafts
            blocks.cache_full_pages(req)
            if not tokens:  # a chunk of a prompt: more to come
                continue
            req.first_token_time = req.first_token_time or now
            if done:
                req.finish_time = now
                self.scheduler.finish(req)
                self.runner.release(req)
                finished.append(req)
            elif self.speculative is not None:
                req.draft_token_ids = self._propose(req, drafted)
        return StepDone(finished, generated, prefilled)

    def _propose(self, req: Request, drafted: list[int]) -> list[int]:
        """The drafts a decoding request's next step verifies: up to ``speculative.num_tokens``, fewer where its
        ``max_tokens`` or the context would end within them (``draft_room``); ``drafted``: the MTP layer's, made in
        the step."""
        spec = self.speculative
        room = draft_room(spec.num_tokens, req.params.max_tokens, len(req.output_token_ids), req.num_tokens,
                          self.cfg.max_model_len)
        if room == 0 or spec.method == "mtp":
            return drafted[:room]
        return ngram_propose(req.token_array(), room, spec.prompt_lookup_min, spec.prompt_lookup_max)

    def _logprob_entry(self, p: TokenLogprobs) -> dict[int, Logprob]:
        """vLLM's logprobs of one position: the chosen token first, then the top ones (the chosen one once)."""
        def text(token: int) -> Optional[str]:  # each token decoded alone, as vLLM does
            return None if self.tokenizer is None else self.tokenizer.decode([token])

        entry = {p.token_id: Logprob(p.logprob, p.rank, text(p.token_id))}
        for rank, (token, logprob) in enumerate(zip(p.top_ids, p.top_logprobs), 1):
            if token not in entry:
                entry[token] = Logprob(logprob, rank, text(token))
        return entry

    def _check_finished(self, req: Request) -> bool:
        """Set the finish reason, stop reason and final text of a request that is done; False while it goes on."""
        params, out = req.params, req.output_token_ids
        token = out[-1]
        if len(out) >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return self._finish(req, "stop", None, stop_token=True)
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.extra_eos_ids):
                return self._finish(req, "stop", token, stop_token=True)
            cut = self._cut_at_stop_string(req) if params.stop else None
            if cut is not None:
                req.finish_reason, req.text, req.stop_reason = "stop", *cut
                return True
        limit = params.max_tokens if params.max_tokens is not None else self.cfg.max_model_len
        if len(out) >= limit or req.num_tokens >= self.cfg.max_model_len:
            return self._finish(req, "length", None, stop_token=False)
        return False

    def _finish(self, req: Request, reason: str, stop_reason: Optional[int], stop_token: bool) -> bool:
        """Finish ``req``: its text is all of its tokens', but for the EOS or stop id that ended it (as in vLLM, the
        id stays in the output, its text only with include_stop_str_in_output)."""
        params, ids = req.params, req.output_token_ids
        if stop_token and not params.include_stop_str_in_output:
            ids = ids[:-1]
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.text = self.detokenize(ids, params.skip_special_tokens)
        return True

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of generated tokens ('' for a model without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _cut_at_stop_string(self, req: Request) -> Optional[tuple[str, str]]:
        """The final text and the stop string, if the text so far contains one (checked every step, so only the
        newest tokens need decoding: see STOP_WINDOW). The search runs on the text with special tokens kept; with
        ``min_tokens`` a stop string must end after the text of the first min_tokens - 1 tokens."""
        params, ids = req.params, req.output_token_ids
        stops = [s for s in params.stop if s]
        if not stops:
            return None
        tail = self.detokenize(ids[-(max(map(len, stops)) + STOP_WINDOW):], skip_special_tokens=False)
        if not any(s in tail for s in stops):
            return None
        text = self.detokenize(ids, skip_special_tokens=False)
        before = len(self.detokenize(ids[: params.min_tokens - 1], skip_special_tokens=False)) \
            if params.min_tokens > 1 else 0
        hits = [(at, -len(s), s) for s in stops for at in [text.find(s, max(0, before - len(s) + 1))] if at >= 0]
        if not hits:
            return None
        at, _, stop = min(hits)  # the first in the text; of two there, the longer
        end = at + len(stop) if params.include_stop_str_in_output else at
        return self._text_up_to(ids, text, end, params.skip_special_tokens), stop

    def _text_up_to(self, ids: list[int], text: str, end: int, skip_special_tokens: bool) -> str:
        """``text[:end]`` (``text``: ``ids`` decoded with special tokens kept), less its special tokens when asked:
        the longest run of whole tokens whose text fits before ``end``, decoded as asked, then the rest of the text
        up to ``end``."""
        special = set(getattr(self.tokenizer, "all_special_ids", ()))
        if not skip_special_tokens or not special.intersection(ids):
            return text[:end]
        for n in range(len(ids), -1, -1):
            head = self.detokenize(ids[:n], skip_special_tokens=False)
            if len(head) <= end and text.startswith(head):
                return self.detokenize(ids[:n], skip_special_tokens=True) + text[len(head):end]
        return text[:end]

