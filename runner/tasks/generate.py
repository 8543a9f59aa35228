"""``task=generate``: prompts (built-in or a file) to completions, one JSON line per prompt as each completes.

``completions.jsonl`` gets one line per prompt: its completion, or an error line (``{"index", "line", "error"}``)
for a prompt that cannot run (a bad line of the prompts file, a prompt longer than the context); the other prompts
run. A prompt that asks for ``n`` samples (a prompts-file field) gets n lines, each with its ``sample`` (0 to
n - 1). Each line is appended with one write call, so a run killed at any moment leaves whole lines only. An
existing file is never overwritten: ``task.resume=true`` (with ``hydra.run.dir`` set to the earlier run) runs only
the prompts and samples that have no line yet and appends theirs. ``task.seed`` gives every prompt its own seed,
derived from the task's seed and the prompt's index, so a prompt samples the same tokens whatever else runs beside
it, in one run or across a resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

from mla_runner.config import RunConfig
from mla_runner.engine import LLMEngine
from mla_runner.engine.distributed import rank
from mla_runner.engine.request import Request
from mla_runner.errors import Interrupted, UserError
from mla_runner.prompts import BUILTIN_PROMPTS, PromptSpec, encode, encode_chat, read_prompt_file
from mla_runner.sampling import Logprob, SamplingParams

log = logging.getLogger(__name__)
SHOWN = 8  # completions printed; all of them are in the output file
ALL_SAMPLES = -1  # previous_lines' sample of a prompt's error line


def run_generate(cfg: RunConfig, output_dir: Path, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Generate for every prompt; the metrics are a summary (requests, errors, tokens, seconds, tokens/s)."""
    task = cfg.task
    specs = read_prompt_file(task.prompts) if task.prompts else [PromptSpec(prompt=p) for p in BUILTIN_PROMPTS]
    writer = rank() == 0  # under torchrun every rank generates the same tokens; rank 0 writes and prints them
    output_path = output_dir / task.output
    done = previous_lines(output_path, task.resume) if writer else set()
    engine = LLMEngine(cfg)
    done = engine.par.broadcast(done)  # every rank runs the same prompts
    defaults = SamplingParams(temperature=task.temperature, top_p=task.top_p, top_k=task.top_k,
                              max_tokens=task.max_tokens, stop=list(task.stop))
    with CompletionsFile(output_path if writer else None, append=task.resume) as out:
        requests, errors, samples = [], 0, {}
        for i, spec in enumerate(specs):
            if (i, ALL_SAMPLES) in done:
                continue
            try:
                if spec.error is not None:
                    raise UserError(spec.error)
                todo = [r for r in _requests(engine, i, spec, defaults, task) if (i, r.sample_index) not in done]
                samples[i] = spec.sampling.get("n", 1)
                requests += todo
            except UserError as e:
                errors += 1
                if writer:
                    log.warning("prompt %d skipped: %s", i, e)
                out.write({"index": i, "line": spec.line, "error": str(e)})
        start = time.perf_counter()
        if cfg.profile and writer:
            engine.runner.profile(output_dir / "trace.json")
        try:
            engine.run(requests, on_finish=lambda req: out.write(_result(req, samples[req.index])),
                       should_stop=should_stop)
        except Interrupted as e:
            summary = summarize(requests, errors, start)
            raise Interrupted(f"{e}: their lines are in {output_path}; continue with task.resume=true "
                              f"hydra.run.dir={output_dir}", summary) from None
        finally:
            engine.runner.end_profile()
    summary = {**summarize(requests, errors, start), **engine.stats()}
    outcome = {"metrics": summary, "resolved": engine.runner.resolved}
    if not writer:
        return outcome
    for req in requests[:SHOWN]:
        log.info("[%d] %r -> %r", req.index, req.prompt, req.text)
    if len(requests) > SHOWN:
        log.info("... and %d more in %s", len(requests) - SHOWN, output_path)
    resumed = f" ({len({i for i, _ in done})} prompts done by the earlier run)" if done else ""
    log.info("%d requests (%d errors)%s in %.2f s: %d prompt tokens (%.0f%% from the prefix cache), %s tokens/s; "
             "%d output tokens, %s tokens/s; time to first token %s s (mean / median / p99), time per output token "
             "%s s  ->  %s", len(requests), errors, resumed, summary["seconds"], summary["prompt_tokens"],
             100 * summary["prefix_cache_hit_rate"], summary["prompt_tokens_per_s"], summary["generated_tokens"],
             summary["tokens_per_s"], _triple(summary, "ttft_s"), _triple(summary, "tpot_s"), output_path)
    if "mean_acceptance_length" in summary:
        rates = [summary[f"acceptance_rate_{j}"] for j in range(1, cfg.speculative.num_tokens + 1)]
        log.info("speculative=%s: mean acceptance length %s over %d verify steps (tokens a step emits per request "
                 "that drafted); acceptance rate per draft position %s", cfg.speculative.method,
                 summary["mean_acceptance_length"], summary["num_verify_steps"],
                 ", ".join("-" if r is None else f"{r:.3f}" for r in rates))
    if cfg.model.path is None:
        log.info("note: %s has random weights, so its text is noise; a real checkpoint: mla-runner "
                 "model=deepseek_v3 model.path=/path/to/DeepSeek-V3", cfg.model.name)
    return outcome


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a task seeded with ``seed``: the same whatever else runs with it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _requests(engine: LLMEngine, index: int, spec: PromptSpec, defaults: SamplingParams, task) -> list[Request]:
    try:
        params = replace(defaults, **spec.sampling)
    except (TypeError, ValueError, UserError) as e:  # a value SamplingParams refuses
        raise UserError(f"line {spec.line}: {e}" if spec.line else str(e)) from None
    if "seed" not in spec.sampling and task.seed is not None:
        params = replace(params, seed=request_seed(task.seed, index))
    prompt = spec.prompt
    if spec.messages is not None:
        prompt, ids = encode_chat(engine.tokenizer, spec.messages)
    else:
        ids = spec.prompt_token_ids if prompt is None else encode(engine.tokenizer, prompt, task.chat)
    return engine.make_requests(index, ids, params, prompt)


