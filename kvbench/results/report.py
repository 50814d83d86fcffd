"""Comparison tables from stored rows, in the layout of the ChunkKV paper's Table 17: an "Avg len" row, an "n"
row (the distinct samples of each task column: one row rather than a footer, so CSV readers get it too and
columns of different n show it at a glance), a FullKV block, then one block per budget with a row per method;
task columns and Avg (the plain mean of the task scores, recomputed), the best cell of each column in bold
within a budget block, short task headers, and the protocol fingerprint under the table. Rows of different
fingerprints are never mixed in a cell (kvbench.results.selection). Rendering is kvbench.results.render's.

Options: `metric` tabulates another per-row field with the same layout (evidence retention, cross-layer
overlap; see kvbench.evidence); `add_ci` adds paired statistics against FullKV (kvbench.results.stats) to every cell,
computed on the samples both scored, with a legend line under the table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench import scoring
from kvbench.results import render as rendering, selection
from kvbench.data import TaskSpec, load_task_specs
from kvbench.errors import InputError

if TYPE_CHECKING:  # stats computes with numpy, whose import is most of a `kvbench table` start; only --ci needs it
    from kvbench.results import stats


@dataclass
class Cell:
    score: float  # task score, round(100 * mean, 2)
    n: int
    values: dict[str, float] = field(default_factory=dict)  # per sample id (0..1), for paired statistics

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self.values)


@dataclass
class Table:
    tasks: list[str]
    headers: list[str]
    avg_len: dict[str, float]
    blocks: list[tuple[str, list[tuple[str, dict[str, Cell]]]]]  # (budget label, [(method, {task: cell})])
    protocol_fps: list[str]
    notes: list[str] = field(default_factory=list)
    metric: str = "score"
    reference: tuple[str, str] | None = None  # (budget, method) of FullKV, when add_ci ran
    ci: dict[tuple[str, str], dict[str, stats.Paired]] = field(default_factory=dict)  # (budget, method) -> task/Avg
    ci_n: dict[str, int] = field(default_factory=dict)  # the reference's samples per task
    omitted: list[str] = field(default_factory=list)  # tasks with no value of the metric (no known evidence)
    samples: dict[str, int] = field(default_factory=dict)  # per task, the distinct samples of its column (the n row)
    skipped: str = ""  # selection.skipped_note of result lines that held no row (markdown prints it under the table)

    def row_average(self, cells: dict[str, Cell]) -> float | None:
        if any(t not in cells for t in self.tasks):
            return None
        return scoring.average({t: cells[t].score for t in self.tasks})


DISPLAY = {
    "fullkv": "FullKV", "streamingllm": "StreamingLLM", "h2o": "H2O", "h2o_prefill": "H2O (prefill)",
    "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "chunkkv": "ChunkKV", "tova": "TOVA",
    "scissorhands": "Scissorhands", "random": "Random", "sliding": "Sliding window", "sink_recent": "Sink+recent",
    "knorm": "KNorm",
    # presets (configs/methods.yaml)
    "streamingllm_prefill": "StreamingLLM (prefill)", "snapkv_official": "SnapKV (official)",
    "snapkv_kvpress": "SnapKV (kvpress)", "chunkkv_reuse": "ChunkKV (reuse)", "chunkkv_kvpress": "ChunkKV (kvpress)",
    "knorm_factory": "KNorm (Factory)", "h2o_factory_2024": "H2O (Factory 2024)", "chunkkv_paper": "ChunkKV (Alg. 1)",
    "scissorhands_authors": "Scissorhands (authors)",
}


def display(method: str) -> str:
    """A method label for tables: `snapkv` -> SnapKV; an ablation `snapkv(kernel_size=5)` (a run with
    --method-arg) -> SnapKV (kernel_size=5); `snapkv_official(window_size=16)` -> SnapKV (official, window_size=16)."""
    name, paren, args = method.partition("(")
    if not paren or not args.endswith(")"):
        return DISPLAY.get(method, method)
    base = DISPLAY.get(name, name)
    return f"{base[:-1]}, {args}" if base.endswith(")") else f"{base} ({args}"


def budget_title(label: str) -> str:
    if label == "full":
        return "Full"
    if label.startswith("r"):
        return f"{float(label[1:]) * 100:g}%"
    return f"{label[1:]} tok"


# --metric: which row field a table shows (x100, mean over samples); rows where it is null are left out.
METRICS = {
    "score": "score",
    "retention": "evidence_retention_mean",
    "retention_min": "evidence_retention_min",
    "overlap": "layer_overlap",
}


def stored_model_name(rows: Sequence[dict[str, Any]], text: str) -> str:
    """The model name rows carry for a --model value: the name itself, an alias in any case, a .gguf file's
    stem or a model directory's name (what `kvbench run` stores), matched against the rows without loading
    the model's code or files (a table must not need torch, nor the weights on this machine)."""
    present = sorted({str(r.get("model")) for r in rows})
    given = text.strip()
    for candidate in (given, given.lower(), Path(given).stem, Path(given.rstrip("/")).name):
        if candidate in present:
            return candidate
    raise InputError(f"--model {text}: no results for that model; the results hold {', '.join(present) or 'none'}")


