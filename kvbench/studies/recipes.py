"""Paper recipes: a published LongBench table as data (kvbench/configs/recipes/<name>.yaml), the run that
reproduces it, and our numbers beside the paper's.

A recipe holds the paper's setting (model alias, tasks, ratio or budget, scope, GQA granularity, truncation),
the assumptions it makes where the paper is silent (each with why), and one row per published method: the
kvbench method or preset that reproduces it, the published task scores and Avg, and where they were read.

`expand` turns a recipe into `kvbench run` options, its GQA granularity included (`--granularity query_head`
where the source selected per query head, KVCache-Factory's default). `--model`, `--tasks` (a subset of the
recipe's), `--limit` and `--data-dir` may override it; the overrides go into every row's `recipe` field, which
is no part of any fingerprint: the options it expands to are fingerprinted as for any run. `side_by_side`
builds paper / ours / delta per cell from stored rows of the recipe's configuration (through
kvbench.results.report's table data), keeping the paper's printed Avg and flagging one that is not the mean of
its own task scores."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench import resources
from kvbench.budget import Budget
from kvbench.data import load_task_specs
from kvbench.errors import InputError
from kvbench.granularity import GRANULARITIES
from kvbench.registry import did_you_mean
from kvbench.results import report
from kvbench.results.render import latex_escape

SCOPES = ("full", "context")
# A printed average may differ from the mean of the printed (rounded) scores by rounding: each score is off by
# at most 0.005 and the printed average by another 0.005.
AVG_TOLERANCE = 0.01 + 1e-9
FIELDS = {"paper", "table", "model", "tasks", "data", "ratio", "budget", "scope", "granularity", "max_length",
          "states", "assumptions", "rows"}
ROW_FIELDS = {"paper", "method", "scores", "avg", "source", "note"}


@dataclass(frozen=True)
class Assumption:
    setting: str
    value: str
    why: str


@dataclass(frozen=True)
class PaperRow:
    paper: str  # the row's name in the paper
    method: str  # the kvbench method or preset that reproduces it
    scores: dict[str, float]  # task -> published score
    avg: float | None  # the printed Avg (None: the source prints none)
    source: str  # where these numbers were read
    note: str = ""

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    @property
    def avg_mismatch(self) -> bool:
        """The printed Avg is not the mean of the row's printed task scores, even allowing for rounding."""
        return self.avg is not None and abs(self.avg - self.mean) > AVG_TOLERANCE


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    table: str
    model: str
    tasks: tuple[str, ...]
    data: str
    ratio: float | None
    budget: int | None
    scope: str
    granularity: str
    max_length: int | None
    states: tuple[str, ...]
    assumptions: tuple[Assumption, ...]
    rows: tuple[PaperRow, ...]

    @property
    def kv_budget(self) -> Budget:
        return Budget(ratio=self.ratio) if self.ratio is not None else Budget(tokens=self.budget)

    @property
    def methods(self) -> list[str]:
        return [row.method for row in self.rows]

    def granularity_of(self, method: str) -> str:
        """The granularity `method`'s rows run at under this recipe: the recipe's, except for methods whose
        query heads cannot keep different tokens (positional, layer-shared, FullKV), which the engine runs at
        kv_head (same output, 1/g of the memory; kvbench.engine.compress.storage_granularity). Builds the
        method, so it imports the engine (torch): the table path asks only where the rows cannot tell."""
        if self.granularity == "kv_head":
            return "kv_head"
        from kvbench import methods
        from kvbench.engine.compress import storage_granularity

        return storage_granularity(methods.build(method).method, self.granularity)

    def expand(self, overrides: "Overrides") -> "Expansion":
        """The `kvbench run` options of this recipe, with the allowed overrides applied and recorded."""
        given: dict[str, Any] = {}
        model = self.model
        if overrides.model is not None and overrides.model.strip().lower() != self.model:
            model = given["model"] = overrides.model.strip()
        tasks = list(self.tasks)
        if overrides.tasks is not None:
            picked = [t.strip() for t in overrides.tasks.split(",") if t.strip()]
            outside = [t for t in picked if t not in self.tasks]
            if not picked or outside:
                raise InputError(f"--tasks must name tasks of recipe {self.name} ({', '.join(self.tasks)}), "
                                 f"got '{overrides.tasks}'")
            if picked != tasks:
                tasks = given["tasks"] = picked
        if overrides.limit is not None:
            given["limit"] = overrides.limit
        if overrides.data_dir is not None:
            given["data_dir"] = str(overrides.data_dir)
        stamp = {"name": self.name, "granularity": self.granularity, "overrides": given}
        return Expansion(
            model=model,
            method=",".join(self.methods),
            ratios=[self.ratio] if self.ratio is not None else None,
            budget=self.budget,
            tasks=",".join(tasks),
            data=self.data,
            data_dir=overrides.data_dir,
            limit=overrides.limit,
            scope=self.scope,
            granularity=self.granularity,
            # the recipe's truncation belongs to its model; an overriding model keeps its own rule
            max_length=self.max_length if "model" not in given else None,
            stamp=stamp,
        )


