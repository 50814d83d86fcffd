"""From raw rows to every number of T1-T4: mean curves per (apply mode, policy, position mode) with bootstrap
CIs over documents, the sliding window's power-law vs exponential fits, sink+recent's exponent, the position
ablation, the random/sliding gap, the window for a target distortion, and the registered methods' scaling
(kvbench.studies.sensitivity.scaling). The verdicts live in kvbench.studies.sensitivity.verdicts.

One set of document resamples serves every curve, so differences between curves are paired. The analysis is
a plain dict (it goes into manifest.json as it is)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbench.studies.sensitivity import fits, scaling
from kvbench.studies.sensitivity.policies import APPLY_MODES, POS_MODES, PRIMARY_POS_MODE
from kvbench.studies.sensitivity.verdicts import EPSILONS, verdicts

BOOT_SEED = 20260525  # mixed into the study's seed for the document resamples


@dataclass
class Curve:
    """Mean distortion per budget of one (apply mode, policy, position mode), kept as per-document sums so that
    a bootstrap over documents is one indexing operation."""

    budgets: np.ndarray  # [n_B]
    sums: np.ndarray  # [n_docs, n_B]
    counts: np.ndarray  # [n_docs, n_B]
    values: list[np.ndarray]  # per budget, every row's KL (for the median)

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums.sum(0) / self.counts.sum(0)

    @property
    def median(self) -> np.ndarray:
        return np.array([np.median(v) if len(v) else np.nan for v in self.values])

    def boot(self, idx: np.ndarray) -> np.ndarray:
        """[n_boot, n_B] means under document resamples idx [n_boot, n_docs]."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[idx].sum(1) / self.counts[idx].sum(1)


def build_curves(rows: Sequence[dict[str, Any]], docs: Sequence[str], metric: str = "kl_fwd") -> dict[tuple, Curve]:
    """(apply_mode, policy, pos_mode) -> Curve over the budgets measured."""
    doc_index = {d: i for i, d in enumerate(docs)}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["apply_mode"], r["policy"], r["pos_mode"]), []).append(r)
    curves = {}
    for key, rs in groups.items():
        budgets = np.array(sorted({r["B"] for r in rs}))
        col = {b: j for j, b in enumerate(budgets)}
        sums = np.zeros((len(docs), len(budgets)))
        counts = np.zeros((len(docs), len(budgets)))
        values: list[list[float]] = [[] for _ in budgets]
        for r in rs:
            i, j = doc_index[r["doc_id"]], col[r["B"]]
            sums[i, j] += r[metric]
            counts[i, j] += 1
            values[j].append(r[metric])
        curves[key] = Curve(budgets, sums, counts, [np.array(v) for v in values])
    return curves


def x_of(policy: str, budgets: np.ndarray, sink: int) -> np.ndarray:
    """The fit's x: the budget, except for sink+recent, whose decay is in the recent-window length B - s."""
    return budgets - sink if policy == "sink_recent" else budgets.astype(float)


class Bootstrap:
    """The document resamples, each curve's bootstrap means, and their power-law exponents fitted once."""

    def __init__(self, curves: dict[tuple, Curve], n_docs: int, n_boot: int, seed: int, lo: int, hi: int, sink: int):
        rng = np.random.default_rng([seed, BOOT_SEED])
        self.idx = rng.integers(0, n_docs, size=(n_boot, n_docs)) if n_docs > 1 and n_boot > 0 else None
        self.curves, self.lo, self.hi, self.sink = curves, lo, hi, sink
        self.means = {k: c.boot(self.idx) for k, c in curves.items()} if self.idx is not None else {}
        self._alphas: dict[tuple, list[float | None]] = {}  # (curve key, against_budget) -> exponents

    @property
    def on(self) -> bool:
        return self.idx is not None

    def alphas(self, key: tuple, against_budget: bool = False) -> list[float | None]:
        """The power-law exponent of every bootstrap row of a curve, against x_of (B - s for sink+recent) or,
        with `against_budget`, against B itself (the method-scaling comparison)."""
        cached = (key, against_budget)
        if cached not in self._alphas:
            budgets = self.curves[key].budgets
            x = budgets.astype(float) if against_budget else x_of(key[1], budgets, self.sink)
            self._alphas[cached] = [(f.rate if (f := fits.fit_power(x, row, self.lo, self.hi)) else None)
                                    for row in self.means[key]]
        return self._alphas[cached]


