"""Fits of a distortion curve D(x) (methods.md §6.6): a power law C x^-alpha and an exponential C' e^-lambda x,
each by least squares of ln D over the fit range (on ln x and on x), R^2 on the log scale; the holdout
extrapolation error in decades; the window w*(eps) = (C/eps)^(1/alpha) a target distortion needs, and the
empirical crossing it is compared with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def linear_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """(slope, intercept, R^2) of the least-squares line y = slope x + intercept, minimising
    sum weights * residual^2 when weights are given. numpy.polyfit's `w` multiplies the residuals, so it gets
    sqrt(weights); R^2 uses the same weights around the weighted mean."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    if len(np.unique(x[w > 0])) < 2:
        raise ValueError("a line needs at least two distinct x values")
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    resid = y - (intercept + slope * x)
    sst = np.sum(w * (y - np.average(y, weights=w)) ** 2)
    r2 = float(1 - np.sum(w * resid**2) / sst) if sst > 0 else float("nan")
    return float(slope), float(intercept), r2


@dataclass
class Fit:
    family: str  # power | exp
    rate: float  # alpha (power) or lambda (exp)
    C: float
    r2: float
    n: int

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, float)
        return self.C * (x ** (-self.rate) if self.family == "power" else np.exp(-self.rate * x))


def in_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (x >= lo) & (x <= hi)


def fit_family(x: np.ndarray, d: np.ndarray, family: str, lo: float, hi: float,
               weights: np.ndarray | None = None) -> Fit | None:
    """Least squares of ln D on ln x (power) or on x (exp) over lo <= x <= hi; None with fewer than 3 usable
    points (D > 0 and finite)."""
    x, d = np.asarray(x, float), np.asarray(d, float)
    keep = in_range(x, lo, hi) & (d > 0) & np.isfinite(d)
    if keep.sum() < 3:
        return None
    xs = np.log(x[keep]) if family == "power" else x[keep]
    slope, intercept, r2 = linear_fit(xs, np.log(d[keep]), None if weights is None else np.asarray(weights)[keep])
    return Fit(family, -slope, math.exp(intercept), r2, int(keep.sum()))


def fit_power(x, d, lo, hi, weights=None) -> Fit | None:
    return fit_family(x, d, "power", lo, hi, weights)


def fit_exp(x, d, lo, hi, weights=None) -> Fit | None:
    return fit_family(x, d, "exp", lo, hi, weights)


def fit_power_linear(x: np.ndarray, d: np.ndarray, lo: float, hi: float) -> float | None:
    """Robustness check: alpha minimising sum (D - C x^-alpha)^2 in linear space (C profiled out in closed
    form), by a grid over alpha in [-1, 5] then golden-section refinement (kvbench does not depend on scipy)."""
    x, d = np.asarray(x, float), np.asarray(d, float)
    keep = in_range(x, lo, hi) & np.isfinite(d)
    if keep.sum() < 3:
        return None
    x, d = x[keep], d[keep]

    def sse(a: float) -> float:
        g = x ** (-a)
        c = float(np.dot(d, g) / np.dot(g, g))
        return float(np.sum((d - c * g) ** 2))

    grid = np.linspace(-1, 5, 601)
    i = int(np.argmin([sse(a) for a in grid]))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c1, c2 = b - phi * (b - a), a + phi * (b - a)
        if sse(c1) < sse(c2):
            b = c2
        else:
            a = c1
    return float((a + b) / 2)


def holdout_error(fit: Fit | None, x: np.ndarray, d: np.ndarray, mask: np.ndarray) -> float | None:
    """RMSE over the holdout points of log10(fit / measured), in decades."""
    if fit is None:
        return None
    x, d = np.asarray(x, float), np.asarray(d, float)
    keep = mask & (d > 0) & np.isfinite(d)
    if not keep.any():
        return None
    with np.errstate(divide="ignore", over="ignore"):
        err = np.log10(np.maximum(fit.predict(x[keep]), 1e-300)) - np.log10(d[keep])
    return float(np.sqrt(np.mean(err**2)))


def compare_families(x: np.ndarray, d: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    """Power law vs exponential on one curve: both fits over [lo, hi], holdout = x > hi."""
    x, d = np.asarray(x, float), np.asarray(d, float)
    pw, ex = fit_power(x, d, lo, hi), fit_exp(x, d, lo, hi)
    hold = x > hi
    ep, ee = holdout_error(pw, x, d, hold), holdout_error(ex, x, d, hold)
    ratio = (ee / ep) if (ep is not None and ee is not None and ep > 0) else None
    return {"power": pw, "exp": ex, "err_pow": ep, "err_exp": ee, "ratio": ratio,
            "holdout": [float(v) for v in x[hold]]}


def empirical_window(x: np.ndarray, d: np.ndarray, eps: float) -> tuple[float | None, str]:
    """Smallest x with D(x) <= eps, log-log interpolated between the grid points around the first crossing.
    Returns (value, flag): flag 'ok', 'below_grid' (already <= eps at the first point: value is that point,
    an upper bound) or 'not_reached' (value None)."""
    x, d = np.asarray(x, float), np.asarray(d, float)
    order = np.argsort(x)
    x, d = x[order], d[order]
    below = np.nonzero(d <= eps)[0]
    if len(below) == 0:
        return None, "not_reached"
    i = int(below[0])
    if i == 0:
        return float(x[0]), "below_grid"
    x0, x1, d0, d1 = math.log(x[i - 1]), math.log(x[i]), math.log(d[i - 1]), math.log(max(d[i], 1e-300))
    if d1 == d0:
        return float(x[i]), "ok"
    return float(math.exp(x0 + (math.log(eps) - d0) * (x1 - x0) / (d1 - d0))), "ok"


def predicted_window(fit: Fit | None, eps: float) -> float | None:
    """w*(eps) = (C / eps)^(1 / alpha)."""
    if fit is None or fit.rate <= 0:
        return None
    try:
        return float((fit.C / eps) ** (1.0 / fit.rate))
    except OverflowError:  # alpha near 0: no finite window reaches eps
        return math.inf


def percentile_ci(samples: Any) -> tuple[float, float] | None:
    """95% percentile interval of the finite samples (None entries dropped); None with fewer than 10."""
    arr = np.array([s for s in samples if s is not None and np.isfinite(s)], float)
    if len(arr) < 10:
        return None
    return float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))
