"""Comparison tables from stored rows, in the layout of the ChunkKV paper's Table 17: an "Avg len" row, a
FullKV block, then one block per budget with a row per method; task columns and Avg (the plain mean of the
task scores, recomputed), the best cell of each column in bold within a budget block, short task headers,
and the protocol fingerprint under the table. Rows of different fingerprints are never mixed in a cell."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbench import scoring
from kvbench.data import TaskSpec, load_task_specs
from kvbench.errors import InputError


@dataclass
class Cell:
    score: float  # task score, round(100 * mean, 2)
    n: int
    ids: frozenset[str]


@dataclass
class Table:
    tasks: list[str]
    headers: list[str]
    avg_len: dict[str, float]
    blocks: list[tuple[str, list[tuple[str, dict[str, Cell]]]]]  # (budget label, [(method, {task: cell})])
    protocol_fps: list[str]
    notes: list[str] = field(default_factory=list)

    def row_average(self, cells: dict[str, Cell]) -> float | None:
        if any(t not in cells for t in self.tasks):
            return None
        return scoring.average({t: cells[t].score for t in self.tasks})


DISPLAY = {
    "fullkv": "FullKV", "streamingllm": "StreamingLLM", "h2o": "H2O", "h2o_prefill": "H2O (prefill)",
    "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "chunkkv": "ChunkKV", "tova": "TOVA",
    "scissorhands": "Scissorhands", "random": "Random", "sliding": "Sliding window", "sink_recent": "Sink+recent",
    "knorm": "KNorm",
}


def display(method: str) -> str:
    return DISPLAY.get(method, method)


def budget_title(label: str) -> str:
    if label == "full":
        return "Full"
    if label.startswith("r"):
        return f"{float(label[1:]) * 100:g}%"
    return f"{label[1:]} tok"


def build_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str] | None = None, model: str | None = None,
                specs: dict[str, TaskSpec] | None = None) -> Table:
    specs = specs or load_task_specs()
    if model is not None:
        rows = [r for r in rows if r.get("model") == model]
        if not rows:
            raise InputError(f"no results for model '{model}'")
    if not rows:
        raise InputError("no result rows found")
    models_seen = sorted({r.get("model", "?") for r in rows})
    if len(models_seen) > 1:
        raise InputError(f"results hold several models ({', '.join(models_seen)}); pick one with --model")
    present = sorted({r["task"] for r in rows}, key=lambda t: list(specs).index(t) if t in specs else 10**6)
    if tasks:
        missing = [t for t in tasks if t not in present]
        if missing:
            raise InputError(f"no results for task(s) {', '.join(missing)}")
        present = [t for t in present if t in tasks]
        rows = [r for r in rows if r["task"] in present]
    protocol = sorted({r["protocol_fp"] for r in rows})
    if len(protocol) > 1:
        raise InputError(
            f"results under {len(protocol)} protocol fingerprints ({', '.join(protocol)}) cannot share a table; "
            "move one set elsewhere or select it with --results"
        )
    for task in present:
        fps = sorted({r["task_fp"] for r in rows if r["task"] == task})
        if len(fps) > 1:
            raise InputError(f"task {task}: rows from {len(fps)} different data/prompt fingerprints; refusing to mix them")

    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["budget"], row["method"], row["task"])].append(row)
    cells: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    for (budget, method, task), group in grouped.items():
        configs = {r["config_fp"] for r in group}
        if len(configs) > 1:
            raise InputError(
                f"{method} at {budget} on {task}: rows of {len(configs)} configurations (different "
                "hyper-parameters or scope); give them different preset names or separate result dirs"
            )
        cells[(budget, method)][task] = Cell(
            score=scoring.task_score([float(r["score"]) for r in group]),
            n=len(group),
            ids=frozenset(r["_id"] for r in group),
        )
    avg_len = {}
    for task in present:
        lengths = {r["_id"]: r["length"] for r in rows if r["task"] == task}
        avg_len[task] = sum(lengths.values()) / len(lengths)

    budgets = sorted({b for b, _ in cells}, key=_budget_order)
    method_order = _method_order(rows)
    blocks = []
    for budget in budgets:
        entries = [(m, cells[(budget, m)]) for m in method_order if (budget, m) in cells]
        blocks.append((budget, entries))
    table = Table(
        tasks=present,
        headers=[specs[t].short if t in specs else t for t in present],
        avg_len=avg_len,
        blocks=blocks,
        protocol_fps=protocol,
    )
    _note_unequal_samples(table)
    return table


def _budget_order(label: str) -> tuple[int, float]:
    if label == "full":
        return (0, 0.0)
    return (1, float(label[1:])) if label.startswith("r") else (2, float(label[1:]))


def _method_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    paper = ["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]
    names = sorted({r["method"] for r in rows})
    return sorted(names, key=lambda m: (paper.index(m) if m in paper else len(paper), m))


def _note_unequal_samples(table: Table) -> None:
    """Differences are only meaningful on identical samples: flag columns where they differ."""
    for index, task in enumerate(table.tasks):
        sets = {c[task].ids for _, entries in table.blocks for _, c in entries if task in c}
        if len(sets) > 1:
            table.notes.append(f"{table.headers[index]}: methods were scored on different sample sets (an unfinished run?)")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _grid(table: Table) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, body rows of strings, and which cells are the best of their column within a budget block."""
    header = ["KV", "Method", *table.headers, "Avg"]
    body: list[list[str]] = [["", "Avg len", *[f"{table.avg_len[t]:,.0f}" for t in table.tasks], ""]]
    bold: list[list[bool]] = [[False] * len(header)]
    for budget, entries in table.blocks:
        columns = [[c[t].score if t in c else None for _, c in entries] for t in table.tasks]
        averages = [table.row_average(c) for _, c in entries]
        best = [max((v for v in col if v is not None), default=None) for col in [*columns, averages]]
        for i, (method, c) in enumerate(entries):
            values = [c[t].score if t in c else None for t in table.tasks] + [averages[i]]
            marks = [len(entries) > 1 and v is not None and v == b for v, b in zip(values, best)]
            body.append([budget_title(budget) if i == 0 else "", display(method), *[_fmt(v) for v in values]])
            bold.append([False, False, *marks])
    return header, body, bold


