"""Prompts in: built-in examples, prompt files (.jsonl or .txt), and tokenization with optional chat template.

A prompts file is read line by line: a line that cannot run (not JSON, a wrong field or type, bad UTF-8) becomes a
``PromptSpec`` with its ``error`` set, so the run reports it in its output and every good line still runs. A UTF-8
byte-order mark, CRLF line ends and blank lines are accepted; a file with no prompt at all is an error.
"""
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
# What a prompts-file field may hold, as JSON gives it, and how the check names it.
_NUMBER, _INT = (int, float), (int,)
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": (_NUMBER, "a number"), "top_p": (_NUMBER, "a number"), "top_k": (_INT, "an integer"),
    "max_tokens": ((*_INT, type(None)), "an integer or null"), "seed": ((*_INT, type(None)), "an integer or null"),
    "stop": ((str, list), "a string or a list of strings"), "ignore_eos": ((bool,), "true or false"),
    "stop_token_ids": ((list,), "a list of integers"), "min_tokens": (_INT, "an integer"),
    "include_stop_str_in_output": ((bool,), "true or false"), "skip_special_tokens": ((bool,), "true or false"),
    "min_p": (_NUMBER, "a number"), "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"), "repetition_penalty": (_NUMBER, "a number"),
    "logprobs": ((*_INT, type(None)), "an integer or null"),
    "prompt_logprobs": ((*_INT, type(None)), "an integer or null"), "n": (_INT, "an integer"),
}
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")


@dataclass
class PromptSpec:
    """One prompt as given: text or token ids, and sampling fields that override the task's; or, for a line of a
    prompts file that cannot run, why (``error``)."""

    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    messages: Optional[list[dict[str, Any]]] = None  # a conversation, formatted with the chat template
    sampling: dict[str, Any] = field(default_factory=dict)
    line: Optional[int] = None  # 1-based line of the prompts file
    error: Optional[str] = None


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """The prompts of a .jsonl file ({"prompt": ...}, {"prompt_token_ids": [...]} or {"messages": [{"role": ...,
    "content": ...}, ...]}, optional sampling fields) or a .txt file (one prompt per line), one spec per non-blank
    line, in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: prompts file does not exist")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    specs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError("not valid UTF-8") from None
            if path.suffix == ".jsonl":
                spec = parse_prompt(_json_line(line), "line")
            else:
                spec = PromptSpec(prompt=line)
        except UserError as e:
            spec = PromptSpec(error=f"{path}:{n}: {e}")
        spec.line = n
        specs.append(spec)
    if not specs:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return specs


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg} at column {e.colno})") from None


def parse_prompt(item: Any, where: str) -> PromptSpec:
    """A prompt given as a string or as a dict with "prompt" or "prompt_token_ids"; a ``UserError`` that names the
    field at fault otherwise (prefixed by ``where``, except for a line of a file, whose caller says where)."""
    try:
        return _parse(item)
    except UserError as e:
        raise UserError(str(e) if where == "line" else f"{where}: {e}") from None


def _parse(item: Any) -> PromptSpec:
    if isinstance(item, str):
        return PromptSpec(prompt=item)
    expected = '{"prompt": ...}, {"prompt_token_ids": [...]} or {"messages": [...]}'
    if not isinstance(item, dict):
        raise UserError(f"expected {expected}, got {_json_type(item)}")
    if sum(k in item for k in PROMPT_FIELDS) != 1:
        raise UserError('give one of "prompt", "prompt_token_ids" or "messages"')
    unknown = sorted(set(item) - set(PROMPT_FIELDS) - SAMPLING_FIELDS)
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r} (fields: {', '.join(PROMPT_FIELDS)}, "
                        f"{', '.join(sorted(SAMPLING_FIELDS))})")
    prompt, ids, messages = item.get("prompt"), item.get("prompt_token_ids"), item.get("messages")
    if "prompt" in item and not isinstance(prompt, str):
        raise UserError(f"field 'prompt' must be a string, got {_json_type(prompt)}")
    if "prompt_token_ids" in item and not (isinstance(ids, list) and all(_is_int(t) for t in ids)):
        raise UserError("field 'prompt_token_ids' must be a list of integers")
    if "messages" in item:
        check_messages(messages, "field 'messages'")
    sampling = {k: v for k, v in item.items() if k in SAMPLING_FIELDS}
    for name, value in sampling.items():
        types, what = FIELD_TYPES.get(name, ((object,), "any value"))
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if name == "stop" and isinstance(value, list):
            ok = all(isinstance(s, str) for s in value)
        if name == "stop_token_ids" and ok:
            ok = all(_is_int(t) for t in value)
        if not ok:
            raise UserError(f"field {name!r} must be {what}, got {_json_type(value)} {json.dumps(value)}")
    return PromptSpec(prompt=prompt, prompt_token_ids=ids, messages=messages, sampling=sampling)


def check_messages(messages: Any, what: str) -> None:
    """A conversation: a non-empty list of {"role": str, "content": str} objects (more keys are the template's)."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise UserError(f'{what} must be a non-empty list of {{"role": "...", "content": "..."}} objects')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a text prompt; with ``chat`` the tokenizer's chat template wraps it as a user turn."""
    if not chat:
        _need_tokenizer(tokenizer)
        return tokenizer(prompt).input_ids
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])[1]


def encode_chat(tokenizer, messages: list[dict[str, Any]], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, chat_template_kwargs: Optional[dict[str, Any]] = None,
                ) -> tuple[str, list[int]]:
    """A conversation (system prompt, turns) formatted with the tokenizer's chat template, or ``chat_template``:
    the text and its token ids. ``chat_template_kwargs`` go to the template (transformers' apply_chat_template)."""
    _need_tokenizer(tokenizer)
    check_messages(messages, "messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError("a chat prompt needs a chat template, and this checkpoint's tokenizer has none "
                        "(pass chat_template=...)")
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
    return text, tokenizer(text, add_special_tokens=False).input_ids


def _need_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise UserError("this model has no tokenizer (random weights): give prompts as prompt_token_ids")
