"""The offline Python API, shaped like vLLM's: ``LLM(model, **overrides).generate(prompts, params)``."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mla_runner.compose import CONF_DIR, compose_config, override
from mla_runner.config import RunConfig
from mla_runner.engine import LLMEngine
from mla_runner.engine.request import Request
from mla_runner.errors import UserError
from mla_runner.prompts import encode, parse_prompt
from mla_runner.sampling import SamplingParams

PromptType = Union[str, dict]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop" (EOS or a stop string) | "length"


@dataclass
class RequestOutput:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    time_to_first_token: float
    latency: float
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (the last admission's, after a preemption)

    @classmethod
    def from_request(cls, req: Request) -> RequestOutput:
        completion = CompletionOutput(0, req.text, list(req.output_token_ids), req.finish_reason)
        return cls(req.index, req.prompt, req.prompt_token_ids, [completion],
                   req.first_token_time - req.arrival_time, req.finish_time - req.arrival_time, req.num_cached_tokens)


class LLM:
    """An engine over one model.

    ``model`` is a model config name (``tiny_deepseek_v3``, ``tiny_kimi_k2``, ``deepseek_v3``, ``kimi_k2``)
    or a checkpoint directory. Keyword overrides are config fields or group choices, as on the command
    line: ``LLM("tiny_kimi_k2", attention="triton", metadata="per_step", dtype="float32", device="cpu")``.
    """

    def __init__(self, model: str = "tiny_deepseek_v3", **overrides: Any):
        self.config: RunConfig = compose_config(model_overrides(model) + [override(k, v) for k, v in overrides.items()])
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt, all batched together; outputs in the order of the prompts.

        Every prompt is checked before any runs: a bad one raises ``UserError`` and nothing is lost.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        n = len(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * n if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != n:
            raise UserError(f"{n} prompts but {len(params)} sampling params")
        requests = [self._request(i, p, sp, chat) for i, (p, sp) in enumerate(zip(prompts, params))]
        self.engine.run(requests, progress=use_tqdm and self.config.progress)
        return [RequestOutput.from_request(r) for r in requests]

    def _request(self, index: int, prompt: PromptType, params: SamplingParams, chat: bool) -> Request:
        spec = parse_prompt(prompt, f"prompt {index}")
        ids = spec.prompt_token_ids if spec.prompt is None else encode(self.tokenizer, spec.prompt, chat)
        return self.engine.make_request(index, ids, params, spec.prompt)


def model_overrides(model: str) -> list[str]:
    """A config name selects the model group option; a directory runs that checkpoint."""
    if (CONF_DIR / "model" / f"{model}.yaml").is_file():
        return [f"model={model}"]
    path = Path(model).expanduser()
    option = "deepseek_v3"
    try:
        if json.loads((path / "config.json").read_text()).get("model_type") == "kimi_k2":
            option = "kimi_k2"
    except (OSError, ValueError):
        pass  # the loader reports a missing or bad config.json with the file named
    return [f"model={option}", override("model.path", str(path))]
