"""DRY ("don't repeat yourself", llama.cpp's --dry-*) against its published definition.

The reference is the definition as first published with the sampler (text-generation-
webui, and llama.cpp's llama_sampler_dry): for the context's last token, every earlier
occurrence whose next token would extend the match; the match length counted backwards
while the tokens agree, never past the last sequence breaker; for each next token the
longest match n gives multiplier * base ** (n - allowed_length) when n >= allowed_length;
a breaker is never penalized. Written here as plain loops, and compared with our
vectorized version on random and repetitive contexts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.sampling import Sampler, SamplingParams, dry_penalties


def reference(tokens: list[int], multiplier: float, base: float, allowed: int, breakers: set[int]) -> dict[int, float]:
    if len(tokens) < 2:
        return {}
    last = tokens[-1]
    if last in breakers:
        return {}
    limit = 0  # tokens since the last breaker
    for t in reversed(tokens):
        if t in breakers:
            break
        limit += 1
    longest: dict[int, int] = {}
    for i in range(len(tokens) - 1):
        if tokens[i] != last:
            continue
        nxt = tokens[i + 1]
        if nxt in breakers:
            continue
        n = 1
        while n < limit and i - n >= 0 and tokens[i - n] == tokens[-1 - n]:
            n += 1
        longest[nxt] = max(n, longest.get(nxt, 0))
    return {t: multiplier * base ** (n - allowed) for t, n in longest.items() if n >= allowed}


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), min_size=0, max_size=60), allowed=st.integers(1, 4),
       breakers=st.sets(st.integers(0, 5), max_size=2))
def test_matches_the_definition(tokens: list[int], allowed: int, breakers: set[int]) -> None:
    ours = dry_penalties(tokens, 0.8, 1.75, allowed, frozenset(breakers))
    expected = reference(tokens, 0.8, 1.75, allowed, breakers)
    assert ours.keys() == expected.keys()
    for t in ours:
        assert ours[t] == pytest.approx(expected[t], rel=1e-12)


def test_a_repeated_phrase_is_pushed_off_its_next_token() -> None:
    phrase = [10, 11, 12, 13, 14]
    tokens = phrase + [99] + phrase[:4]          # the phrase again, one token short
    penalties = dry_penalties(tokens, 0.8, 1.75, 2, frozenset())
    assert penalties == {14: pytest.approx(0.8 * 1.75 ** (4 - 2))}
    # a breaker between them: the second run is too short to count
    assert dry_penalties(phrase + [99] + [7] + phrase[:1], 0.8, 1.75, 2, frozenset({7})) == {}


def test_sampler_subtracts_the_penalties_before_drawing() -> None:
    logits = np.zeros(20, dtype=np.float32)
    logits[14] = 1.0  # greedy would continue the phrase
    params = SamplingParams(dry_multiplier=2.0)
    recent = [10, 11, 12, 13, 14, 99, 10, 11, 12, 13]
    assert int(Sampler(np, params)(logits, recent)) != 14
    assert int(Sampler(np, SamplingParams())(logits, recent)) == 14


def test_penalty_last_n_zero_turns_it_off_and_limits_the_scan() -> None:
    logits = np.zeros(20, dtype=np.float32)
    logits[14] = 1.0
    recent = [10, 11, 12, 13, 14, 99, 10, 11, 12, 13]
    assert int(Sampler(np, SamplingParams(dry_multiplier=2.0, dry_penalty_last_n=0))(logits, recent)) == 14
    # the first occurrence is out of a 5-token scan: nothing to extend
    assert int(Sampler(np, SamplingParams(dry_multiplier=2.0, dry_penalty_last_n=5))(logits, recent)) == 14
