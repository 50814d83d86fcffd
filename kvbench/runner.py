"""`kvbench run`: resolve and validate everything, skip what is done, prefill each pending sample once,
decode every (method, budget) from it, score, and append one row per (sample, method, budget)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench import __version__, data, evidence, methods, metrics, models, outputs, prompts, scoring
from kvbench.results import schema, store
from kvbench.data import HUB_REVISION, Sample, TaskSpec
from kvbench.engine import DECODE_MODES, GRANULARITIES, Engine, Plan, storage_granularity
from kvbench.errors import InputError
from kvbench.methods.base import Budget, Method
from kvbench.methods.plugins import source_version
from kvbench.results.store import ResultFile, Shard

if TYPE_CHECKING:
    from kvbench.studies.recipes import Overrides

# Bump when the engine's decoding rules change (anything that can move a score).
ENGINE_VERSION = "engine-v1"
SCOPES = ("full", "context")
DATA = ("auto", "hub", "local", "sample")


@dataclass
class RunOptions:
    """Every option of `kvbench run`, typed. The CLI parses its flags into these fields and kvbench.evaluate
    takes them as keywords (api.py derives its keywords from here), so a field added here is an option of both.
    Errors about a field name it as `{field}` (errors.InputError), which each front end spells its own way."""

    model: str | models.LoadedModel = "smollm2-135m"  # alias, HF id, dir, .gguf, or a model already loaded
    methods: tuple[str | Method, ...] = ("fullkv",)  # names, presets, package.module:Class, or instances
    ratios: tuple[float, ...] | None = None
    budgets: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = ("quick",)  # task and group names (data.task_groups)
    data: str = "auto"  # auto | hub | local | sample (see data.open_source)
    data_dir: Path | None = None
    limit: int | None = None
    results: Path | None = Path("results")  # None: write nothing, keep the rows in memory
    device: str = "auto"
    dtype: str = "auto"
    scope: str = "full"
    gqa_reduce: str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)  # values typed, or strings to parse
    presets: Path | None = None  # a YAML file of the user's own presets
    max_length: int | None = None
    shard: Shard = field(default_factory=Shard)
    wait: bool = False
    trust_remote_code: bool = False
    synthetic_length: int = 2000
    seed: int = 0
    hub_revision: str = HUB_REVISION
    decode: str = "batched"  # batched | sequential (engine.DECODE_MODES)
    prefill_chunk: int = 0  # > 0: prefill in chunks of this many tokens
    device_map: str | None = None  # "auto": spread the model over every visible GPU (accelerate)
    granularity: str = "kv_head"  # kv_head | query_head (methods-2 §1.6; engine.GRANULARITIES)
    # kvbench run --recipe: {name, overrides}, copied into every row (no fingerprint: the options
    # it expanded to are fingerprinted as for any run)
    recipe: dict[str, Any] | None = None


def recipe_options(name: str, overrides: "Overrides", base: RunOptions) -> RunOptions:
    """`kvbench run --recipe NAME`: the recipe's model, methods, budget, tasks, data, scope, granularity and
    truncation, with `overrides` applied, on top of `base`, which keeps what a recipe leaves alone (results,
    device, dtype, shards, decoding, ...); an explicit --data wins over the recipe's, and --data-dir replaces
    it (the recipe's hub data is what a local copy stands in for)."""
    from kvbench.studies import recipes

    plan = recipes.load(name).expand(overrides)
    data_source = base.data if base.data != "auto" else ("auto" if plan.data_dir is not None else plan.data)
    return dataclasses.replace(
        base, model=plan.model, methods=tuple(plan.method.split(",")),
        ratios=tuple(plan.ratios) if plan.ratios is not None else None,
        budgets=(plan.budget,) if plan.budget is not None else None, tasks=tuple(plan.tasks.split(",")),
        data=data_source, data_dir=plan.data_dir, limit=plan.limit,
        scope=plan.scope, granularity=plan.granularity, max_length=plan.max_length, recipe=plan.stamp,
    )


@dataclass
class Target:
    """One (task, plan) result file and what it still needs."""

    task: TaskSpec
    plan: Plan
    config_fp: str
    task_fp: str
    file: ResultFile
    done: set[str]


@dataclass
class RunSummary:
    rows_written: int = 0
    rows_done_before: int = 0
    prefills: int = 0
    decodes: int = 0
    model_loaded: bool = False
    manifest: Path | None = None
    files: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # every row of the run's samples and plans
    model: str = ""  # the model's name as rows record it
    results: Path | None = Path("results")
    skipped: list[str] = field(default_factory=list)  # selected by a group (--tasks zh) but without data


def budgets(opts: RunOptions) -> list[Budget]:
    if opts.budgets is not None and opts.ratios is not None:
        raise InputError("give {ratios} or {budgets}, not both", options=("ratios", "budgets"))
    out: list[Budget] = []
    if opts.budgets is not None:
        values, option = [Budget(tokens=b) for b in opts.budgets], "budgets"
    else:
        values, option = [Budget(ratio=r) for r in (opts.ratios or [0.1])], "ratios"
    for budget in values:
        # Two equal budgets would be one result file written twice by this very run: refused, since a
        # repeated value is more often a typo for another one than a wish to run it twice.
        if any(b.label == budget.label for b in out):
            value = f"{budget.ratio:g}" if budget.ratio is not None else str(budget.tokens)
            raise InputError(f"{{{option}}} lists {value} twice; give each {option[:-1]} once", options=(option,))
        out.append(budget)
    return out


def _format_param(value: Any) -> str:
    """A hyper-parameter as --method-arg would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ":".join(str(v) for v in value)
    return str(value)


def _label(name: str | Method, choice: methods.MethodChoice, plain: methods.MethodChoice) -> str:
    """The row's `method`: the canonical method name (an alias is another spelling of it) or the preset, plus
    the hyper-parameters --method-arg/--gqa-reduce set to something else, e.g. `snapkv(kernel_size=5)`; so
    two settings of one method are two rows of a table, never one cell mixing them."""
    label = choice.base if isinstance(name, str) and name.strip().lower() in methods.METHODS else choice.label
    before, after = plain.method.params(), choice.method.params()
    changed = [f"{k}={_format_param(v)}" for k, v in after.items() if before.get(k) != v]
    return f"{label}({','.join(changed)})" if changed else label


def build_plans(opts: RunOptions) -> list[Plan]:
    specs: list[str | Method] = methods.METHODS.names() if list(opts.methods) == ["all"] else list(opts.methods)
    if not specs:
        raise InputError("{methods} is empty", options=("methods",))
    budget_list = budgets(opts)  # validated even when only fullkv (which ignores them) is selected
    overrides_all = dict(opts.method_args)
    if opts.gqa_reduce is not None:
        overrides_all["gqa_reduce"] = opts.gqa_reduce
    choices: list[tuple[str, methods.MethodChoice]] = []
    used: set[str] = set()
    given: dict[str, str] = {}  # label -> the name that asked for it first
    for spec in specs:
        name = spec if isinstance(spec, str) else methods.build(spec).label
        base = methods.build(spec, user_presets=opts.presets)  # validates the name
        # FullKV evicts nothing, so no hyper-parameter changes its rows: --gqa-reduce for the other methods of
        # a sweep must not make it a second FullKV configuration (and label). A wrapper's names include its
        # inner method's.
        fields = set() if base.base == "fullkv" else set(base.method.parameter_names())
        applicable = {k: v for k, v in overrides_all.items() if k in fields}
        used |= set(applicable)
        choice = methods.build(spec, applicable, opts.presets)
        label = _label(spec, choice, base)
        if label in given:  # one result file, written twice by this run: refused like a repeated ratio
            other = "" if given[label] == name else f" ('{given[label]}' and '{name}' are one method)"
            raise InputError(f"{{methods}} lists {label.split('(')[0]} twice{other}; give each method once",
                             options=("methods",))
        given[label] = name
        choices.append((label, choice))
    unused = set(opts.method_args) - used
    if unused:
        key = sorted(unused)[0]
        raise InputError(f"{{method_args}} {key}: no selected method has a parameter '{key}'", options=("method_args",))
    plans: list[Plan] = []
    for label, choice in choices:
        granularity = storage_granularity(choice.method, opts.granularity)
        if not choice.method.uses_budget:  # FullKV, KIVI alone: every token kept, one plan
            plans.append(Plan(label, choice.method, Budget(ratio=1.0), granularity))
            continue
        for budget in budget_list:
            plans.append(Plan(label, choice.method, budget, granularity))
    return plans


def granularity_note(opts: RunOptions, plans: list[Plan]) -> str | None:
    """What the run log says under --granularity query_head: which methods keep H_kv storage, and why."""
    if opts.granularity != "query_head":
        return None
    kept = sorted({p.label for p in plans if p.granularity == "kv_head"})
    if not kept:
        return None
    return (f"--granularity query_head: {', '.join(kept)} keep one set per KV head (positional, layer-shared or "
            "query-free: every query head of a group would keep the same tokens, so the output is identical and "
            "storing them g times would only waste memory)")


def config_fields(plan: Plan, scope: str) -> dict[str, Any]:
    """The fields config_fp is made of (kvbench.results.schema.config_fields), from a plan."""
    fields = schema.config_fields(plan.method.name, plan.method.params(), plan.budget.label, scope,
                                  plan.method.code_version(), granularity=plan.granularity,
                                  artifacts=plan.method.artifacts())
    source = source_version(type(plan.method))
    if source:  # only for a method defined outside kvbench: built-in fingerprints stay as they were
        fields["code"] = source
    return fields


def dtype_name(opts: RunOptions, spec: models.ModelSpec, device: str) -> str:
    resolved = models.resolve_device(device)
    return str(models.resolve_dtype(spec.dtype if opts.dtype == "auto" else opts.dtype, resolved)).replace("torch.", "")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got '{value}'") from None


def rank_shard(opts: RunOptions) -> Shard:
    """torchrun/accelerate set RANK and WORLD_SIZE: each rank takes samples i::world_size. No process group
    is needed: ranks share nothing but the results directory, each writing its own shard files."""
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        if opts.shard.count != 1:
            raise InputError("{shard} cannot be combined with a multi-process launch (WORLD_SIZE > 1)",
                             options=("shard",))
        rank = _env_int("RANK", 0)
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return Shard(rank, world)
    return opts.shard


def rank_device(device: str) -> str:
    """Under a multi-process launch, --device auto or cuda puts each rank on its own GPU (LOCAL_RANK)."""
    if _env_int("WORLD_SIZE", 1) > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{_env_int('LOCAL_RANK', 0) % torch.cuda.device_count()}"
    return device


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"kvbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def score_generation(task: TaskSpec, sample: Sample, prediction: str) -> float:
    return scoring.score_with_metric(
        task.metric, task.first_line, prediction, list(sample.answers),
        list(sample.all_classes) if sample.all_classes is not None else None,
    )


def run(opts: RunOptions, log: Callable[[str], None] = print, progress: Any = None) -> RunSummary:
    # ---- 1. validate everything before touching the disk or loading weights ----
    if opts.limit is not None and opts.limit < 0:
        raise InputError(f"{{limit}} must be >= 0, got {opts.limit}", options=("limit",))
    if opts.limit == 0:
        raise InputError("{limit} 0 selects no sample; give {limit} N with N >= 1, or leave it out for every sample",
                         options=("limit",))
    if opts.scope not in SCOPES:
        raise InputError(f"{{scope}} must be one of {', '.join(SCOPES)}, got '{opts.scope}'", options=("scope",))
    if opts.decode not in DECODE_MODES:
        raise InputError(f"{{decode}} must be one of {', '.join(DECODE_MODES)}, got '{opts.decode}'",
                         options=("decode",))
    if opts.prefill_chunk < 0:
        raise InputError(f"{{prefill_chunk}} must be a number of tokens >= 0 (0: no chunking), got "
                         f"{opts.prefill_chunk}", options=("prefill_chunk",))
    if opts.granularity not in GRANULARITIES:
        raise InputError(f"{{granularity}} must be one of {', '.join(GRANULARITIES)}, got '{opts.granularity}'",
                         options=("granularity",))
    if opts.device_map not in (None, "auto"):
        raise InputError(f"{{device_map}} must be auto, got '{opts.device_map}'", options=("device_map",))
    if opts.data not in DATA:
        raise InputError(f"{{data}} must be {', '.join(DATA[:-1])} or {DATA[-1]}, got '{opts.data}'", options=("data",))
    if opts.data == "local" and opts.data_dir is None:
        raise InputError("{data} local needs {data_dir} DIR", options=("data", "data_dir"))
    if opts.results is not None:  # writability: once there is work (step 2)
        outputs.check_dir(opts.results, "{results}", probe=False)
    preloaded = opts.model if isinstance(opts.model, models.LoadedModel) else None
    spec = preloaded.spec if preloaded else models.resolve_model(opts.model, opts.max_length)
    shard = rank_shard(opts)
    plans = build_plans(opts)
    task_specs = data.select_tasks(opts.tasks)
    device = rank_device(opts.device)
    dtype = str(preloaded.dtype).replace("torch.", "") if preloaded else dtype_name(opts, spec, device)
    sources = data.open_source(
        opts.data, opts.data_dir, task_specs, models.cache_root(), opts.synthetic_length, opts.hub_revision, log
    )
    explicit = set(opts.tasks)
    runnable: list[TaskSpec] = []
    skipped: list[str] = []  # named at the end of the run, where it is read
    for task in task_specs:
        if sources[task.name].available(task):
            runnable.append(task)
        elif task.name in explicit:
            raise InputError(f"no data for task '{task.name}' in {opts.data_dir}")
        else:
            skipped.append(task.name)
    if not runnable:
        raise InputError(f"none of the selected tasks has data in {opts.data_dir} "
                         f"(no {', '.join(f'{t}.jsonl' for t in skipped)})")
    samples: dict[str, list[Sample]] = {}
    for task in runnable:
        picked = list(sources[task.name].samples(task, opts.limit))
        samples[task.name] = [s for i, s in enumerate(picked) if shard.owns(i)]
    identity = preloaded.identity if preloaded else models.model_identity(spec)
    for plan in plans:  # head tables of the run's model (HeadKV, DuoAttention): part of the fingerprints
        plan.method.bind_model(identity, spec.name)
    protocol = schema.protocol_fields(
        model_identity=identity, max_length=spec.max_length, chat=spec.chat, dtype=dtype,
        prompt_rules=prompts.PROMPT_RULES_VERSION, metrics=metrics.METRICS_VERSION, engine=ENGINE_VERSION,
        decode=opts.decode, prefill_chunk=opts.prefill_chunk)
    protocol_fp = schema.protocol_fp(protocol)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    # ---- 2. find what is already done: read only, nothing created, a live writer refused now ----
    targets: list[Target] = []
    summary = RunSummary(model=spec.name, results=opts.results, skipped=skipped)
    for task in runnable:
        task_fp = schema.task_fp(task.fingerprint_fields(), sources[task.name].identity(task), protocol_fp)
        for plan in plans:
            config_fp = schema.config_fp(config_fields(plan, opts.scope), task_fp)
            path = store.result_path(opts.results or Path(), spec.slug, task.name, plan.label, plan.budget.label,
                                     opts.scope, config_fp, shard)
            file = ResultFile(path, wait=opts.wait) if opts.results is not None else MemoryFile(path)
            file.lock.check()
            targets.append(Target(task, plan, config_fp, task_fp, file, file.done()))
            summary.files.append(path)
    n_samples = sum(len(v) for v in samples.values())

    def skipped_note() -> None:
        if skipped:
            log(f"skipped {len(skipped)} selected task(s) without data in {opts.data_dir}: {', '.join(skipped)}")

    def all_done() -> RunSummary:
        log(describe_run(runnable, sources))
        log(f"all {n_samples} samples x {len(plans)} configs done ({summary.rows_done_before} rows); nothing to run")
        summary.rows = _rows(targets, samples)
        skipped_note()
        return summary

    pending, total = _pending(runnable, targets, samples, summary)
    if total == 0:
        return all_done()
    if opts.results is not None:
        outputs.check_dir(opts.results, "{results}")

    # ---- 3. check the model (RoPE, tokenizer) and that every pending prompt fits it from its config and
    # tokenizer alone, then load the weights: bad input is refused before anything is written ----
    pre = None if preloaded else models.preflight(spec, opts.trust_remote_code)
    max_positions = getattr(preloaded.model.config if preloaded else pre.config, "max_position_embeddings", None)
    check_prompts(runnable, pending, preloaded.tokenizer if preloaded else pre.tokenizer, spec, max_positions, plans)
    log(describe_run(runnable, sources))
    for label, stages in {p.label: p.method.stages() for p in plans if p.method.stages()}.items():
        log(f"{label}: select -> {' -> '.join(stages)}; storage simulated in the model dtype, cache_bytes are "
            "the packed layout's (methods-2.md §1.8)")
    note = granularity_note(opts, plans)
    if note:
        log(note)
    log(f"{total} of {n_samples} samples pending" + ("" if preloaded else f"; loading {spec.name} ..."))
    loaded = preloaded or models.load_model(spec, device, dtype, opts.trust_remote_code, pre, opts.device_map)
    summary.model_loaded = True

    # ---- 4. take the locks, repair torn tails, and look again (another process may have written meanwhile) ----
    try:
        for target in targets:
            target.done = target.file.open()
        pending, total = _pending(runnable, targets, samples, summary)
        if total == 0:  # another process finished them while this one loaded the model (--wait)
            return all_done()

        # ---- 5. run ----
        device_label = device_name(loaded.device)
        manifest_path = (opts.results or Path()) / spec.slug / "manifests" / f"{run_id}.json"
        manifest = {
            "run_id": run_id,
            "argv": sys.argv,
            "options": {k: _jsonable(v) for k, v in opts.__dict__.items() if k != "shard"},
            "shard": f"{shard.index}/{shard.count}",
            "protocol": protocol,
            "protocol_fp": protocol_fp,
            "plans": [{"method": p.label, "params": p.method.params(), "budget": p.budget.label,
                       "granularity": p.granularity, "artifacts": p.method.artifacts()} for p in plans],
            "tasks": [t.name for t in runnable],
            "versions": versions(),
            "git_commit": git_commit(),
            "device": str(loaded.device),
            "device_name": device_label,
            "stop_ids": sorted(loaded.stop_ids),
            "status": "running",
        }
        if opts.results is not None:
            store.write_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
            summary.manifest = manifest_path
        gen_config = getattr(loaded.model, "generation_config", None)
        engine = Engine(loaded.model, loaded.tokenizer, float(getattr(gen_config, "repetition_penalty", None) or 1.0),
                        decode=opts.decode, prefill_chunk=opts.prefill_chunk)
        if progress is not None:
            progress.start(total)
        for task in runnable:
            for sample, missing in pending.get(task.name, []):
                prompt = prompts.build_prompt(task, sample, loaded.tokenizer, spec.max_length, spec.chat,
                                              loaded.stop_ids, max_positions)
                result = engine.run(prompt, [t.plan for t in missing], opts.scope, sample.id, opts.seed)
                summary.prefills += 1
                for target, gen in zip(missing, result.generations):
                    row = schema.build_row(schema.RowInputs(
                        task=task, sample=sample, gen=gen, prompt=prompt, model=spec.name, scope=opts.scope,
                        score=score_generation(task, sample, gen.text),
                        evidence=evidence.row_fields(task, sample, prompt, gen.kept_indices, gen.kept_per_layer,
                                                     result.n_prefilled),
                        prefilled=result.n_prefilled, prefill_seconds=result.prefill_seconds,
                        peak_memory_bytes=result.peak_memory_bytes, device=device_label,
                        run_id=run_id, fps=schema.Fingerprints(protocol_fp, target.task_fp, target.config_fp),
                        recipe=opts.recipe))
                    target.file.append(row)
                    summary.rows_written += 1
                    summary.decodes += 1
                if progress is not None:
                    progress.advance(result.prefill_seconds, sum(g.decode_seconds for g in result.generations))
        manifest.update(status="complete", prefills=summary.prefills, decodes=summary.decodes,
                        rows_written=summary.rows_written)
        if opts.results is not None:
            store.write_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
        summary.rows = _rows(targets, samples)
        log(f"done: {summary.rows_written} rows written from {summary.prefills} prefills "
            f"(one per sample) and {summary.decodes} decodes; {summary.rows_done_before} rows were already done")
        skipped_note()
        return summary
    finally:
        if progress is not None:
            progress.stop()
        for target in targets:
            target.file.close()


class MemoryFile:
    """A result file that only keeps its rows in memory (kvbench.evaluate(results=None) writes nothing)."""

    class _NoLock:
        def check(self) -> None:
            pass

    def __init__(self, path: Path):
        self.path, self.rows, self.lock = path, [], self._NoLock()

    def open(self) -> set[str]:
        return self.done()

    def done(self) -> set[str]:
        return {row["_id"] for row in self.rows}

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def _rows(targets: list[Target], samples: dict[str, list[Sample]]) -> list[dict[str, Any]]:
    """The rows of the run's samples and plans, new or written before: per task, per sample, per plan."""
    out = []
    for task, task_samples in samples.items():
        files = [t.file for t in targets if t.task.name == task]
        by_file = [{r["_id"]: r for r in (f.rows if isinstance(f, MemoryFile) else store.read_rows(f.path))}
                   for f in files]
        out += [rows[s.id] for s in task_samples for rows in by_file if s.id in rows]
    return out


def _jsonable(value: Any) -> Any:
    """An option as the manifest records it: paths and methods as text, tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Method):
        return f"{type(value).__module__}:{type(value).__qualname__}({value.describe()})"
    if isinstance(value, models.LoadedModel):
        return f"loaded model {value.spec.name} ({value.identity})"
    return str(value)


def describe_run(runnable: list[TaskSpec], sources: dict[str, data.DataSource]) -> str:
    """One line: which tasks, from which data (a bare `kvbench run` says what it does before it loads)."""
    groups: dict[int, tuple[data.DataSource, list[str]]] = {}
    for task in runnable:
        source = sources[task.name]
        groups.setdefault(id(source), (source, []))[1].append(task.name)
    parts = [f"{', '.join(names)} from {source.describe()}" for source, names in groups.values()]
    return f"tasks: {'; '.join(parts)}"


def check_prompts(runnable: list[TaskSpec], pending: dict[str, list[tuple[Sample, list[Target]]]], tokenizer: Any,
                  spec: models.ModelSpec, max_positions: int | None, plans: list[Plan]) -> None:
    """From the tokenizer alone, before any weights load: every pending prompt fits the model (without a
    truncation length the whole prompt must fit its positions), a truncation length keeps each question
    whole, and a --budget evicts something from some prompt (else every method would be FullKV)."""
    by_tokens = [p for p in plans if p.budget.tokens is not None]
    evicts, longest = not by_tokens, 0
    for task in runnable:
        for sample, _ in pending.get(task.name, []):
            if spec.max_length is not None:
                prompts.check_max_length(task, sample, tokenizer, spec.max_length)
            if (spec.max_length is None and max_positions is not None) or not evicts:
                prompt = prompts.build_prompt(task, sample, tokenizer, spec.max_length, spec.chat, frozenset(),
                                              max_positions)
                longest = max(longest, prompt.n_tokens)
                # a continuous method may still evict while it decodes the new tokens
                evicts = evicts or any(p.budget.tokens < prompt.n_tokens + p.method.continuous * task.max_new_tokens
                                       for p in by_tokens)  # type: ignore[operator]
    if not evicts:
        plus = ", plus the new tokens for continuous methods" if any(p.method.continuous for p in by_tokens) else ""
        raise InputError(
            f"{{budgets}} {by_tokens[0].budget.tokens} keeps every token of every prompt (the longest has {longest} "
            f"tokens{plus}): each method would equal FullKV; give a smaller {{budgets}}, or {{ratios}}",
            options=("budgets", "ratios"))


def _pending(runnable: list[TaskSpec], targets: list[Target], samples: dict[str, list[Sample]],
             summary: RunSummary) -> tuple[dict[str, list[tuple[Sample, list[Target]]]], int]:
    """Per task, the samples some target still lacks (with those targets); and how many samples that is."""
    pending: dict[str, list[tuple[Sample, list[Target]]]] = {}
    total = 0
    summary.rows_done_before = 0
    for task in runnable:
        task_targets = [t for t in targets if t.task.name == task.name]
        for sample in samples[task.name]:
            missing = [t for t in task_targets if sample.id not in t.done]
            summary.rows_done_before += len(task_targets) - len(missing)
            if missing:
                pending.setdefault(task.name, []).append((sample, missing))
                total += 1
    return pending, total


def device_name(device: Any) -> str:
    """What the row's `device` field holds: the GPU's name, or the CPU's model name (timings are compared only
    between rows of the same name)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model (e.g. "AMD EPYC"); platform.processor() only says "x86_64" there
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
