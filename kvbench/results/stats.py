"""Paired statistics of a method against FullKV on the identical samples.

- Paired bootstrap: resample the n paired samples with replacement (a seeded numpy Generator, 10,000
  resamples by default), take the mean difference of each resample, and report the percentile 95% interval.
  Differences are in score points (x100), like the table's cells. For the average over tasks, each task's
  pairs are resampled within that task (a stratified bootstrap) and the task means averaged, as the table's
  Avg averages task scores.
- A table cell shows mean_diff +- h, h the longer arm of the percentile interval about the mean (so the shown
  interval contains it), and calls the difference significant when that interval excludes 0.
- Sign test: exact two-sided binomial test on the signs of the differences, ties dropped:
  p = min(1, 2 * P[X <= min(wins, losses)]) with X ~ Binomial(wins + losses, 1/2).

Pure functions; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK = 4_000_000  # resample indices generated at a time (bounds memory for large n)


@dataclass(frozen=True)
class Paired:
    """A method minus the reference on n paired samples; differences in points (x100)."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    wins: int  # samples where the method scored higher
    losses: int
    ties: int
    sign_p: float
    confidence: float = CONFIDENCE
    n_resamples: int = N_RESAMPLES
    seed: int = 0

    @property
    def half_width(self) -> float:
        """The longer arm of the percentile interval about the mean difference: mean_diff +- half_width
        contains [ci_low, ci_high] (percentile intervals are asymmetric for small n and discrete scores)."""
        return max(self.mean_diff - self.ci_low, self.ci_high - self.mean_diff, 0.0)

    @property
    def significant(self) -> bool:
        """mean_diff +- half_width excludes 0: what a table cell shows is what decides (conservative: it
        implies that the percentile interval excludes 0)."""
        return abs(self.mean_diff) > self.half_width

    @property
    def direction(self) -> int:
        """+1 a significant gain, -1 a significant loss, 0 neither."""
        if not self.significant:
            return 0
        return 1 if self.mean_diff > 0 else -1


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value (ties already dropped)."""
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**m)


def _resampled_means(diffs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = len(diffs)
    out = np.empty(n_resamples)
    step = max(1, _CHUNK // max(n, 1))
    for start in range(0, n_resamples, step):
        count = min(step, n_resamples - start)
        out[start : start + count] = diffs[rng.integers(0, n, size=(count, n))].mean(axis=1)
    return out


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def _check(method: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal 1-D lengths, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired statistics of zero samples")
    return 100 * (a - b)


def _signs(diffs: np.ndarray) -> tuple[int, int, int]:
    return int((diffs > 0).sum()), int((diffs < 0).sum()), int((diffs == 0).sum())


def paired(method: Sequence[float], reference: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = 0,
           confidence: float = CONFIDENCE) -> Paired:
    """method[i] and reference[i] are the per-sample scores (0..1) of the same sample i."""
    diffs = _check(method, reference)
    means = _resampled_means(diffs, n_resamples, np.random.default_rng(seed))
    low, high = _interval(means, confidence)
    wins, losses, ties = _signs(diffs)
    return Paired(n=len(diffs), mean_diff=float(diffs.mean()), ci_low=low, ci_high=high, wins=wins, losses=losses,
                  ties=ties, sign_p=sign_test(wins, losses), confidence=confidence, n_resamples=n_resamples, seed=seed)


def paired_average(groups: Sequence[tuple[Sequence[float], Sequence[float]]], n_resamples: int = N_RESAMPLES,
                   seed: int = 0, confidence: float = CONFIDENCE) -> Paired:
    """The difference of the plain mean over tasks of the task means: each (method, reference) group is one
    task, resampled within itself. The sign test pools the signs of every pair."""
    if not groups:
        raise ValueError("paired_average of zero tasks")
    rng = np.random.default_rng(seed)
    all_diffs = [_check(a, b) for a, b in groups]
    means = sum(_resampled_means(d, n_resamples, rng) for d in all_diffs) / len(all_diffs)
    low, high = _interval(means, confidence)
    pooled = np.concatenate(all_diffs)
    wins, losses, ties = _signs(pooled)
    return Paired(n=len(pooled), mean_diff=float(np.mean([d.mean() for d in all_diffs])), ci_low=low, ci_high=high,
                  wins=wins, losses=losses, ties=ties, sign_p=sign_test(wins, losses), confidence=confidence,
                  n_resamples=n_resamples, seed=seed)
