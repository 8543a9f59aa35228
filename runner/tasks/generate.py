"""``task=generate``: prompts (built-in or a file) to completions, one JSON line per prompt as each completes."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

from mla_runner.config import RunConfig
from mla_runner.engine import LLMEngine
from mla_runner.engine.distributed import rank
from mla_runner.engine.request import Request
from mla_runner.errors import UserError
from mla_runner.prompts import BUILTIN_PROMPTS, PromptSpec, encode, read_prompt_file
from mla_runner.sampling import SamplingParams

log = logging.getLogger(__name__)
SHOWN = 8  # completions printed; all of them are in the output file


def run_generate(cfg: RunConfig, output_dir: Path) -> dict:
    """Generate for every prompt; the metrics are a summary (requests, errors, tokens, seconds, tokens/s)."""
    task = cfg.task
    specs = read_prompt_file(task.prompts) if task.prompts else [PromptSpec(prompt=p) for p in BUILTIN_PROMPTS]
    engine = LLMEngine(cfg)
    defaults = SamplingParams(temperature=task.temperature, top_p=task.top_p, top_k=task.top_k,
                              max_tokens=task.max_tokens, seed=task.seed)
    writer = rank() == 0  # under torchrun every rank generates the same tokens; rank 0 writes and prints them
    output_path = output_dir / task.output
    with open(output_path if writer else os.devnull, "w", encoding="utf-8", buffering=1) as out:
        requests, errors = [], 0
        for i, spec in enumerate(specs):
            try:
                requests.append(_request(engine, i, spec, defaults, task.chat))
            except UserError as e:
                errors += 1
                if writer:
                    log.warning("prompt %d skipped: %s", i, e)
                _write(out, {"index": i, "error": str(e)})
        start = time.perf_counter()
        engine.run(requests, on_finish=lambda req: _write(out, _result(req)))
        elapsed = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in requests)
    summary = {"requests": len(requests), "errors": errors, "generated_tokens": tokens,
               "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else None}
    if not writer:
        return {"metrics": summary}
    for req in requests[:SHOWN]:
        print(f"[{req.index}] {req.prompt!r} -> {req.text!r}")
    if len(requests) > SHOWN:
        print(f"... and {len(requests) - SHOWN} more in {output_path}")
    print(f"{len(requests)} requests ({errors} errors), {tokens} tokens in {elapsed:.2f} s: "
          f"{summary['tokens_per_s']} tokens/s  ->  {output_path}")
    return {"metrics": summary}


def _request(engine: LLMEngine, index: int, spec: PromptSpec, defaults: SamplingParams, chat: bool) -> Request:
    try:
        params = replace(defaults, **spec.sampling)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    ids = spec.prompt_token_ids if spec.prompt is None else encode(engine.tokenizer, spec.prompt, chat)
    return engine.make_request(index, ids, params, spec.prompt)


def _result(req: Request) -> dict:
    return {
        "index": req.index,
        "prompt": req.prompt,
        "text": req.text,
        "token_ids": req.output_token_ids,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.prompt_token_ids),
        "time_to_first_token_s": round(req.first_token_time - req.arrival_time, 4),
        "latency_s": round(req.finish_time - req.arrival_time, 4),
    }


def _write(out: IO[str], row: dict) -> None:
    out.write(json.dumps(row) + "\n")
