"""Prompts in: built-in examples, prompt files (.jsonl or .txt), and tokenization with optional chat template."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from mla_runner.errors import UserError
from mla_runner.sampling import SamplingParams

BUILTIN_PROMPTS = [
    "The capital of France is",
    "Multi-head latent attention compresses the key-value cache by",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
]

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass
class PromptSpec:
    """One prompt as given: text or token ids, and sampling fields that override the task's."""

    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    sampling: dict[str, Any] = field(default_factory=dict)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """A .jsonl file ({"prompt": ...} or {"prompt_token_ids": [...]}, optional sampling fields) or a .txt
    file with one prompt per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: prompts file does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [PromptSpec(prompt=line) for line in lines if line.strip()]
    specs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        specs.append(parse_prompt(row, f"{path}:{n}"))
    return specs


def parse_prompt(item: Any, where: str) -> PromptSpec:
    """A prompt given as a string or as a dict with "prompt" or "prompt_token_ids"."""
    if isinstance(item, str):
        return PromptSpec(prompt=item)
    if not isinstance(item, dict) or ("prompt" in item) == ("prompt_token_ids" in item):
        raise UserError(f"{where}: give either \"prompt\" or \"prompt_token_ids\"")
    unknown = set(item) - {"prompt", "prompt_token_ids"} - SAMPLING_FIELDS
    if unknown:
        raise UserError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    ids = item.get("prompt_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        raise UserError(f"{where}: prompt_token_ids must be a list of integers")
    sampling = {k: v for k, v in item.items() if k in SAMPLING_FIELDS}
    return PromptSpec(prompt=item.get("prompt"), prompt_token_ids=ids, sampling=sampling)


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a text prompt; with ``chat`` the tokenizer's chat template wraps it as a user turn."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer (random weights): give prompts as prompt_token_ids")
    if not chat:
        return tokenizer(prompt).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat=true but this checkpoint's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