@dataclass(frozen=True)
class Overrides:
    """What `kvbench run --recipe` lets the caller change."""

    model: str | None = None
    tasks: str | None = None
    limit: int | None = None
    data_dir: Path | None = None


@dataclass(frozen=True)
class Expansion:
    model: str
    method: str
    ratios: list[float] | None
    budget: int | None
    tasks: str
    data: str
    data_dir: Path | None
    limit: int | None
    scope: str
    granularity: str
    max_length: int | None
    stamp: dict[str, Any]  # the rows' `recipe` field


# ---- loading ------------------------------------------------------------------------------------------------
def names() -> list[str]:
    folder = resources.recipe_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load(name: str) -> Recipe:
    key = name.strip().lower()
    if key not in names():
        raise InputError(f"unknown recipe '{name}'{did_you_mean(key, names())}; `kvbench recipes` lists them")
    path = resources.recipe_path(key)
    return parse(key, resources.load_yaml(path), str(path))


def parse(name: str, data: dict[str, Any], where: str) -> Recipe:
    """A Recipe from its YAML mapping; every error names the file and the field."""

    def fail(message: str) -> InputError:
        return InputError(f"{where}: {message}")

    unknown_keys = set(data) - FIELDS
    if unknown_keys:
        raise fail(f"unknown keys {sorted(unknown_keys)}")
    for key in ("paper", "table", "model", "tasks", "scope", "granularity", "rows"):
        if not data.get(key):
            raise fail(f"'{key}' is missing")
    if (data.get("ratio") is None) == (data.get("budget") is None):
        raise fail("give exactly one of 'ratio' and 'budget'")
    if data["scope"] not in SCOPES:
        raise fail(f"scope must be one of {', '.join(SCOPES)}, got '{data['scope']}'")
    if data["granularity"] not in GRANULARITIES:
        raise fail(f"granularity must be one of {', '.join(GRANULARITIES)}, got '{data['granularity']}'")
    tasks = tuple(data["tasks"])
    specs = load_task_specs()
    missing = [t for t in tasks if t not in specs]
    if missing:
        raise fail(f"unknown tasks {missing}")
    assumptions = []
    for item in data.get("assumptions") or []:
        if set(item) != {"setting", "value", "why"}:
            raise fail(f"an assumption needs exactly setting, value and why: {item}")
        assumptions.append(Assumption(str(item["setting"]), str(item["value"]), str(item["why"])))
    rows = []
    for item in data["rows"]:
        label = item.get("paper", "?")
        if set(item) - ROW_FIELDS:
            raise fail(f"row {label}: unknown keys {sorted(set(item) - ROW_FIELDS)}")
        if not item.get("method") or not str(item.get("source", "")).strip():
            raise fail(f"row {label}: 'method' and a 'source' line are required")
        scores = {str(t): float(v) for t, v in (item.get("scores") or {}).items()}
        if set(scores) != set(tasks):
            raise fail(f"row {label}: scores must cover exactly the recipe's tasks {list(tasks)}")
        avg = item.get("avg")
        rows.append(PaperRow(str(label), str(item["method"]), scores, None if avg is None else float(avg),
                             str(item["source"]), str(item.get("note", ""))))
    return Recipe(
        name=name, paper=str(data["paper"]), table=str(data["table"]), model=str(data["model"]).lower(),
        tasks=tasks, data=str(data.get("data", "hub")),
        ratio=None if data.get("ratio") is None else float(data["ratio"]),
        budget=None if data.get("budget") is None else int(data["budget"]),
        scope=data["scope"], granularity=data["granularity"],
        max_length=None if data.get("max_length") is None else int(data["max_length"]),
        states=tuple(str(s) for s in data.get("states") or []), assumptions=tuple(assumptions), rows=tuple(rows),
    )


