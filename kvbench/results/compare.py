"""`kvbench compare BASE NEW`: the regression gate between two result sets.

Both sets must be under one and the same protocol fingerprint (model weights, dtype, truncation, prompt,
metric and engine versions), and each (method, budget, task) must have the same configuration fingerprint
on both sides (hyper-parameters, scope, data); anything else is refused, never averaged. Scores are compared
only on the samples both sets hold (the intersection of sample ids), and every line says how many that is.
This module validates the pair and tabulates the score deltas; the checks that pass or fail the gate (exact,
scores, cost) are `kvbench.gate`'s."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench import scoring
from kvbench.results import render as rendering, report, selection, store
from kvbench.data import load_task_specs
from kvbench.errors import InputError

FORMATS = ("text", "md")
Key = tuple[str, str, str]  # (method, budget, task)


@dataclass
class Line:
    method: str
    budget: str
    task: str
    n: int  # samples both sets hold
    n_base: int
    n_new: int
    base: float | None = None  # task score on the common samples, round(100 x mean, 2)
    new: float | None = None

    @property
    def delta(self) -> float | None:
        return None if self.base is None or self.new is None else round(self.new - self.base, 2)


@dataclass
class Average:
    method: str
    budget: str
    tasks: int
    base: float
    new: float

    @property
    def delta(self) -> float:
        return round(self.new - self.base, 2)


@dataclass
class Comparison:
    base_dir: Path
    new_dir: Path
    protocol_fp: str
    lines: list[Line]
    averages: list[Average]
    only_base: list[Key] = field(default_factory=list)
    only_new: list[Key] = field(default_factory=list)


def _grouped(rows: list[dict[str, Any]], side: str, root: Path) -> tuple[str, dict[Key, dict[str, Any]]]:
    """One side's protocol fingerprint and, per (method, budget, task), its config fp and {id: score}."""
    if not rows:
        raise InputError(f"{side} {root}: no result rows")
    protocols = sorted({str(r.get("protocol_fp")) for r in rows})
    if len(protocols) > 1:
        raise InputError(f"{side} {root}: rows under {len(protocols)} protocol fingerprints ({', '.join(protocols)}); "
                         "compare needs one result set per side")
    groups: dict[Key, dict[str, Any]] = defaultdict(lambda: {"configs": set(), "scores": {}})
    for row in rows:
        group = groups[(row["method"], row["budget"], row["task"])]
        group["method_base"] = row.get("method_base", row["method"])  # presets sort after their base, as in tables
        group["configs"].add(row["config_fp"])
        group["scores"][row["_id"]] = float(row["score"])
    for (method, budget, task), group in groups.items():
        if len(group["configs"]) > 1:
            raise InputError(f"{side} {root}: {method} at {budget} on {task} has rows of "
                             f"{len(group['configs'])} configurations; refusing to mix them")
    return protocols[0], dict(groups)


def compare_dirs(base_dir: Path, new_dir: Path) -> Comparison:
    base_fp, base = _grouped(selection.scored(store.load_results(base_dir, "BASE")).rows, "BASE", base_dir)
    new_fp, new = _grouped(selection.scored(store.load_results(new_dir, "NEW")).rows, "NEW", new_dir)
    if base_fp != new_fp:
        raise InputError(
            f"BASE and NEW are under different protocol fingerprints ({base_fp} vs {new_fp}: model weights, dtype, "
            "truncation length or prompt/metric/engine version differ); refusing to compare"
        )
    specs = load_task_specs()
    task_order = {name: i for i, name in enumerate(specs)}
    methods = [{"method": k[0], "method_base": g["method_base"]} for k, g in [*base.items(), *new.items()]]
    method_order = {m: i for i, m in enumerate(report._method_order(methods))}

    def order(key: Key) -> tuple:
        return (report._budget_order(key[1]), method_order[key[0]], task_order.get(key[2], len(task_order)), key[2])

    lines = []
    for key in sorted(set(base) & set(new), key=order):
        if base[key]["configs"] != new[key]["configs"]:
            raise InputError(
                f"{key[0]} at {key[1]} on {key[2]}: configuration fingerprints differ between BASE and NEW "
                "(hyper-parameters, scope, prompt or data changed); refusing to compare"
            )
        b, n = base[key]["scores"], new[key]["scores"]
        common = sorted(set(b) & set(n))
        line = Line(*key, n=len(common), n_base=len(b), n_new=len(n))
        if common:
            line.base = scoring.task_score([b[i] for i in common])
            line.new = scoring.task_score([n[i] for i in common])
        lines.append(line)
    per_row: dict[tuple[str, str], list[Line]] = defaultdict(list)
    for line in lines:
        if line.delta is not None:
            per_row[(line.method, line.budget)].append(line)
    averages = [
        Average(method, budget, len(group),
                scoring.average({ln.task: ln.base for ln in group}), scoring.average({ln.task: ln.new for ln in group}))
        for (method, budget), group in per_row.items()
    ]
    return Comparison(
        base_dir, new_dir, base_fp, lines, averages,
        only_base=sorted(set(base) - set(new), key=order), only_new=sorted(set(new) - set(base), key=order),
    )


def _fmt(value: float | None, signed: bool = False) -> str:
    return f"{value:+.2f}" if signed and value is not None else report._fmt(value)


def _task_label(task: str, specs: dict) -> str:
    return specs[task].short if task in specs else task


def _tables(result: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    specs = load_task_specs()
    head = ["Method", "KV", "Task", "Base", "New", "Delta", "Samples"]
    body = []
    for line in result.lines:
        samples = str(line.n) if line.n == line.n_base == line.n_new else f"{line.n} (of {line.n_base}/{line.n_new})"
        body.append([report.display(line.method), report.budget_title(line.budget), _task_label(line.task, specs),
                     _fmt(line.base), _fmt(line.new), _fmt(line.delta, signed=True), samples])
    avg_head = ["Method", "KV", "Tasks", "Base avg", "New avg", "Delta"]
    avg_body = [[report.display(a.method), report.budget_title(a.budget), str(a.tasks), _fmt(a.base), _fmt(a.new),
                 _fmt(a.delta, signed=True)] for a in result.averages]
    return head, body, avg_head, avg_body


def _notes(result: Comparison) -> list[str]:
    notes = [
        f"BASE {result.base_dir} vs NEW {result.new_dir}; protocol fingerprint {result.protocol_fp}.",
        "Scores are computed on the samples both sets hold (the intersection of sample ids); "
        "'Samples' gives that count (and each side's own when they differ). Average = mean of the task scores "
        "of that method and budget.",
    ]
    notes += [f"Only in BASE: {m} {b} {t}." for m, b, t in result.only_base]
    notes += [f"Only in NEW: {m} {b} {t}." for m, b, t in result.only_new]
    return notes


def render(result: Comparison, fmt: str = "text") -> str:
    head, body, avg_head, avg_body = _tables(result)
    notes = _notes(result)
    if fmt == "md":
        tables = [*rendering.markdown(head, body, 3), "", *rendering.markdown(avg_head, avg_body, 3)]
    else:
        tables = [*rendering.text(head, body, 3), "", *rendering.text(avg_head, avg_body, 3)]
    return "\n".join([*tables, "", *notes]) + "\n"


def check_options(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format must be text or md, got '{fmt}'")
