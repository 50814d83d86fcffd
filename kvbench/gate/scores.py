"""The score check: NEW minus BASE on the common samples, with the paired bootstrap of `kvbench table --ci`
(`kvbench.results.stats`: 10,000 seeded resamples, percentile 95% interval, differences in points).

Per (method, budget, task) the interval of the mean paired difference decides: entirely below -threshold is
a significant drop (fail); containing -threshold is a possible one (warn); otherwise pass. One answer changed
by noise moves the mean but leaves the upper end of the interval near 0, so it never fails; a drop spread
over many samples does. The average over a method and budget's tasks is checked the same way with the
stratified bootstrap (`stats.paired_average`), which catches a small drop spread over every task.
With fewer than MIN_SAMPLES paired samples in a task the interval is degenerate (one sample gives [d, d]: no
spread at all), so such a cell can warn but never fail: a suite that small is for the exact check."""

from __future__ import annotations

from kvbench.gate.findings import Finding
from kvbench.gate.sets import Cell
from kvbench.results import stats


MIN_SAMPLES = 2  # per task: one pair gives the degenerate interval [d, d], which can only warn


def _status(paired: stats.Paired, threshold: float, n_min: int) -> str:
    if paired.ci_high < -threshold:
        return "fail" if n_min >= MIN_SAMPLES else "warn"
    if paired.ci_low < -threshold:
        return "warn"
    return "pass"


def _summary(paired: stats.Paired, threshold: float, status: str, n_min: int) -> str:
    verdict = {"fail": f"a significant drop of more than {threshold:g} points",
               "warn": f"the interval reaches -{threshold:g}: possibly a drop, not significant",
               "pass": f"no drop beyond {threshold:g} points"}[status]
    if status == "warn" and paired.ci_high < -threshold:
        verdict = f"below -{threshold:g}, but under {MIN_SAMPLES} samples per task an interval decides nothing"
    return (f"{paired.mean_diff:+.2f} points, 95% CI [{paired.ci_low:+.2f}, {paired.ci_high:+.2f}] on {paired.n} "
            f"paired samples ({paired.wins} up, {paired.losses} down): {verdict}")


def common_scores(base: Cell, new: Cell) -> tuple[list[float], list[float]]:
    common = sorted(set(base.rows) & set(new.rows))
    return [float(base.rows[i]["score"]) for i in common], [float(new.rows[i]["score"]) for i in common]


def check(scope: str, base: Cell, new: Cell | None, threshold: float) -> Finding:
    if new is None:
        return Finding("scores", scope, "fail", "in BASE but missing from NEW: cannot be checked")
    old, now = common_scores(base, new)
    if not old:
        return Finding("scores", scope, "fail", "no sample in common: cannot be checked")
    paired = stats.paired(now, old)
    status = _status(paired, threshold, len(old))
    return Finding("scores", scope, status, _summary(paired, threshold, status, len(old)))


def check_average(scope: str, pairs: list[tuple[Cell, Cell]], threshold: float) -> Finding:
    """The mean over tasks of one method and budget; pairs are (BASE, NEW) cells with samples in common."""
    groups = [(now, old) for old, now in (common_scores(b, n) for b, n in pairs) if old]
    paired = stats.paired_average(groups)
    n_min = min(len(old) for old, _ in groups)
    status = _status(paired, threshold, n_min)
    return Finding("scores", scope, status, f"{len(groups)} tasks: " + _summary(paired, threshold, status, n_min))