def describe(recipe: Recipe, full: bool = False) -> str:
    """`kvbench recipes`: one block per recipe; with full, the assumptions and every row with its source."""
    size = f"ratio {recipe.ratio:g}" if recipe.ratio is not None else f"budget {recipe.budget} tokens"
    lines = [f"{recipe.name}: {recipe.table}",
             f"  {recipe.paper}",
             f"  model {recipe.model}, {size}, scope {recipe.scope}, granularity {recipe.granularity}, "
             f"max_length {recipe.max_length}",
             f"  tasks {', '.join(recipe.tasks)}",
             "  rows " + ", ".join(f"{r.paper} = {r.method}" for r in recipe.rows)]
    if full:
        lines += ["  the table states:"] + [f"    - {s}" for s in recipe.states]
        lines += ["  assumed where it is silent:"]
        lines += [f"    - {a.setting}: {a.value} (why: {a.why})" for a in recipe.assumptions]
        lines += ["  published numbers:"]
        for row in recipe.rows:
            scores = ", ".join(f"{t} {v:.2f}" for t, v in row.scores.items())
            avg = "none printed" if row.avg is None else f"{row.avg:.2f}"
            lines.append(f"    - {row.paper}: {scores}; Avg {avg}")
            lines.append(f"      source: {row.source}")
            if row.note:
                lines.append(f"      note: {row.note}")
    return "\n".join(lines) + "\n"


# ---- side by side --------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One paper row beside ours: per task (and "Avg") the paper's value, ours, and our sample count."""

    row: PaperRow
    ours: dict[str, float | None]
    n: dict[str, int]

    def paper_avg(self) -> float:
        return self.row.avg if self.row.avg is not None else self.row.mean


@dataclass
class SideBySide:
    recipe: Recipe
    model: str  # the model our rows come from
    headers: list[str]  # short task names
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)