def build_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str] | None = None, model: str | None = None,
                specs: dict[str, TaskSpec] | None = None, metric: str = "score") -> Table:
    if metric not in METRICS:
        raise InputError(f"{{metric}} must be one of {', '.join(METRICS)}, got '{metric}'", options=("metric",))
    field_name = METRICS[metric]
    specs = specs or load_task_specs()
    if model is not None:
        rows = [r for r in rows if r.get("model") == model]
        if not rows:
            raise InputError(f"no results for model '{model}'")
    if not rows:
        raise InputError("no result rows found")
    models_seen = sorted({r.get("model", "?") for r in rows})
    if len(models_seen) > 1:
        raise InputError(f"results hold several models ({', '.join(models_seen)}); pick one with {{model}}",
                         options=("model",))
    present = sorted({r["task"] for r in rows}, key=lambda t: list(specs).index(t) if t in specs else 10**6)
    if tasks:
        missing = [t for t in tasks if t not in present]
        if missing:
            raise InputError(f"no results for task(s) {', '.join(missing)}")
        present = [t for t in present if t in tasks]
        rows = [r for r in rows if r["task"] in present]
    selection.check(rows)  # kvbench table and plot ran selection.pick first, whose refusals also name the files
    protocol = sorted({r["protocol_fp"] for r in rows})

    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["budget"], row["method"], row["task"])].append(row)
    cells: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    for (budget, method, task), group in grouped.items():
        valued = [r for r in group if r.get(field_name) is not None]
        if not valued:
            continue  # e.g. retention on a task without known evidence, overlap of FullKV
        cells[(budget, method)][task] = Cell(
            score=scoring.task_score([float(r[field_name]) for r in valued]),
            n=len(valued),
            values={r["_id"]: float(r[field_name]) for r in valued},
        )
    omitted = [t for t in present if not any(t in c for c in cells.values())]
    if omitted and len(omitted) == len(present):
        raise InputError(f"no row has a value of '{field_name}' ({{metric}} {metric}): no task with known evidence, "
                         "only FullKV rows, or results written before kvbench recorded it", options=("metric",))
    present = [t for t in present if t not in omitted]
    lengths: dict[str, dict[str, float]] = defaultdict(dict)  # task -> sample id -> LongBench length
    for row in rows:
        lengths[row["task"]][row["_id"]] = row["length"]
    avg_len = {task: sum(lengths[task].values()) / len(lengths[task]) for task in present}

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
        metric=metric,
        omitted=[specs[t].short if t in specs else t for t in omitted],
    )
    table.samples = {t: len(set().union(*(c[t].ids for _, entries in blocks for _, c in entries if t in c)))
                     for t in present}
    _note_unequal_samples(table)
    return table


