"""Prompt lookup (ngram drafting) against a brute-force reference written from the definition, on random token lists
with repeats, and on the edge cases by hand."""
from __future__ import annotations

import numpy as np
import pytest

from mla_runner.engine.drafters import ngram_propose


def reference(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """For n from n_max down to n_min, the earliest i < len - n with tokens[i:i + n] equal to the last n tokens: the
    k tokens after it (as many as there are)."""
    L = len(tokens)
    for n in range(n_max, n_min - 1, -1):
        suffix = tokens[L - n:] if n <= L else None
        for i in range(L - n):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


@pytest.mark.parametrize("vocab", [2, 3, 5, 20])
def test_matches_the_brute_force_reference_on_random_lists(vocab):
    rng = np.random.default_rng(vocab)
    found = 0
    for _ in range(400):
        tokens = rng.integers(0, vocab, int(rng.integers(1, 60))).tolist()
        if len(tokens) > 3 and rng.random() < 0.5:  # end on a copy of an earlier stretch, so long n-grams repeat
            i = int(rng.integers(0, len(tokens) - 2))
            tokens += tokens[i:i + int(rng.integers(2, 8))]
        k, n_min = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 4))
        expected = reference(tokens, k, n_min, n_max)
        assert ngram_propose(tokens, k, n_min, n_max) == expected, (tokens, k, n_min, n_max)
        assert ngram_propose(np.array(tokens, dtype=np.int32), k, n_min, n_max) == expected
        found += bool(expected)
    assert found > 200  # the cases exercise matches, not only misses


def test_the_longest_n_gram_wins_over_a_later_shorter_one():
    # suffix [1, 2, 3]: the 3-gram occurs at 0 (followed by 7), only the 2-gram [2, 3] at 5 (followed by 8)
    tokens = [1, 2, 3, 7, 0, 2, 3, 8, 1, 2, 3]
    assert ngram_propose(tokens, 2, 2, 3) == [7, 0]
    assert ngram_propose(tokens, 2, 2, 2) == [7, 0]  # n_max 2: the earliest 2-gram [2, 3], at 1
    assert ngram_propose(tokens, 2, 4, 5) == []  # no 4-gram repeats


def test_earliest_occurrence_and_the_continuation_stops_at_the_end():
    tokens = [5, 6, 9, 5, 6, 4, 4, 5, 6]
    assert ngram_propose(tokens, 3, 2, 2) == [9, 5, 6]  # the occurrence at 0, not the one at 3
    # a match just before the suffix: only the tokens up to the end of the context follow it
    run = [3, 3, 3, 3]
    assert ngram_propose(run, 5, 2, 3) == [3]
    assert ngram_propose([1, 2, 1, 2], 5, 2, 2) == [1, 2]  # k longer than the continuation


def test_no_match_and_degenerate_inputs():
    assert ngram_propose([1, 2, 3, 4], 3, 1, 2) == []
    assert ngram_propose([7], 3, 1, 1) == []  # nothing before the suffix
    assert ngram_propose([], 3, 1, 1) == []
    assert ngram_propose([1, 1], 0, 1, 1) == []  # k = 0: nothing asked
    assert ngram_propose([4, 1, 4], 2, 1, 5) == [1, 4]  # n_max beyond the context: the 1-gram [4]
    with pytest.raises(ValueError, match="n_min <= n_max"):
        ngram_propose([1, 2], 1, 3, 2)


def test_a_long_periodic_context_proposes_k_tokens():
    """How long a 100k-token context takes is measured in docs/speculative.md, section 2."""
    zeros = np.zeros(100_000, dtype=np.int64)
    assert ngram_propose(zeros, 3, 2, 5) == [0, 0, 0]  # the earliest 5-gram: a whole continuation follows it