def side_by_side(recipe: Recipe, rows: Sequence[dict[str, Any]], model: str | None = None) -> SideBySide:
    """Our rows of this recipe's methods, tasks, budget, scope and granularity (from any run, recipe-stamped or
    not: the method, budget and task fingerprints say what ran) beside the paper's numbers. The granularity a
    method's rows must have is what its recipe-stamped rows ran at (`_granularities`). Rows written before
    kvbench recorded a granularity are kv_head rows."""
    labels = {"full" if m == "fullkv" else recipe.kv_budget.label for m in recipe.methods}
    candidates = [r for r in rows if r.get("method") in recipe.methods and r.get("task") in recipe.tasks
                  and r.get("budget") in labels and (r.get("method") == "fullkv") == (r.get("budget") == "full")
                  and r.get("scope", "full") == recipe.scope]
    granularity = _granularities(recipe, candidates)
    mine = [r for r in candidates if r.get("granularity", "kv_head") == granularity[r["method"]]]
    model = model or _pick_model(recipe, mine)
    mine = [r for r in mine if r.get("model") == model]
    if not mine:
        raise InputError(f"no results of recipe {recipe.name} for model {model}: run `kvbench run --recipe "
                         f"{recipe.name}` (with the same --results) first")
    table = report.build_table(mine, None, model)
    cells = {(budget, method): c for budget, entries in table.blocks for method, c in entries}
    specs = load_task_specs()
    comparisons = []
    for row in recipe.rows:
        budget = "full" if row.method == "fullkv" else recipe.kv_budget.label
        got = cells.get((budget, row.method), {})
        ours: dict[str, float | None] = {t: got[t].score if t in got else None for t in recipe.tasks}
        present = [v for v in ours.values() if v is not None]
        ours["Avg"] = sum(present) / len(present) if len(present) == len(recipe.tasks) else None
        comparisons.append(Comparison(row, ours, {t: got[t].n for t in recipe.tasks if t in got}))
    result = SideBySide(recipe, model, [specs[t].short for t in recipe.tasks], comparisons)
    ran = {r["method"] for r in mine}  # the note speaks of the chosen model's rows only
    result.notes = (_notes(recipe, mine, result, table.protocol_fps, {m: granularity[m] for m in ran})
                    + [f"Note: {n}." for n in table.notes])
    return result