def add_ci(table: Table, n_resamples: int | None = None, seed: int = 0) -> Table:
    """Paired statistics of every cell against FullKV's cell of the same task, on the intersection of their
    sample ids; the Avg column's by a bootstrap stratified over tasks (rows having every task only).
    n_resamples None: stats.N_RESAMPLES."""
    from kvbench.results import stats

    n_resamples = stats.N_RESAMPLES if n_resamples is None else n_resamples
    if table.metric != "score":
        raise InputError("{ci} applies to {metric} score only", options=("ci", "metric"))
    reference = _reference(table)
    ref_cells = dict(dict(table.blocks)[reference[0]])[reference[1]]
    table.reference = reference
    table.ci_n = {t: ref_cells[t].n for t in table.tasks if t in ref_cells}
    for budget, entries in table.blocks:
        for method, cells in entries:
            if (budget, method) == reference:
                continue
            out: dict[str, stats.Paired] = {}
            groups = []
            for task in table.tasks:
                if task not in cells or task not in ref_cells:
                    continue
                ids = sorted(cells[task].ids & ref_cells[task].ids)
                if not ids:
                    continue
                pair = ([cells[task].values[i] for i in ids], [ref_cells[task].values[i] for i in ids])
                out[task] = stats.paired(*pair, n_resamples=n_resamples, seed=seed)
                groups.append(pair)
            if out and len(groups) == len(table.tasks):
                out["Avg"] = stats.paired_average(groups, n_resamples=n_resamples, seed=seed)
            table.ci[(budget, method)] = out
    return table


def _reference(table: Table) -> tuple[str, str]:
    for budget, entries in table.blocks:
        if budget != "full":
            continue
        names = [m for m, _ in entries]
        if "fullkv" in names:
            return (budget, "fullkv")
        if len(names) == 1:
            return (budget, names[0])
    raise InputError("{ci} needs FullKV rows (run method fullkv on the same samples) to pair against",
                     options=("ci",))


def _budget_order(label: str) -> tuple[int, float]:
    if label == "full":
        return (0, 0.0)
    return (1, float(label[1:])) if label.startswith("r") else (2, float(label[1:]))


def _method_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table 17's row order (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, ChunkKV), each preset right after
    its base method (h2o_prefill counts as H2O), then the other methods by name."""
    paper = ["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]
    base = {r["method"]: r.get("method_base", r["method"]) for r in rows}

    def key(method: str) -> tuple[int, bool, str]:
        family = base[method].removesuffix("_prefill")
        return (paper.index(family) if family in paper else len(paper), method != base[method], method)

    return sorted(base, key=key)


def _note_unequal_samples(table: Table) -> None:
    """Differences are only meaningful on identical samples: flag columns where they differ."""
    for index, task in enumerate(table.tasks):
        sets = {c[task].ids for _, entries in table.blocks for _, c in entries if task in c}
        if len(sets) > 1:
            table.notes.append(f"{table.headers[index]}: methods were scored on different sample sets (an unfinished run?)")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _fmt_ci(value: float | None, pair: stats.Paired | None, n_reference: int | None, missing: str = "–") -> str:
    """'38.67 (+0.07 ±1.2)', then ↑/↓ when the bootstrap CI excludes 0 and † when the sign test has p < 0.05."""
    text = missing if value is None else _fmt(value)
    if value is None or pair is None:
        return text
    text += f" ({pair.mean_diff:+.2f} ±{pair.half_width:.1f}"
    if n_reference is not None and pair.n != n_reference:
        text += f", n={pair.n}"
    text += ")" + {1: "↑", -1: "↓", 0: ""}[pair.direction] + ("†" if pair.sign_p < 0.05 else "")
    return text


def _grid(table: Table, csv: bool = False) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, body rows of strings, and which cells are the best of their column within a budget block. For
    CSV, numbers have no thousands separators and a missing value is an empty cell (spreadsheets read both)."""
    header = ["KV", "Method", *table.headers, "Avg"]
    length = "{:.0f}" if csv else "{:,.0f}"
    body: list[list[str]] = [["", "Avg len", *[length.format(table.avg_len[t]) for t in table.tasks], ""],
                             ["", "n", *[str(table.samples[t]) for t in table.tasks], ""]]
    bold: list[list[bool]] = [[False] * len(header)] * 2
    for budget, entries in table.blocks:
        columns = [[c[t].score if t in c else None for _, c in entries] for t in table.tasks]
        averages = [table.row_average(c) for _, c in entries]
        best = [max((v for v in col if v is not None), default=None) for col in [*columns, averages]]
        for i, (method, c) in enumerate(entries):
            values = [c[t].score if t in c else None for t in table.tasks] + [averages[i]]
            marks = [len(entries) > 1 and v is not None and v == b and table.metric != "overlap"
                     for v, b in zip(values, best)]
            pairs = table.ci.get((budget, method), {})  # empty unless add_ci ran: plain values then
            texts = [_fmt_ci(v, pairs.get(t), table.ci_n.get(t), "" if csv else "–")
                     for v, t in zip(values, [*table.tasks, "Avg"])]
            body.append([budget_title(budget) if i == 0 else "", display(method), *texts])
            bold.append([False, False, *marks])
    return header, body, bold