def analyse(rows: Sequence[dict[str, Any]], docs: Sequence[str], fit_range: tuple[int, int], sink: int,
            epsilons: Sequence[float] = EPSILONS, n_boot: int = 1000, seed: int = 0,
            methods: Sequence[str] = ()) -> dict[str, Any]:
    """Every number of T1-T4 and the verdicts, from the raw rows; `methods` are the registered methods' labels
    (their M2 curves get the scaling analysis)."""
    lo, hi = fit_range
    curves = build_curves(rows, docs)
    boot = Bootstrap(curves, len(docs), n_boot, seed, lo, hi, sink)
    out: dict[str, Any] = {"fit_range": [lo, hi], "curves": {}, "notes": []}
    for key, c in curves.items():
        out["curves"]["/".join(key)] = _curve_entry(key, c, boot, sink)
    primary = ("M1", "sliding", PRIMARY_POS_MODE)
    key = primary if primary in curves else ("M1", "sliding", "original")
    if key in curves:
        out["sliding"] = _sliding(curves[key], key, boot, epsilons, out["notes"])
        sr_key = ("M1", "sink_recent", PRIMARY_POS_MODE)
        if sr_key in curves:
            out["sink_recent"] = _sink_recent(curves[sr_key], sr_key, key, boot, out["sliding"].get("alpha"))
    out["ablation"] = _ablation(curves, lo, hi, sink)
    out["policy_gap"] = _policy_gap(curves, boot)
    if methods and key in curves:
        out["method_scaling"] = scaling.method_scaling(curves, boot, key, methods)
    out["verdicts"] = verdicts(out)
    return out


def _curve_entry(key: tuple, c: Curve, boot: Bootstrap, sink: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"B": c.budgets.tolist(), "mean": c.mean.tolist(), "median": c.median.tolist(),
                             "n": c.counts.sum(0).astype(int).tolist()}
    if boot.on:
        entry["ci_lo"] = np.nanpercentile(boot.means[key], 2.5, axis=0).tolist()
        entry["ci_hi"] = np.nanpercentile(boot.means[key], 97.5, axis=0).tolist()
    pw = fits.fit_power(x_of(key[1], c.budgets, sink), c.mean, boot.lo, boot.hi)
    entry["alpha"] = pw.rate if pw else None
    entry["C"] = pw.C if pw else None
    entry["r2_pow"] = pw.r2 if pw else None
    if boot.on and pw is not None:
        entry["alpha_ci"] = fits.percentile_ci(boot.alphas(key))
    return entry


def _sliding(main: Curve, key: tuple, boot: Bootstrap, epsilons: Sequence[float], notes: list[str]) -> dict[str, Any]:
    """The primary curve: power law vs exponential, robustness fits, and the windows for target distortions."""
    lo, hi = boot.lo, boot.hi
    x = main.budgets.astype(float)
    cmp = fits.compare_families(x, main.mean, lo, hi)
    pw, ex = cmp["power"], cmp["exp"]
    res: dict[str, Any] = {
        "pos_mode": key[2], "alpha": pw.rate if pw else None, "C": pw.C if pw else None, "r2_pow": pw.r2 if pw else None,
        "lambda": ex.rate if ex else None, "C_exp": ex.C if ex else None, "r2_exp": ex.r2 if ex else None,
        "err_pow": cmp["err_pow"], "err_exp": cmp["err_exp"], "ratio": cmp["ratio"], "holdout": cmp["holdout"],
    }
    med = fits.compare_families(x, main.median, lo, hi)  # secondary: the mean is tail-dominated
    res["median_curve"] = {
        "alpha": med["power"].rate if med["power"] else None, "r2_pow": med["power"].r2 if med["power"] else None,
        "r2_exp": med["exp"].r2 if med["exp"] else None, "err_pow": med["err_pow"], "err_exp": med["err_exp"],
        "ratio": med["ratio"],
    }
    if not cmp["holdout"]:
        notes.append(f"no window above the fit range (hi={hi}): no holdout extrapolation error")
    if boot.on:
        b = boot.means[key]
        comps = [fits.compare_families(x, row, lo, hi) for row in b]
        res["alpha_ci"] = fits.percentile_ci([c["power"].rate if c["power"] else None for c in comps])
        res["ratio_ci"] = fits.percentile_ci([c["ratio"] for c in comps])
        # robustness: weighted by 1/Var(log D) from the bootstrap
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.nanvar(np.log(np.where(b > 0, b, np.nan)), axis=0)
        weights = np.where(var > 0, 1.0 / np.where(var > 0, var, 1.0), 0.0)
        wf = fits.fit_power(x, main.mean, lo, hi, weights=weights)
        res["alpha_weighted"] = wf.rate if wf else None
    res["alpha_linear"] = fits.fit_power_linear(x, main.mean, lo, hi)
    shifts = [abs(a - res["alpha"]) for a in (res.get("alpha_weighted"), res.get("alpha_linear"))
              if a is not None and res["alpha"] is not None]
    res["robust_max_shift"] = max(shifts) if shifts else None
    windows = []
    for eps in epsilons:
        w_pred = fits.predicted_window(pw, eps)
        w_emp, flag = fits.empirical_window(x, main.mean, eps)
        ratio = (w_pred / w_emp) if (w_pred is not None and w_emp is not None and flag == "ok") else None
        region = None if w_emp is None or flag != "ok" else ("fit" if w_emp <= hi else "holdout")
        windows.append({"eps": eps, "w_pred": w_pred, "w_emp": w_emp, "flag": flag, "ratio": ratio, "region": region})
    res["windows"] = windows
    return res