def _granularities(recipe: Recipe, candidates: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The granularity each method's rows must have run at to be this recipe's. Rows that `kvbench run --recipe`
    wrote for the recipe as it stands say it themselves (the engine picked it from the recipe's), which keeps a
    table of them free of torch; where a method has no such rows, or they disagree, the method itself is asked
    (Recipe.granularity_of, which imports the engine)."""
    stamped: dict[str, set[str]] = {r["method"]: set() for r in candidates}
    for r in candidates:
        if _stamped_by(recipe, r):
            stamped[r["method"]].add(r.get("granularity", "kv_head"))
    return {method: next(iter(ran)) if len(ran) == 1 else recipe.granularity_of(method)
            for method, ran in stamped.items()}


def _stamped_by(recipe: Recipe, row: dict[str, Any]) -> bool:
    """Did `kvbench run --recipe` write this row at the granularity the recipe asks for today? The stamp names
    it. Stamps without the key predate it and were written at the recipe's granularity (0fdad2b on), except the
    first ones, which ran everything at kv_head and carry `deviations`."""
    stamp = row.get("recipe") or {}
    if stamp.get("name") != recipe.name or "deviations" in stamp:
        return False
    return stamp.get("granularity", recipe.granularity) == recipe.granularity


def _pick_model(recipe: Recipe, rows: Sequence[dict[str, Any]]) -> str:
    models = {r.get("model") for r in rows}
    if recipe.model in models or not models:
        return recipe.model
    stamped = sorted({r.get("model") for r in rows if (r.get("recipe") or {}).get("name") == recipe.name})
    candidates = stamped or sorted(models)
    if len(candidates) == 1:
        return candidates[0]
    raise InputError(f"results of recipe {recipe.name} hold several models ({', '.join(candidates)}); "
                     "pick one with --model")


def _notes(recipe: Recipe, rows: Sequence[dict[str, Any]], result: SideBySide, protocol: list[str],
           granularity: dict[str, str]) -> list[str]:
    notes = [f"Paper: {recipe.paper}; {recipe.table}. Cells: paper / ours / delta (ours - paper), points."]
    ours = f"Ours: {result.model}"
    if result.model != recipe.model:
        ours += f" (the recipe's model is {recipe.model})"
    counts = sorted({n for c in result.comparisons for n in c.n.values()})
    if counts:
        plural = "s" if counts[-1] != 1 else ""
        ours += f", {counts[0]}{f'-{counts[-1]}' if len(counts) > 1 else ''} sample{plural} per task"
    notes.append(ours + f"; protocol fingerprint {', '.join(protocol)}.")
    overrides = sorted({_fmt_overrides(r["recipe"]["overrides"]) for r in rows if r.get("recipe")} - {""})
    if overrides:
        notes.append("Overridden from the recipe: " + "; ".join(overrides) + ".")
    if any(not r.get("recipe") for r in rows):
        notes.append("Some of our rows come from runs without --recipe (same methods, budget and tasks).")
    notes.append(granularity_note(recipe, granularity))
    printed = all(c.row.avg is not None for c in result.comparisons)
    notes.append("Avg: the paper's printed Avg; ours = the plain mean of our task scores (- until every task has one)."
                 if printed else "Avg: the source prints none, so the paper's is the mean of its task scores; ours "
                 "likewise (- until every task has one).")
    for c in result.comparisons:
        if c.row.avg_mismatch:
            notes.append(f"* {c.row.paper}: the paper prints Avg {c.row.avg:.2f} but its task scores average "
                         f"{c.row.mean:.2f}" + (f" ({c.row.note})" if c.row.note else "")
                         + "; shown as printed, delta against it.")
    return notes


def granularity_note(recipe: Recipe, granularity: dict[str, str]) -> str:
    """Which granularity our rows ran at (`granularity`: method -> the granularity of its rows), as the table's
    notes say it."""
    text = f"Granularity: {recipe.granularity}"
    shared = [m for m in recipe.methods
              if m != "fullkv" and granularity.get(m, recipe.granularity) != recipe.granularity]
    if shared:
        verb = "keeps" if len(shared) == 1 else "keep"
        text += (f"; {', '.join(shared)} {verb} one set per KV head (their query heads cannot keep different "
                 "tokens: the same output)")
    return text + "."


def _fmt_overrides(given: dict[str, Any]) -> str:
    return ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in sorted(given.items()))


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cells(c: Comparison, key: str) -> tuple[float, float | None, float | None]:
    paper = c.paper_avg() if key == "Avg" else c.row.scores[key]
    ours = c.ours[key]
    return paper, ours, None if ours is None else ours - paper


def grid(result: SideBySide) -> tuple[list[str], list[list[str]]]:
    """Header and body of the side-by-side table: one row per paper row, cells 'paper / ours / delta'."""
    header = ["Method", "kvbench", *result.headers, "Avg"]
    body = []
    for c in result.comparisons:
        texts = []
        for key in [*result.recipe.tasks, "Avg"]:
            paper, ours, delta = _cells(c, key)
            mark = "*" if key == "Avg" and c.row.avg_mismatch else ""
            texts.append(f"{_num(paper)}{mark} / {_num(ours)} / {_num(delta, signed=True)}")
        body.append([c.row.paper, c.row.method, *texts])
    return header, body


# Minimal renderers until kvbench.results has one renderer for md, LaTeX and CSV.
FORMATS = ("md", "markdown", "latex", "csv")


def render(result: SideBySide, fmt: str) -> str:
    if fmt in ("md", "markdown"):
        header, body = grid(result)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n\n" + "\n\n".join(result.notes) + "\n"
    if fmt == "latex":
        header, body = grid(result)
        escape = latex_escape
        out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{ll{'r' * (len(header) - 2)}}}",
               r"\toprule", " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(escape(v) for v in row) + r" \\" for row in body]
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{escape(' '.join(result.notes))}}}", r"\end{table}"]
        return "\n".join(out) + "\n"
    if fmt == "csv":  # long form: one line per (paper row, task or Avg)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["recipe", "paper_row", "method", "model", "task", "paper", "ours", "delta", "n", "source"])
        for c in result.comparisons:
            for key in [*result.recipe.tasks, "Avg"]:
                paper, ours, delta = _cells(c, key)
                writer.writerow([result.recipe.name, c.row.paper, c.row.method, result.model, key, f"{paper:.2f}",
                                 "" if ours is None else f"{ours:.2f}", "" if delta is None else f"{delta:+.2f}",
                                 c.n.get(key, "") if key != "Avg" else "", c.row.source])
        return buffer.getvalue()
    raise InputError(f"--format must be md, latex or csv, got '{fmt}'")
