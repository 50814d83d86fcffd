"""`kvbench plot`: PNG figures from stored results (matplotlib, the `plot` extra, imported lazily; Agg backend).

- score_vs_ratio.png: task score vs the kept ratio, one line per method, one panel per task plus the average
  (the plain mean of the task scores, as in the table); FullKV is the dashed horizontal line.
- score_vs_cache.png: the same scores against the measured KV cache held after compression (mean
  `cache_bytes` of the configuration's rows on that task; MiB, log scale); FullKV is the star.
- kl_vs_budget.png: for sensitivity results (every `kl_raw.jsonl` under the results directory), the mean
  KL(P_full || Q) vs the budget per policy (and position mode), log-log, one panel per model.

Scores come from kvbench.results.report.build_table, so a figure never mixes what a table would refuse to mix. With
several models in the results, each model's figures get the model's name as a prefix."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvbench.results import report, selection, store
from kvbench.errors import InputError

DPI = 110


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InputError("kvbench plot needs matplotlib: pip install 'kvbench[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


pyplot = _pyplot  # public name: kvbench.studies.sensitivity draws its figures through the same import rule


def budget_ratio(label: str) -> float | None:
    if label == "full":
        return 1.0
    return float(label[1:]) if label.startswith("r") else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.6), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig: Any, axes: Sequence[Any], path: Path, title: str) -> Path:
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.suptitle(title, fontsize=10)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=min(6, len(labels)),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if labels else 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def log_ticks(axis: Any, values: Sequence[float]) -> None:
    """A log-scaled axis labelled with plain numbers ('0.5', '20'): at 1-2-5 steps over up to two decades, 1-3
    steps up to three and a half, powers of ten beyond (so labels stay apart in a 3.6-inch panel), and by a linear
    locator when the values span too little to hold two 1-2-5 steps; minor ticks unlabelled. Matplotlib's
    default labels every minor tick of a narrow log axis in scientific notation, and neighbouring labels then
    overlap. Call after plotting (it sets the scale)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if axis is axis.axes.xaxis:
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    positive = sorted(v for v in values if v > 0)
    if not positive:
        return
    low, high = positive[0], positive[-1]
    subs = (1.0, 2.0, 5.0) if high / low <= 100 else (1.0, 3.0) if high / low <= 3000 else (1.0,)
    steps = [m * 10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in subs]
    if sum(low <= x <= high for x in steps) >= 2:
        axis.set_major_locator(LogLocator(base=10, subs=subs))
    else:
        axis.set_major_locator(MaxNLocator(nbins=3))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(float(i) for i in range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def _panels(table: report.Table) -> list[tuple[str, str]]:
    """(key, title): every task, then Avg."""
    return [*zip(table.tasks, table.headers), ("Avg", "Avg")]


def _value(table: report.Table, cells: dict[str, report.Cell], key: str) -> float | None:
    if key == "Avg":
        return table.row_average(cells)
    return cells[key].score if key in cells else None


def _reference(table: report.Table) -> dict[str, report.Cell] | None:
    for budget, entries in table.blocks:
        if budget == "full":
            named = dict(entries)
            if "fullkv" in named:
                return named["fullkv"]
    return None


def plot_score_vs_ratio(table: report.Table, path: Path, title: str) -> Path | None:
    series: dict[str, list[tuple[float, dict[str, report.Cell]]]] = defaultdict(list)
    for budget, entries in table.blocks:
        ratio = budget_ratio(budget)
        if ratio is None:
            continue
        for method, cells in entries:
            if method != "fullkv":
                series[method].append((ratio, cells))
    if not series:
        return None
    plt = _pyplot()
    reference = _reference(table)
    ticks = sorted({100 * x for points in series.values() for x, _ in points})
    fig, axes = _grid(plt, len(table.tasks) + 1)
    for ax, (key, header) in zip(axes, _panels(table)):
        for method, points in series.items():
            xy = sorted((x, v) for x, c in points if (v := _value(table, c, key)) is not None)
            if xy:
                ax.plot([100 * x for x, _ in xy], [v for _, v in xy], marker="o", ms=4, label=report.display(method))
        if reference is not None and (full := _value(table, reference, key)) is not None:
            ax.axhline(full, color="black", ls="--", lw=1, label="FullKV")
        ax.set_title(header, fontsize=9)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("KV kept (% of prompt)", fontsize=8)
        ax.set_ylabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _finish(fig, axes, path, title)


def mean_cache_bytes(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(budget, method, task) -> mean cache_bytes of its rows."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("cache_bytes") is not None:
            sums[(row["budget"], row["method"], row["task"])].append(float(row["cache_bytes"]))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def plot_score_vs_cache(table: report.Table, rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    sizes = mean_cache_bytes(rows)
    if not sizes:
        return None
    plt = _pyplot()
    mib = 2**20
    fig, axes = _grid(plt, len(table.tasks) + 1)
    for ax, (key, header) in zip(axes, _panels(table)):
        by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for budget, entries in table.blocks:
            for method, cells in entries:
                value = _value(table, cells, key)
                tasks = table.tasks if key == "Avg" else [key]
                found = [sizes.get((budget, method, t)) for t in tasks]
                if value is None or any(s is None for s in found):
                    continue
                by_method[method].append((sum(found) / len(found) / mib, value))  # type: ignore[arg-type]
        sizes_shown = [x for xy in by_method.values() for x, _ in xy]
        for method, xy in by_method.items():
            xy.sort()
            if method == "fullkv":
                ax.plot([x for x, _ in xy], [v for _, v in xy], marker="*", ms=10, ls="", color="black",
                        label="FullKV")
            else:
                ax.plot([x for x, _ in xy], [v for _, v in xy], marker="o", ms=4, label=report.display(method))
        log_ticks(ax.xaxis, sizes_shown)
        ax.set_title(header, fontsize=9)
        ax.set_xlabel("KV cache held after compression (MiB, mean)", fontsize=8)
        ax.set_ylabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, axes, path, title)


# ---- sensitivity (KL vs budget) -----------------------------------------------------------------------------
def read_kl_rows(results: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(results.rglob("kl_raw.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _kl_budget(row: dict[str, Any]) -> float | None:
    for key in ("B", "w", "budget", "n_kept"):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def _kl_value(row: dict[str, Any]) -> float | None:
    for key in ("kl_fwd", "kl"):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def kl_curves(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """model -> curve label (policy, position mode, apply mode) -> [(budget, mean KL)] sorted by budget."""
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for row in rows:
        budget, kl = _kl_budget(row), _kl_value(row)
        if budget is None or kl is None:
            continue
        label = str(row.get("policy", "?"))
        if row.get("pos_mode"):
            label += f" ({row['pos_mode']})"
        if row.get("apply_mode") not in (None, "M1"):
            label += f" [{row['apply_mode']}]"
        groups[(str(row.get("model", "")), label, budget)].append(kl)
    out: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for (model, label, budget), values in sorted(groups.items()):
        out[model][label].append((budget, sum(values) / len(values)))
    return {m: dict(c) for m, c in out.items()}


def plot_kl(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    curves = kl_curves(rows)
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(curves))
    for ax, (model, lines) in zip(axes, sorted(curves.items())):
        shown: list[tuple[float, float]] = []
        for label, points in lines.items():
            xy = [(b, k) for b, k in points if b > 0 and k > 0]  # log-log
            if xy:
                ax.plot([b for b, _ in xy], [k for _, k in xy], marker="o", ms=3, label=label)
                shown += xy
        log_ticks(ax.xaxis, [b for b, _ in shown])
        log_ticks(ax.yaxis, [k for _, k in shown])
        ax.set_title(model or "model", fontsize=9)
        ax.set_xlabel("budget (tokens kept)", fontsize=8)
        ax.set_ylabel("mean KL(P_full || Q) (nats)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, axes, path, "Truncation sensitivity: KL vs budget")


# ---- entry point -------------------------------------------------------------------------------------------
def plot_results(results: Path, out: Path, protocol: str | None = None,
                 log: Callable[[str], None] | None = None) -> list[Path]:
    """Every figure the results allow; returns the files written. `protocol` selects rows as `table
    --protocol` does; `log` hears which result lines held no row."""
    loaded = selection.scored(store.load_results(results))
    if loaded.skipped and log is not None:
        log(f"kvbench: plot: {selection.skipped_note(loaded.skipped)}")
    rows = loaded.rows
    kl_rows = read_kl_rows(results)
    if not rows and not kl_rows:
        raise InputError(f"no result rows (and no kl_raw.jsonl) under {results}")
    written: list[Path] = []
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_model[str(row.get("model", "?"))].append(row)
    if protocol is not None:  # the models that have rows under it (none: selection.pick says what there is)
        matching = {str(r.get("model")) for r in rows if str(r.get("protocol_fp")).startswith(protocol.strip())}
        by_model = {m: v for m, v in by_model.items() if m in matching} or by_model
    for model in sorted(by_model):
        prefix = f"{_slug(model)}_" if len(by_model) > 1 else ""
        model_rows = selection.pick(loaded, model=model, protocol=protocol)
        table = report.build_table(model_rows)
        title = f"{model}: LongBench score"
        for made in (plot_score_vs_ratio(table, out / f"{prefix}score_vs_ratio.png", f"{title} vs KV kept"),
                     plot_score_vs_cache(table, model_rows, out / f"{prefix}score_vs_cache.png",
                                         f"{title} vs KV cache held")):
            if made is not None:
                written.append(made)
    if kl_rows:
        made = plot_kl(kl_rows, out / "kl_vs_budget.png")
        if made is not None:
            written.append(made)
    return written
