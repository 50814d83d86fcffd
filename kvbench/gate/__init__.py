"""The regression gate behind `kvbench compare BASE NEW`: three checks per (method, budget, task).

- exact (`kvbench.gate.exact`): changed predictions, listed; fails under --exact.
- scores (`kvbench.gate.scores`): paired bootstrap interval of NEW - BASE against -threshold.
- cost (`kvbench.gate.cost`): speed and memory ratios against tolerances, timings on the same device only.

`kvbench.results.compare.compare_dirs` validates the pair first (one protocol fingerprint, the same
configuration per cell) and gives the order of the cells; the gate adds the checks. Pure over loaded rows."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kvbench.errors import InputError
from kvbench.gate import cost, exact, scores, sets
from kvbench.gate.findings import Finding, GateReport
from kvbench.results.compare import Comparison

DEFAULT_THRESHOLD = 1.0  # points; see check_options


@dataclass(frozen=True)
class GateOptions:
    exact: bool = False
    threshold: float = DEFAULT_THRESHOLD
    tolerance: cost.Tolerance = field(default_factory=cost.Tolerance)

    def flags(self) -> str:
        return (f"{'--exact ' if self.exact else ''}--fail-below {self.threshold:g} "
                f"--max-slowdown {self.tolerance.max_slowdown:g} --max-memory {self.tolerance.max_memory:g}"
                f"{'' if self.tolerance.gate_timings else ' --no-timings'}")


def check_options(options: GateOptions) -> None:
    if not options.threshold >= 0:
        raise InputError(f"--fail-below must be a number of points >= 0, got {options.threshold}")
    if not options.tolerance.max_slowdown >= 1:
        raise InputError(f"--max-slowdown must be a ratio >= 1 (1.2: 20% slower fails), got "
                         f"{options.tolerance.max_slowdown}")
    if not options.tolerance.max_memory >= 1:
        raise InputError(f"--max-memory must be a ratio >= 1 (1.05: 5% more fails), got {options.tolerance.max_memory}")


def _check_exact_devices(base: sets.ResultSet, new: sets.ResultSet) -> None:
    """--exact compares greedy decodes bit for bit, which only one device guarantees: refuse a cross-device pair
    rather than fail it for a flipped token that says nothing about the change under test."""
    devices = base.devices | new.devices
    if len(devices) > 1 or None in devices:
        def names(s: sets.ResultSet) -> str:
            return ", ".join(sorted(d or "unknown (no manifest)" for d in s.devices))

        raise InputError(f"--exact needs BASE and NEW made on one device (BASE: {names(base)}; NEW: {names(new)}); "
                         "make the baseline on this device or drop --exact")


def run(comparison: Comparison, options: GateOptions) -> GateReport:
    base, new = sets.load(comparison.base_dir), sets.load(comparison.new_dir)
    if options.exact:
        _check_exact_devices(base, new)
    keys = [(ln.method, ln.budget, ln.task) for ln in comparison.lines] + list(comparison.only_base)
    found: list[Finding] = []
    per_row: dict[tuple[str, str], list[tuple[sets.Cell, sets.Cell]]] = defaultdict(list)
    for key in keys:
        old, now = base.cells[key], new.cells.get(key)
        scope = sets.label(key)
        found.append(exact.check(scope, old, now, options.exact))
        found.append(scores.check(scope, old, now, options.threshold))
        found.append(cost.check(scope, old, now, options.tolerance))
        if now is not None and set(old.rows) & set(now.rows):
            per_row[key[:2]].append((old, now))
    for (method, budget), pairs in per_row.items():
        if len(pairs) > 1:
            found.append(scores.check_average(f"{method} {budget} average", pairs, options.threshold))
    return GateReport(tuple(found), options.flags())


def gate(base_dir: Path, new_dir: Path, options: GateOptions) -> GateReport:
    """The Python API: validate the pair and run the checks."""
    from kvbench.results.compare import compare_dirs

    check_options(options)
    return run(compare_dirs(base_dir, new_dir), options)
