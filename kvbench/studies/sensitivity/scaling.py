"""Method scaling: does a registered compression method's distortion fall faster with the budget than the
suffix-only sliding window's? (The open question of arXiv 2605.25085: can summaries that are not a suffix beat
w = Theta(eps^(-1/alpha)).)

For every registered method measured in M2 (prefill-then-evict, original positions), D(B) ~ C B^(-beta) is fitted
by least squares of ln D on ln B over the study's fit range, as alpha is for the sliding window; beta's 95%
interval comes from the same document resamples as alpha's, so beta - alpha is a paired difference too. [ours]
A method "beats suffix-only scaling" when its beta's interval lies entirely above alpha's, "is slower" when it lies
entirely below, and "overlaps" otherwise. The reference alpha is the re-encoded (M1) sliding window's: that is the
suffix-only policy the theorem is about.

M2's kept keys and values were computed with the whole prefix in view, so they carry information from the
evicted tokens: an M2 method can beat alpha through that alone. The same-mode recency baselines separate the
two: the M2 sliding window, and M2 sink+recent (the kept set of StreamingLLM, fitted against B like the
methods). Each method's beta is also judged against M2 sink+recent's exponent (`verdict_m2_recency`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbench.studies.sensitivity import fits

RATIO_BUDGETS = (64, 256)  # D(B) of each method relative to the sliding window's, at these budgets


def verdict(beta_ci: tuple[float, float] | None, alpha_ci: tuple[float, float] | None) -> str:
    if beta_ci is None or alpha_ci is None:
        return "no interval"
    if beta_ci[0] > alpha_ci[1]:
        return "beats"
    if beta_ci[1] < alpha_ci[0]:
        return "slower"
    return "overlaps"


def _exponent(curves: dict[tuple, Any], boot: Any, key: tuple) -> dict[str, Any]:
    """The power-law exponent of one curve over the fit range, with its bootstrap interval."""
    c = curves[key]
    f = fits.fit_power(c.budgets.astype(float), c.mean, boot.lo, boot.hi)
    out: dict[str, Any] = {"key": "/".join(key), "exponent": f.rate if f else None, "C": f.C if f else None,
                           "r2": f.r2 if f else None, "n_budgets_fitted": f.n if f else 0}
    out["ci"] = fits.percentile_ci(boot.alphas(key, against_budget=True)) if boot.on and f is not None else None
    return out


def _mean_at(curves: dict[tuple, Any], key: tuple, budget: int) -> float | None:
    c = curves.get(key)
    if c is None or budget not in c.budgets:
        return None
    value = float(c.mean[list(c.budgets).index(budget)])
    return value if np.isfinite(value) else None


def method_scaling(curves: dict[tuple, Any], boot: Any, sliding_key: tuple, methods: Sequence[str]) -> dict[str, Any]:
    """beta per method against alpha of the sliding window (`sliding_key`, the M1 primary curve)."""
    ref = _exponent(curves, boot, sliding_key)
    reference = {"key": ref["key"], "alpha": ref["exponent"], "alpha_ci": ref["ci"], "C": ref["C"], "r2": ref["r2"]}
    m2_key = ("M2", "sliding", "original")
    m2 = _exponent(curves, boot, m2_key) if m2_key in curves else None
    recency_key = ("M2", "sink_recent", "original")
    recency = _exponent(curves, boot, recency_key) if recency_key in curves else None
    rows = []
    for label in methods:
        key = ("M2", label, "original")
        if key not in curves:
            rows.append({"label": label, "beta": None, "beta_ci": None, "verdict": "not measured"})
            continue
        e = _exponent(curves, boot, key)
        entry: dict[str, Any] = {"label": label, "beta": e["exponent"], "beta_ci": e["ci"], "C": e["C"], "r2": e["r2"],
                                 "n_budgets_fitted": e["n_budgets_fitted"]}
        entry["delta"] = (e["exponent"] - ref["exponent"]) if None not in (e["exponent"], ref["exponent"]) else None
        if boot.on and e["exponent"] is not None and ref["exponent"] is not None:
            pairs = zip(boot.alphas(key, against_budget=True), boot.alphas(sliding_key, against_budget=True))
            entry["delta_ci"] = fits.percentile_ci([b - a if b is not None and a is not None else None for b, a in pairs])
        entry["verdict"] = verdict(e["ci"], ref["ci"])
        entry["verdict_m2_recency"] = verdict(e["ci"], recency["ci"]) if recency else "not measured"
        for budget in RATIO_BUDGETS:
            d, s = _mean_at(curves, key, budget), _mean_at(curves, sliding_key, budget)
            s2 = _mean_at(curves, m2_key, budget)
            entry[f"D_{budget}"] = d
            entry[f"ratio_{budget}"] = d / s if d is not None and s else None
            entry[f"ratio_m2_{budget}"] = d / s2 if d is not None and s2 else None
        rows.append(entry)
    return {"reference": reference, "m2_sliding": m2, "m2_recency": recency, "methods": rows, "ratio_budgets": list(RATIO_BUDGETS),
            "fit_range": [boot.lo, boot.hi]}