def render_markdown(table: Table) -> str:
    header, body, bold = _grid(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row, marks in zip(body, bold):
        lines.append("| " + " | ".join(f"**{v}**" if m else v for v, m in zip(row, marks)) + " |")
    lines.append("")
    lines.append(_footer(table))
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("–", "--")):
        text = text.replace(a, b)
    return text


def render_latex(table: Table) -> str:
    header, body, bold = _grid(table)
    cols = "ll" + "r" * (len(header) - 2)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for index, (row, marks) in enumerate(zip(body, bold)):
        if index > 0 and row[0]:
            out.append(r"\midrule")
        cells = [rf"\textbf{{{_latex_escape(v)}}}" if m else _latex_escape(v) for v, m in zip(row, marks)]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(_footer(table))}}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def render_csv(table: Table) -> str:
    header, body, _ = _grid(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    current = ""
    for row in body:
        current = row[0] or current
        writer.writerow([current if row[1] != "Avg len" else "", *row[1:]])
    return buffer.getvalue()


def _footer(table: Table) -> str:
    text = (f"Scores: LongBench official metrics, task score = round(100 x mean, 2); Avg = plain mean of the task "
            f"scores. Protocol fingerprint: {', '.join(table.protocol_fps)}.")
    for note in table.notes:
        text += f" Note: {note}."
    return text


RENDERERS = {"md": render_markdown, "markdown": render_markdown, "latex": render_latex, "csv": render_csv}


def render(table: Table, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise InputError(f"--format must be md, latex or csv, got '{fmt}'")
    return RENDERERS[fmt](table)