def render_markdown(table: Table) -> str:
    header, body, bold = _grid(table)
    lines = rendering.markdown(header, body, 2, bold)
    lines.append("")
    if table.reference is not None:
        lines.append(_legend(table))
        lines.append("")
    lines.append(_footer(table))
    if table.skipped:
        lines += ["", table.skipped]
    return "\n".join(lines) + "\n"


def render_latex(table: Table) -> str:
    header, body, bold = _grid(table)
    caption = (_legend(table) + " " if table.reference is not None else "") + _footer(table)
    starts = [index for index, row in enumerate(body) if index > 0 and row[0]]  # a budget block begins
    return rendering.latex(header, body, 2, bold, rules_before=starts, caption=caption)


def render_csv(table: Table) -> str:
    header, body, _ = _grid(table, csv=True)
    rows, current = [], ""
    for index, row in enumerate(body):  # every method row names its budget block, so each line stands alone
        current = row[0] or current
        rows.append([current if index >= 2 else "", *row[1:]])  # rows 0, 1: Avg len and n
    return rendering.csv(header, rows)


def _legend(table: Table) -> str:
    """The --ci legend: what the parenthesis and the marks mean, and the number of paired samples."""
    from kvbench.results import stats

    first = next((p for pairs in table.ci.values() for p in pairs.values()), None)
    resamples, seed = (first.n_resamples, first.seed) if first else (stats.N_RESAMPLES, 0)
    n = ", ".join(f"{h} {table.ci_n[t]}" for t, h in zip(table.tasks, table.headers) if t in table.ci_n)
    return (f"Cells: score (Δ ±h). Δ = mean paired difference to {display(table.reference[1])} in points on the "
            f"samples both scored (n per task: {n}; a cell with fewer pairs shows its n); Δ ± h contains the paired "
            f"bootstrap 95% percentile interval (h = its longer arm; {resamples:,} resamples, seed {seed}; Avg "
            f"resampled within each task). ↑/↓ = Δ ± h excludes 0 (a significant gain/loss); † = exact two-sided "
            f"sign test p < 0.05 (ties dropped).")


METRIC_TEXT = {
    "score": "Scores: LongBench official metrics, task score = round(100 x mean, 2); Avg = plain mean of the task "
             "scores.",
    "retention": "Evidence retention x 100: per sample, the fraction of (KV head, evidence token) pairs kept right "
                 "after compression, averaged over layers; mean over samples. Evidence: the gold paragraph "
                 "(passage retrieval) or the needles (synthetic); FullKV keeps all of it. Avg = plain mean of the "
                 "task values.",
    "retention_min": "Evidence retention x 100, worst layer: per sample, the minimum over layers of the fraction "
                     "of (KV head, evidence token) pairs kept right after compression; mean over samples. Avg = "
                     "plain mean of the task values.",
    "overlap": "Cross-layer overlap x 100: per sample, the Jaccard similarity of the kept index sets of adjacent "
               "layers (per KV head, averaged over heads and layer pairs; the ChunkKV paper's Table 2 measure); "
               "mean over samples. FullKV evicts nothing and has none. Avg = plain mean of the task values.",
}


def _footer(table: Table) -> str:
    text = f"{METRIC_TEXT[table.metric]} Protocol fingerprint: {', '.join(table.protocol_fps)}."
    if table.metric.startswith("retention"):
        counts = {t: max((c[t].n for _, entries in table.blocks for _, c in entries if t in c), default=0)
                  for t in table.tasks}
        text += (" Samples with evidence in the prompt (the rest lost it to middle truncation): "
                 + ", ".join(f"{h} {counts[t]}" for t, h in zip(table.tasks, table.headers)) + ".")
    if table.omitted:  # only metrics that some tasks lack: the runner gives every row a score
        text += f" Tasks without values (no known evidence) left out: {', '.join(table.omitted)}."
    for note in table.notes:
        text += f" Note: {note}."
    return text


RENDERERS = {"md": render_markdown, "markdown": render_markdown, "latex": render_latex, "csv": render_csv}


def render(table: Table, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise InputError(f"{{format}} must be md, latex or csv, got '{fmt}'", options=("format",))
    return RENDERERS[fmt](table)
