"""Score LongBench v1 / LongBench-E prediction files the way the official ``eval.py`` does.

The task metadata (metric per task, first-line rule, LongBench-E tasks, categories and their order) is
not repeated here: it is read from kvbench/tasks/longbench.yaml, the same data `kvbench run` uses
(tests/test_tasks.py checks it against the official config and eval.py).

Official facts reproduced here (THUDM/LongBench ``LongBench/eval.py``):

* trec, triviaqa, samsum, lsht only: ``prediction.lstrip('\\n').split('\\n')[0]`` before scoring.
  Nothing else is stripped on any task.
* sample score = ``max`` over reference answers, starting from 0.0 (so no answers -> 0.0).
* task score: a plain ``total += score`` loop, then ``round(100 * total / n, 2)`` (multiply before
  dividing). We keep the loop rather than ``sum()``: since Python 3.12 ``sum()`` of floats is
  compensated and can differ in the last bit, which can flip a rounding tie.
* LongBench-E buckets by the row's ``length``: ``< 4000`` "0-4k", ``< 8000`` "4-8k", else "8k+";
  each ``round(100 * np.mean(bucket), 2)`` with numpy's mean (pairwise sum) and numpy's round (the
  result is an ``np.float64``); an empty bucket gives ``np.mean([]) = nan``, which the official
  eval writes to result.json as ``NaN``; we return ``nan`` too.
* ``all_classes``: the official loop overwrites one variable per row and scores every row with the
  **last** row's ``all_classes``. We do the same (for merged shards: the last row of the last shard).
* A file with no rows would divide by zero officially; here it is an InputError.

ROUGE-L comes from ``kvbench.metrics``, which re-implements the pltrdy package exactly: the package itself
would take most of the scoring time (scripts/BENCHMARKS.md, "Reading results"). The only cache is jieba's
segmentation of identical strings, a pure function (``metrics.jieba_segment``), so caching cannot change a score.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvbench import data, metrics
from kvbench.errors import InputError


def _v1_tables() -> tuple[dict[str, str], frozenset[str], frozenset[str], dict[str, str]]:
    specs = data.load_task_specs()
    titles = data.category_titles()
    v1 = [s for s in specs.values() if not s.synthetic and not s.longbench_e]
    # Tasks in table order: by category (the YAML's category order), then in the YAML's task order.
    v1.sort(key=lambda s: list(titles).index(s.category))
    return (
        {s.name: s.metric for s in v1},
        frozenset(s.name for s in v1 if s.first_line),
        frozenset(s.base for s in specs.values() if s.longbench_e),
        {s.name: titles[s.category] for s in v1},
    )


#: Metric name of each of the 21 LongBench v1 tasks (official ``dataset2metric``); tasks with the first-line
#: cut (trec, triviaqa, samsum, lsht); the tasks LongBench-E provides as ``<task>_e``; the category title of
#: each task. All from kvbench/tasks/longbench.yaml.
TASK_METRIC, FIRST_LINE_TASKS, LONGBENCH_E_TASKS, CATEGORY = _v1_tables()

#: Display order: the protocol doc's table order (tasks within a category in its order).
TASK_ORDER: tuple[str, ...] = tuple(CATEGORY)

BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")

_METRIC_FN = {
    "qa_f1": lambda p, g, c: metrics.qa_f1(p, g),
    "qa_f1_zh": lambda p, g, c: metrics.qa_f1_zh(p, g),
    "rouge": lambda p, g, c: metrics.rouge(p, g),
    "rouge_zh": lambda p, g, c: metrics.rouge_zh(p, g),
    "classification": metrics.classification,
    "retrieval": lambda p, g, c: metrics.retrieval(p, g),
    "retrieval_zh": lambda p, g, c: metrics.retrieval_zh(p, g),
    "count": lambda p, g, c: metrics.count(p, g),
    "code_sim": lambda p, g, c: metrics.code_sim(p, g),
}


def base_task(task: str) -> str:
    """``task`` itself for the 21 v1 tasks, the base task for a LongBench-E ``<task>_e``."""
    if task in TASK_METRIC:
        return task
    if task.endswith("_e") and task[:-2] in LONGBENCH_E_TASKS:
        return task[:-2]
    raise InputError(f"unknown LongBench task {task!r}")


def metric_for_task(task: str) -> str:
    return TASK_METRIC[base_task(task)]


def score_sample(
    task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None
) -> float:
    """Official per-sample score in [0, 1]: max of the task's metric over the answers (0.0 if none)."""
    base = base_task(task)
    return score_with_metric(TASK_METRIC[base], base in FIRST_LINE_TASKS, prediction, answers, all_classes)