def summarize(requests: list[Request], errors: int, start: float) -> dict:
    """The run's figures over its finished requests: counts, prompt and output tokens and their rates, and the
    mean / median / p99 of the time to the first token and of the time per output token after it (over requests
    with more than one output token)."""
    finished = [r for r in requests if r.finish_reason is not None]
    tokens = sum(len(r.output_token_ids) for r in finished)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in finished)
    elapsed = time.perf_counter() - start
    ttft = [r.first_token_time - r.arrival_time for r in finished]
    tpot = [(r.finish_time - r.first_token_time) / (len(r.output_token_ids) - 1)
            for r in finished if len(r.output_token_ids) > 1]
    rate = (lambda n: round(n / elapsed, 2)) if elapsed > 0 else (lambda n: None)
    return {"requests": len(requests), "finished": len(finished), "errors": errors, "generated_tokens": tokens,
            "prompt_tokens": prompt_tokens, "seconds": round(elapsed, 3), "tokens_per_s": rate(tokens),
            "prompt_tokens_per_s": rate(prompt_tokens), **_stats("ttft_s", ttft), **_stats("tpot_s", tpot)}


def _stats(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {f"{name}_mean": round(statistics.fmean(values), 5), f"{name}_median": round(statistics.median(values), 5),
            f"{name}_p99": round(p99, 5)}


def _triple(summary: dict, name: str) -> str:
    if f"{name}_mean" not in summary:
        return "-"
    return " / ".join(f"{summary[f'{name}_{k}']:.4g}" for k in ("mean", "median", "p99"))


def _result(req: Request, n: int) -> dict:
    """A completion's line (with its ``sample`` where its prompt asks for ``n`` > 1); with logprobs asked,
    ``cumulative_logprob`` and ``logprobs`` (per token, vLLM's {token id: Logprob} as {"id": {"logprob", "rank",
    "token"}}), with prompt logprobs, ``prompt_logprobs`` alike (the first null)."""
    row = {
        "index": req.index,
        **({"sample": req.sample_index} if n > 1 else {}),
        "prompt": req.prompt,
        "text": req.text,
        "token_ids": req.output_token_ids,
        "finish_reason": req.finish_reason,
        "stop_reason": req.stop_reason,
        "prompt_tokens": len(req.prompt_token_ids),
        "cached_prompt_tokens": req.num_cached_tokens,
        "time_to_first_token_s": round(req.first_token_time - req.arrival_time, 4),
        "latency_s": round(req.finish_time - req.arrival_time, 4),
    }
    if req.logprobs is not None:
        row["cumulative_logprob"] = req.cumulative_logprob
        row["logprobs"] = [_logprobs_json(entry) for entry in req.logprobs]
    if req.prompt_logprobs is not None:
        row["prompt_logprobs"] = [_logprobs_json(entry) for entry in req.prompt_logprobs]
    return row


def _logprobs_json(entry: Optional[dict[int, Logprob]]) -> Optional[dict[str, dict]]:
    if entry is None:
        return None
    return {str(t): {"logprob": p.logprob, "rank": p.rank, "token": p.decoded_token} for t, p in entry.items()}


def previous_lines(path: Path, resume: bool) -> set[tuple[int, int]]:
    """The (prompt index, sample) pairs an earlier run's completions file already has a line for (none without a
    file; an error line gives (index, ``ALL_SAMPLES``): the prompt is done, whatever its ``n``). Without
    ``resume`` an existing file is an error: it is never overwritten. A last line cut short (no newline: a writer
    that was killed mid-line) is removed, so that its prompt runs again."""
    if not path.exists():
        return set()
    if not resume:
        raise UserError(f"{path} exists: task.resume=true continues that run, or choose another hydra.run.dir")
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        log.warning("%s: removing its last line, cut short by an interrupted write", path)
        os.truncate(path, whole)
    done = set()
    for n, line in enumerate(data[:whole].splitlines(), 1):
        try:
            row = json.loads(line)
            done.add((int(row["index"]), ALL_SAMPLES if "error" in row else int(row.get("sample", 0))))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a line of a completions file") from None
    return done


class CompletionsFile:
    """The completions file, appended one whole line per write call (``path`` None: a rank that writes nothing)."""

    def __init__(self, path: Optional[Path], append: bool):
        self.path, self.append, self.fd = path, append, None

    def __enter__(self) -> CompletionsFile:
        if self.path is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if self.append else os.O_EXCL)
            self.fd = os.open(self.path, flags, 0o644)
        return self

    def write(self, row: dict) -> None:
        if self.fd is None:
            return
        data = (json.dumps(row) + "\n").encode()
        while data:  # one call writes a whole line to a regular file; a short write (disk full) goes on
            data = data[os.write(self.fd, data):]

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
