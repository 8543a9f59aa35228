"""A request as the engine tracks it, from prompt to finished output."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import numpy as np

from mla_runner.sampling import Logprob, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: int  # unique in the engine that made it
    index: int  # position in the caller's list of prompts
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)  # KV-cache pages, in order
    num_computed: int = 0  # tokens whose latent vectors are in the cache (computed or found there)
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    page_keys: list[bytes] = field(default_factory=list)  # prefix keys of its full pages, as far as computed
    num_keyed_pages: int = 0  # pages offered to the prefix cache so far
    finish_reason: Optional[str] = None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it (None: EOS or length)
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    sample_index: int = 0  # which of its prompt's ``n`` samples it is
    # per output token, {token id: Logprob} of the sampled token and the top params.logprobs (None: not asked)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None  # of the sampled tokens, where logprobs are asked
    # per prompt token, as logprobs, the first None; as far as computed (None: not asked)
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    # speculative decoding: the tokens drafted after its last one, which its next step verifies (the scheduler may cut
    # them to the token budget; a preempted request drops them)
    draft_token_ids: list[int] = field(default_factory=list)
    # prompt plus output as int64, the first _array_len entries valid (``token_array``); capacity doubles as it grows
    _array: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    _array_len: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def token_ids(self) -> list[int]:
        """Prompt plus generated tokens: what a (re)computed prefill feeds the model."""
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """The token at ``position`` of prompt plus output (what a step feeds the model), without building
        ``token_ids``."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_array(self) -> np.ndarray:
        """Prompt plus output as an int64 numpy array (what the n-gram drafter reads), kept between calls and
        extended by the outputs appended since the last one: O(new tokens) a call."""
        n, prompt = self.num_tokens, len(self.prompt_token_ids)
        if self._array is None or n > len(self._array):
            grown = np.empty(max(2 * n, 64), dtype=np.int64)
            if self._array is not None:
                grown[: self._array_len] = self._array[: self._array_len]
            else:
                grown[:prompt] = self.prompt_token_ids
                self._array_len = prompt
            self._array = grown
        if self._array_len < n:
            self._array[self._array_len : n] = self.output_token_ids[self._array_len - prompt :]
            self._array_len = n
        return self._array[:n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)
