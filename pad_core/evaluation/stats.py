"""Statistics for `pad eval` and `pad bench`: pure functions, no I/O.

- `wilson_interval`: 95% confidence interval of a success rate (better than
  the normal approximation for small n and rates near 0 or 1).
- `paired_bootstrap_diff`: confidence interval of the difference of two
  success rates measured on the same cases (PAD vs prompt).
- `repeated_ngram_share`: the fluency guard, share of an answer's word
  4-grams that repeat an earlier 4-gram of the same answer (degenerate loops
  score high, normal prose near 0).
- `percentile`: linear-interpolation percentiles for latencies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pad_core.evaluation.checks import words

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    successes: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"successes": self.successes, "n": self.n, "rate": self.value, "ci_low": self.low, "ci_high": self.high}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval; (0, 1) when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate(outcomes: Sequence[bool]) -> Rate:
    successes = sum(bool(o) for o in outcomes)
    low, high = wilson_interval(successes, len(outcomes))
    return Rate(successes, len(outcomes), low, high)


def paired_bootstrap_diff(
    a: Sequence[bool], b: Sequence[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) - mean(b) over paired outcomes, with a percentile bootstrap
    interval (cases resampled with replacement). Deterministic for a seed."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    diffs = [int(bool(x)) - int(bool(y)) for x, y in zip(a, b)]
    observed = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return observed, percentile(means, 100 * tail), percentile(means, 100 * (1 - tail))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that already occurred earlier in
    it (0.0 for answers shorter than n words). Case-insensitive."""
    grams = ngrams([w.lower() for w in words(text)], n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        if gram in seen:
            repeats += 1
        seen.add(gram)
    return repeats / len(grams)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_repeated_ngram_share(texts: Sequence[str], n: int = 4) -> float:
    """Mean over answers of `repeated_ngram_share` (each answer counts once)."""
    return mean([repeated_ngram_share(t, n) for t in texts])


def mean_words(texts: Sequence[str]) -> float:
    return mean([len(words(t)) for t in texts])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order
    statistics (numpy's default); nan for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