def _sink_recent(sr: Curve, sr_key: tuple, key: tuple, boot: Bootstrap, alpha: float | None) -> dict[str, Any]:
    """Sink+recent's exponent vs B - s, and its difference from alpha (paired bootstrap)."""
    f_sr = fits.fit_power(x_of("sink_recent", sr.budgets, boot.sink), sr.mean, boot.lo, boot.hi)
    res: dict[str, Any] = {"alpha_sr": f_sr.rate if f_sr else None, "C_sr": f_sr.C if f_sr else None,
                           "r2": f_sr.r2 if f_sr else None}
    res["delta"] = (res["alpha_sr"] - alpha) if (res["alpha_sr"] is not None and alpha is not None) else None
    if boot.on:
        alphas_sr, alphas_m = boot.alphas(sr_key), boot.alphas(key)
        res["alpha_sr_ci"] = fits.percentile_ci(alphas_sr)
        res["delta_ci"] = fits.percentile_ci([a1 - a2 if a1 is not None and a2 is not None else None
                                              for a1, a2 in zip(alphas_sr, alphas_m)])
    return res


def _ablation(curves: dict[tuple, Curve], lo: int, hi: int, sink: int) -> dict[str, Any]:
    """Alpha per position mode and the largest gap between the two modes' curves."""
    out = {}
    for apply in APPLY_MODES:
        for policy in sorted({k[1] for k in curves if k[0] == apply}):
            cc, co = curves.get((apply, policy, "contiguous")), curves.get((apply, policy, "original"))
            if cc is None or co is None:
                continue
            common = np.intersect1d(cc.budgets, co.budgets)
            mc, mo = cc.mean[np.isin(cc.budgets, common)], co.mean[np.isin(co.budgets, common)]
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = np.abs(np.log10(mo) - np.log10(mc))
            fc = fits.fit_power(x_of(policy, cc.budgets, sink), cc.mean, lo, hi)
            fo = fits.fit_power(x_of(policy, co.budgets, sink), co.mean, lo, hi)
            finite = np.isfinite(gap).any()
            out[f"{apply}/{policy}"] = {
                "alpha_contiguous": fc.rate if fc else None, "alpha_original": fo.rate if fo else None,
                "max_log10_gap": float(np.nanmax(gap)) if finite else None,
                "budget_at_max_gap": int(common[int(np.nanargmax(gap))]) if finite else None,
                "err_ratio_original": fits.compare_families(x_of(policy, co.budgets, sink), co.mean, lo, hi)["ratio"],
            }
    return out


def _policy_gap(curves: dict[tuple, Curve], boot: Bootstrap) -> dict[str, Any]:
    """Random / sliding per budget, and its median over the fit range."""
    out = {}
    for apply in APPLY_MODES:
        for mode in POS_MODES if apply == "M1" else ("original",):
            cs, cr = curves.get((apply, "sliding", mode)), curves.get((apply, "random", mode))
            if cs is None or cr is None:
                continue
            common = np.intersect1d(cs.budgets, cr.budgets)
            ms, mr = cs.mean[np.isin(cs.budgets, common)], cr.mean[np.isin(cr.budgets, common)]
            with np.errstate(divide="ignore", invalid="ignore"):
                r = mr / ms
            in_fit = fits.in_range(common.astype(float), boot.lo, boot.hi)
            entry = {"B": common.tolist(), "ratio": r.tolist(),
                     "median_fit_range": float(np.median(r[in_fit])) if in_fit.any() else None}
            if boot.on and in_fit.any():
                bs = boot.means[(apply, "sliding", mode)][:, np.isin(cs.budgets, common)]
                br = boot.means[(apply, "random", mode)][:, np.isin(cr.budgets, common)]
                with np.errstate(divide="ignore", invalid="ignore"):
                    entry["median_ci"] = fits.percentile_ci(np.median((br / bs)[:, in_fit], axis=1))
            out[f"{apply}/{mode}"] = entry
    return out
