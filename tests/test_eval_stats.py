"""Pure statistics of `pad eval` / `pad bench`."""

from __future__ import annotations

import math

import pytest

from pad_core.evaluation.stats import (
    mean_repeated_ngram_share,
    mean_words,
    paired_bootstrap_diff,
    percentile,
    rate,
    repeated_ngram_share,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # Reference values (Wilson score interval, z = 1.96).
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_wilson_interval_narrows_with_n():
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]


def test_rate():
    r = rate([True, False, True, True])
    assert (r.successes, r.n, r.value) == (3, 4, 0.75)
    assert r.low < 0.75 < r.high
    assert r.to_dict()["rate"] == 0.75 and math.isnan(rate([]).value)


def test_paired_bootstrap_diff():
    a = [True] * 8 + [False] * 2
    b = [True] * 4 + [False] * 6
    diff, low, high = paired_bootstrap_diff(a, b, seed=1)
    assert diff == pytest.approx(0.4)
    assert low <= 0.4 <= high and low > 0
    assert paired_bootstrap_diff(a, b, seed=1) == (diff, low, high)  # deterministic
    assert paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff(a, b[:3])


def test_repeated_ngram_share():
    assert repeated_ngram_share("") == 0.0
    assert repeated_ngram_share("one two three") == 0.0
    assert repeated_ngram_share("The cat sat on the mat and then it slept.") == 0.0
    # "a b c d" x3: 9 four-grams, of which the first 4 are new.
    assert repeated_ngram_share("a b c d a b c d a b c d") == pytest.approx(5 / 9)
    # Case-insensitive, punctuation ignored.
    assert repeated_ngram_share("I am so happy. i am so HAPPY!") == pytest.approx(1 / 5)
    loop = "I love it. " * 20
    assert repeated_ngram_share(loop) > 0.9


def test_means():
    assert mean_words(["one two", "three four five six"]) == 3
    assert mean_repeated_ngram_share(["a b c d a b c d", "fresh words every time here"]) == pytest.approx((1 / 5) / 2)
    assert math.isnan(mean_words([]))


def test_percentile():
    values = [1, 2, 3, 4, 5]
    assert percentile(values, 50) == 3
    assert percentile(values, 0) == 1 and percentile(values, 100) == 5
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)