def score_with_metric(
    metric: str,
    first_line: bool,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None,
) -> float:
    """:func:`score_sample` for a task described by data (tasks/*.yaml): metric name + first-line rule.

    ``first_line`` applies the trec/triviaqa/samsum/lsht cut. The max starts from 0.0 like the
    official loop, so an empty answer list scores 0.0.
    """
    fn = _METRIC_FN.get(metric)
    if fn is None:
        raise InputError(f"unknown metric {metric!r} (known: {', '.join(sorted(_METRIC_FN))})")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for answer in answers:
        score = max(score, fn(prediction, answer, all_classes))
    return score


def task_score(sample_scores: Sequence[float]) -> float:
    """``round(100 * total / n, 2)`` with ``total`` accumulated left to right, as the official scorer."""
    if len(sample_scores) == 0:
        raise ValueError("task_score of zero samples")
    total = 0.0
    for s in sample_scores:
        total += s
    return round(100 * total / len(sample_scores), 2)


def length_bucket(length: float) -> str:
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def length_buckets(scores: Sequence[float], lengths: Sequence[float]) -> dict[str, float]:
    """LongBench-E per-length scores, numpy arithmetic as in the official ``scorer_e``; empty -> nan."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    import numpy as np  # only LongBench-E needs numpy's arithmetic; v1 scoring and `kvbench table` start without it

    groups: dict[str, list[float]] = {key: [] for key in BUCKETS}
    for s, length in zip(scores, lengths):
        groups[length_bucket(length)].append(s)
    out = {}
    for key, values in groups.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice"
            out[key] = float(round(100 * np.mean(values), 2))
    return out


def average(task_scores: Mapping[str, float]) -> float:
    """Plain mean of the task scores (what papers report).

    LongBench's own README instead averages the category means: see :func:`category_average`.
    """
    if not task_scores:
        raise ValueError("average of zero tasks")
    return sum(task_scores.values()) / len(task_scores)


def category_means(task_scores: Mapping[str, float]) -> dict[str, float]:
    """Mean task score per category (``<task>_e`` counts in its base task's category)."""
    groups: dict[str, list[float]] = {}
    for task, score in task_scores.items():
        groups.setdefault(CATEGORY[base_task(task)], []).append(score)
    return {cat: sum(v) / len(v) for cat, v in groups.items()}


def category_average(task_scores: Mapping[str, float]) -> float:
    """Mean of the category means (LongBench README style), over the categories present."""
    means = category_means(task_scores)
    if not means:
        raise ValueError("category_average of zero tasks")
    return sum(means.values()) / len(means)


# --------------------------------------------------------------------------- prediction files


@dataclass
class ScoreReport:
    """Scores of one prediction directory. ``buckets`` only has the ``<task>_e`` tasks."""

    directory: Path
    scores: dict[str, float] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_scores: dict[str, list[float]] = field(default_factory=dict, repr=False)
    files: dict[str, list[str]] = field(default_factory=dict)
    metrics_version: str = metrics.METRICS_VERSION


_FILE_RE = re.compile(r"^(?P<task>.+?)(?:\.shard-(?P<i>\d+)-of-(?P<n>\d+))?\.jsonl$")


def _task_sort_key(task: str) -> tuple[int, int, str]:
    base = base_task(task)
    return (TASK_ORDER.index(base), task != base, task)


def _group_files(directory: Path) -> dict[str, list[Path]]:
    """Map task -> its files in reading order (a single file, or shards by index)."""
    plain: dict[str, Path] = {}
    shards: dict[str, list[tuple[int, int, Path]]] = {}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(".jsonl") or not path.is_file():
            continue
        m = _FILE_RE.match(path.name)
        task = m.group("task")
        try:
            base_task(task)
        except InputError:
            raise InputError(f"{path}: unknown LongBench task {task!r} (from the file name)") from None
        if m.group("i") is None:
            plain[task] = path
        else:
            shards.setdefault(task, []).append((int(m.group("i")), int(m.group("n")), path))
    groups: dict[str, list[Path]] = {task: [path] for task, path in plain.items()}
    for task, items in shards.items():
        if task in plain:
            raise InputError(
                f"{plain[task]}: both {plain[task].name} and shard files exist for {task!r}; "
                "keep one set (duplicate predictions would skew the score)"
            )
        totals = {n for _, n, _ in items}
        if len(totals) != 1:
            raise InputError(f"{directory / (task + '.shard-*.jsonl')}: shards disagree on the shard count {sorted(totals)}")
        (n,) = totals
        indices = sorted(i for i, _, _ in items)
        if indices not in (list(range(n)), list(range(1, n + 1))):
            raise InputError(
                f"{directory / (task + '.shard-*.jsonl')}: incomplete or duplicate shard set "
                f"{indices} of {n}"
            )
        groups[task] = [path for _, _, path in sorted(items)]
    return groups


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_rows(path: Path, need_length: bool):
    """Yield (line_number, row) for the non-blank lines of one prediction file, validated."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    # splitlines(keepends) on "\n", "\r\n", "\r" only, like the official text-mode ``for line in f``
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: broken JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        required = ("pred", "answers", "all_classes") + (("length",) if need_length else ())
        for key in required:
            if key not in row:
                raise InputError(f"{where}: missing field {key!r}")
        if not isinstance(row["pred"], str):
            raise InputError(f"{where}: field 'pred' must be a string")
        if not _is_str_list(row["answers"]):
            raise InputError(f"{where}: field 'answers' must be a list of strings")
        if row["all_classes"] is not None and not _is_str_list(row["all_classes"]):
            raise InputError(f"{where}: field 'all_classes' must be null or a list of strings")
        if need_length:
            length = row["length"]
            if isinstance(length, bool) or not isinstance(length, (int, float)) or math.isnan(length):
                raise InputError(f"{where}: field 'length' must be a number")
        yield where, row


def score_prediction_dir(path: str | Path) -> ScoreReport:
    """Score every ``<task>.jsonl`` / ``<task>_e.jsonl`` (or ``<task>.shard-<i>-of-<n>.jsonl``) in ``path``.

    Files not ending in ``.jsonl`` are ignored (e.g. ``result.json``). Any problem with the input
    raises :class:`kvbench.errors.InputError` with a ``file:line:`` prefix.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    groups = _group_files(directory)
    if not groups:
        raise InputError(f"{directory}: no <task>.jsonl prediction files")
    report = ScoreReport(directory=directory)
    for task in sorted(groups, key=_task_sort_key):
        is_e = task != base_task(task)
        rows = [item for file in groups[task] for item in _read_rows(file, need_length=is_e)]
        if not rows:
            raise InputError(f"{groups[task][0]}: no predictions")
        all_classes = rows[-1][1]["all_classes"]  # official: the last row's value serves every row
        if TASK_METRIC[base_task(task)] == "classification" and all_classes is None:
            raise InputError(f"{rows[-1][0]}: 'all_classes' is null but {task} needs the class list")
        scores = []
        for where, row in rows:
            try:
                scores.append(score_sample(task, row["pred"], row["answers"], all_classes))
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
        report.scores[task] = task_score(scores)
        report.n_samples[task] = len(scores)
        report.sample_scores[task] = scores
        report.files[task] = [file.name for file in groups[task]]
        if is_e:
            report.buckets[task] = length_buckets(scores, [row["length"] for _, row in rows])
    return report


# --------------------------------------------------------------------------- output


def report_to_json(report: ScoreReport) -> dict:
    """``{task: score, ..., "<task>_buckets": {"0-4k": .., "4-8k": .., "8k+": ..}}``.

    Empty buckets are ``nan`` (``json.dump`` writes ``NaN``, as the official result.json would).
    """
    out: dict = {}
    for task, score in report.scores.items():
        out[task] = score
        if task in report.buckets:
            out[f"{task}_buckets"] = dict(report.buckets[task])
    return out


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"


def render_score_table(report: ScoreReport) -> str:
    """Markdown table: one row per task, then the two averages."""
    from kvbench.results import render

    has_buckets = bool(report.buckets)
    header = ["task", "category", "metric", "n", "score"] + (list(BUCKETS) if has_buckets else [])
    rows, bold = [], []
    for task, score in report.scores.items():
        cells = [task, CATEGORY[base_task(task)], metric_for_task(task), str(report.n_samples[task]), _fmt(score)]
        if has_buckets:
            b = report.buckets.get(task)
            cells += [_fmt(b[k]) if b else "" for k in BUCKETS]
        rows.append(cells)
        bold.append([False] * len(cells))
    if report.scores:
        pad = [""] * (len(BUCKETS) if has_buckets else 0)
        rows.append([f"average ({len(report.scores)} tasks)", "", "", "", f"{average(report.scores):.2f}", *pad])
        bold.append([True] * len(header))
        ncat = len(category_means(report.scores))
        rows.append([f"average of {ncat} category means", "", "", "", f"{category_average(report.scores):.2f}", *pad])
        bold.append([False] * len(header))
    return "\n".join(render.markdown(header, rows, 3, bold)) + "\n"
