"""Model-free drafting for speculative decoding: prompt lookup (``speculative=ngram``), on the host.

The drafts of a request are the tokens that followed an earlier occurrence of the last n tokens of its prompt plus
output, for the largest n in [n_min, n_max] that occurs earlier; of that n-gram's occurrences the earliest is taken,
as vLLM's ``NgramProposer`` does (in a periodic context it has the longest continuation). The tokens copied stop at
the end of the context, so a match just before the suffix proposes fewer than k. The target verifies the drafts as
one-hot draft distributions (engine/rejection.py, ``draft_probs=None``).

``draft_room`` is how many drafts any drafter (this one, or the MTP layer: engine/mtp_drafter.py) may propose.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


def draft_room(k: int, max_tokens: Optional[int], num_outputs: int, num_tokens: int, max_model_len: int) -> int:
    """The drafts a request of ``num_outputs`` generated tokens (``num_tokens`` with its prompt) may propose for its
    next step: up to ``k``, fewer where its ``max_tokens`` (None: max_model_len) or the context would end within them.
    A step of d drafts emits up to d + 1 tokens, so d <= max_tokens - outputs - 1 and d <= max_model_len - 1 - tokens
    keep it from passing either limit; 0 when there is no room."""
    limit = max_tokens if max_tokens is not None else max_model_len
    return max(0, min(k, limit - num_outputs - 1, max_model_len - 1 - num_tokens))


def ngram_propose(token_ids: Sequence[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` draft tokens for a request whose prompt plus output so far is ``token_ids``; [] where no suffix
    n-gram of n_min..n_max tokens occurs earlier.

    Vectorized over the context: one comparison of every position with the last token, then one contiguous-slice
    comparison per further suffix token until nothing matches, so at most n_max passes whatever the context holds.
    For 100k tokens: 0.06-0.23 ms from an int64 numpy array, 2-3 ms from a Python list, most of it the conversion
    (docs/speculative.md, section 2): an engine that keeps each request's tokens in a numpy buffer pays the first.
    """
    if not 1 <= n_min <= n_max:
        raise ValueError(f"ngram_propose needs 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    if k <= 0:
        return []
    tokens = (token_ids.astype(np.int64, copy=False) if isinstance(token_ids, np.ndarray)
              else np.fromiter(token_ids, dtype=np.int64, count=len(token_ids)))
    L = tokens.shape[0]
    n_max = min(n_max, L - 1)  # an earlier occurrence of n tokens ends at L - 2 at the latest
    if n_max < n_min:
        return []
    # match[i]: the n tokens ending at position i + n - 1 equal the context's last n (contiguous slices only, so a
    # context of one repeated token, where every position matches, costs no more than n_max passes)
    match = tokens[: L - 1] == tokens[L - 1]
    if not match.any():
        return []
    n = 1
    while n < n_max:
        longer = match[1:] & (tokens[: L - 1 - n] == tokens[L - 1 - n])
        if not longer.any():
            break
        match, n = longer, n + 1
    if n < n_min:
        return []
    start = int(np.argmax(match)) + n  # after the earliest occurrence of the longest n-gram
    return tokens[start:start + k].tolist()
