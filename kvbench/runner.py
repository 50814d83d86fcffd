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

from kvbench import __version__, data, evidence, methods, models, prompts, scoring
from kvbench.results import store
from kvbench.data import HUB_REVISION, Sample, TaskSpec
from kvbench.engine import Engine, Generation, Plan
from kvbench.errors import InputError
from kvbench.methods.base import Budget
from kvbench.results.store import ResultFile, Shard, digest

if TYPE_CHECKING:
    from kvbench.studies.recipes import Overrides

# Bump when the engine's decoding rules change (anything that can move a score).
ENGINE_VERSION = "engine-v1"
SCOPES = ("full", "context")


@dataclass
class RunOptions:
    model: str = "smollm2-135m"
    method: str = "fullkv"
    ratios: list[float] | None = None
    budget: int | None = None
    tasks: str = "synthetic"
    data: str = "auto"
    data_dir: Path | None = None
    limit: int | None = None
    results: Path = Path("results")
    device: str = "auto"
    dtype: str = "auto"
    scope: str = "full"
    gqa_reduce: str | None = None
    method_args: dict[str, str] = field(default_factory=dict)
    max_length: int | None = None
    shard: Shard = field(default_factory=Shard)
    wait: bool = False
    trust_remote_code: bool = False
    synthetic_length: int = 2000
    seed: int = 0
    hub_revision: str = HUB_REVISION
    # kvbench run --recipe: {name, overrides, deviations}, copied into every row (no fingerprint: the options
    # it expanded to are fingerprinted as for any run)
    recipe: dict[str, Any] | None = None


def recipe_options(name: str, overrides: "Overrides", base: RunOptions) -> RunOptions:
    """`kvbench run --recipe NAME`: the recipe's model, methods, budget, tasks, data, scope and truncation, with
    `overrides` applied, on top of `base`, which keeps what a recipe leaves alone (results, device, dtype,
    shards, ...); an explicit --data wins over the recipe's."""
    from kvbench.studies import recipes

    plan = recipes.load(name).expand(overrides)
    return dataclasses.replace(
        base, model=plan.model, method=plan.method, ratios=plan.ratios, budget=plan.budget, tasks=plan.tasks,
        data=plan.data if base.data == "auto" else base.data, data_dir=plan.data_dir, limit=plan.limit,
        scope=plan.scope, max_length=plan.max_length, recipe=plan.stamp,
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


def parse_ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--ratio must be a number in (0, 1] or a comma list of them, got '{part}'") from None
        if not 0 < value <= 1:
            raise InputError(f"--ratio must be in (0, 1], got {part}")
        values.append(value)
    return values


def parse_method_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--method-arg must be key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def budgets(opts: RunOptions) -> list[Budget]:
    if opts.budget is not None and opts.ratios is not None:
        raise InputError("give --ratio or --budget, not both")
    if opts.budget is not None:
        return [Budget(tokens=opts.budget)]
    return [Budget(ratio=r) for r in (opts.ratios or [0.1])]


def build_plans(opts: RunOptions) -> list[Plan]:
    names = methods.parse_method_list(opts.method)
    budget_list = budgets(opts)  # validated even when only fullkv (which ignores them) is selected
    overrides_all = dict(opts.method_args)
    if opts.gqa_reduce is not None:
        overrides_all["gqa_reduce"] = opts.gqa_reduce
    choices = []
    used: set[str] = set()
    for name in names:
        base = methods.build(name)  # validates the name
        fields = set(base.method.all_params())
        applicable = {k: v for k, v in overrides_all.items() if k in fields}
        used |= set(applicable)
        choices.append(methods.build(name, applicable))
    unused = set(opts.method_args) - used
    if unused:
        key = sorted(unused)[0]
        raise InputError(f"--method-arg {key}: no selected method has a parameter '{key}'")
    plans: list[Plan] = []
    for choice in choices:
        if choice.base == "fullkv":
            plans.append(Plan(choice.label, choice.method, Budget(ratio=1.0)))
            continue
        for budget in budget_list:
            plans.append(Plan(choice.label, choice.method, budget))
    return plans


def protocol_fields(spec: models.ModelSpec, identity: str, dtype: str) -> dict[str, Any]:
    """Everything outside the task and the method that changes a score."""
    from kvbench import metrics

    return {
        "model_identity": identity,
        "max_length": spec.max_length,
        "chat": spec.chat,
        "dtype": dtype,
        "prompt_rules": prompts.PROMPT_RULES_VERSION,
        "metrics": metrics.METRICS_VERSION,
        "engine": ENGINE_VERSION,
    }


def config_fields(plan: Plan, scope: str) -> dict[str, Any]:
    return {"method": plan.method.name, "params": plan.method.params(), "budget": plan.budget.label, "scope": scope}


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
            raise InputError("--shard cannot be combined with a multi-process launch (WORLD_SIZE > 1)")
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


def make_row(target: Target, sample: Sample, gen: Generation, prompt: prompts.Prompt, run_id: str,
             model_name: str, protocol_fp: str, prefill_seconds: float, scope: str, prefilled: int) -> dict[str, Any]:
    plan = gen.plan
    return {
        "_id": sample.id,
        "task": target.task.name,
        "model": model_name,
        "method": plan.label,
        "method_base": plan.method.name,
        "params": plan.method.params(),
        "ratio": plan.budget.ratio,
        "budget_tokens": plan.budget.tokens,
        "budget": plan.budget.label,
        "scope": scope,
        "prediction": gen.text,
        "answers": list(sample.answers),
        "all_classes": list(sample.all_classes) if sample.all_classes is not None else None,
        "length": sample.length,
        "score": score_generation(target.task, sample, gen.text),
        "prompt_tokens": prompt.n_tokens,
        "prompt_tokens_untruncated": prompt.n_original_tokens,
        "prefilled_tokens": prefilled,
        "kept_tokens": gen.kept_per_layer,
        "kept_tokens_mean": sum(gen.kept_per_layer) / len(gen.kept_per_layer),
        "cache_bytes": gen.cache_bytes,
        "full_cache_bytes": gen.full_cache_bytes,
        "max_cache_tokens": gen.max_cache_tokens,
        # evidence_tokens, evidence_retention (per layer), _mean, _min, layer_overlap: see results/README.md
        **evidence.row_fields(target.task, sample, prompt, gen.kept_indices, gen.kept_per_layer, prefilled),
        "generated_tokens": len(gen.token_ids),
        "prefill_seconds": round(prefill_seconds, 4),
        "decode_seconds": round(gen.decode_seconds, 4),
        "protocol_fp": protocol_fp,
        "task_fp": target.task_fp,
        "config_fp": target.config_fp,
        "run_id": run_id,
    }


def run(opts: RunOptions, log: Callable[[str], None] = print, progress: Any = None) -> RunSummary:
    # ---- 1. validate everything before touching the disk or loading weights ----
    if opts.limit is not None and opts.limit < 0:
        raise InputError(f"--limit must be >= 0, got {opts.limit}")
    if opts.scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got '{opts.scope}'")
    if opts.data not in ("auto", "hub", "local"):
        raise InputError(f"--data must be auto, hub or local, got '{opts.data}'")
    if opts.data == "local" and opts.data_dir is None:
        raise InputError("--data local needs --data-dir DIR")
    if opts.results.exists() and not opts.results.is_dir():
        raise InputError(f"--results {opts.results} exists and is not a directory")
    spec = models.resolve_model(opts.model, opts.max_length)
    shard = rank_shard(opts)
    plans = build_plans(opts)
    task_specs = data.select_tasks(opts.tasks)
    sources = data.open_source(
        opts.data, opts.data_dir, task_specs, models.cache_root(), opts.synthetic_length, opts.hub_revision
    )
    explicit = {p.strip() for p in opts.tasks.split(",")}
    runnable: list[TaskSpec] = []
    for task in task_specs:
        if sources[task.name].available(task):
            runnable.append(task)
        elif task.name in explicit:
            raise InputError(f"no data for task '{task.name}' in {opts.data_dir}")
        else:
            log(f"skipping {task.name}: no {task.name}.jsonl in {opts.data_dir}")
    if not runnable:
        raise InputError(f"none of the selected tasks has data in {opts.data_dir}")
    samples: dict[str, list[Sample]] = {}
    for task in runnable:
        picked = list(sources[task.name].samples(task, opts.limit))
        samples[task.name] = [s for i, s in enumerate(picked) if shard.owns(i)]
    device = rank_device(opts.device)
    dtype = dtype_name(opts, spec, device)
    identity = models.model_identity(spec)
    protocol = protocol_fields(spec, identity, dtype)
    protocol_fp = digest(protocol)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    # ---- 2. find what is already done: read only, nothing created, a live writer refused now ----
    targets: list[Target] = []
    summary = RunSummary()
    for task in runnable:
        task_fp = digest({"task": task.fingerprint_fields(), "data": sources[task.name].identity(task),
                          "protocol": protocol_fp})
        for plan in plans:
            config_fp = digest({"config": config_fields(plan, opts.scope), "task_fp": task_fp})
            path = store.result_path(opts.results, spec.slug, task.name, plan.label, plan.budget.label,
                                     opts.scope, config_fp, shard)
            file = ResultFile(path, wait=opts.wait)
            file.lock.check()
            targets.append(Target(task, plan, config_fp, task_fp, file, file.done()))
            summary.files.append(path)
    n_samples = sum(len(v) for v in samples.values())

    def all_done() -> RunSummary:
        log(f"all {n_samples} samples x {len(plans)} configs done ({summary.rows_done_before} rows); nothing to run")
        return summary

    pending, total = _pending(runnable, targets, samples, summary)
    if total == 0:
        return all_done()

    # ---- 3. check the model (RoPE, tokenizer) and that every pending prompt fits it from its config and
    # tokenizer alone, then load the weights: bad input is refused before anything is written ----
    pre = models.preflight(spec, opts.trust_remote_code)
    max_positions = getattr(pre.config, "max_position_embeddings", None)
    if spec.max_length is None and max_positions is not None:
        for task in runnable:
            for sample, _ in pending.get(task.name, []):
                prompts.build_prompt(task, sample, pre.tokenizer, None, spec.chat, frozenset(), max_positions)
    log(f"{total} of {n_samples} samples pending; loading {spec.name} ...")
    loaded = models.load_model(spec, device, dtype, opts.trust_remote_code, pre)
    summary.model_loaded = True

    # ---- 4. take the locks, repair torn tails, and look again (another process may have written meanwhile) ----
    try:
        for target in targets:
            target.done = target.file.open()
        pending, total = _pending(runnable, targets, samples, summary)
        if total == 0:  # another process finished them while this one loaded the model (--wait)
            return all_done()

        # ---- 5. run ----
        manifest_path = opts.results / spec.slug / "manifests" / f"{run_id}.json"
        manifest = {
            "run_id": run_id,
            "argv": sys.argv,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in opts.__dict__.items() if k != "shard"},
            "shard": f"{shard.index}/{shard.count}",
            "protocol": protocol,
            "protocol_fp": protocol_fp,
            "plans": [{"method": p.label, "params": p.method.params(), "budget": p.budget.label} for p in plans],
            "tasks": [t.name for t in runnable],
            "versions": versions(),
            "git_commit": git_commit(),
            "device": str(loaded.device),
            "device_name": _device_name(loaded.device),
            "stop_ids": sorted(loaded.stop_ids),
            "status": "running",
        }
        store.write_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
        summary.manifest = manifest_path
        gen_config = getattr(loaded.model, "generation_config", None)
        engine = Engine(loaded.model, loaded.tokenizer, float(getattr(gen_config, "repetition_penalty", None) or 1.0))
        if progress is not None:
            progress.start(total)
        for task in runnable:
            for sample, missing in pending.get(task.name, []):
                prompt = prompts.build_prompt(task, sample, loaded.tokenizer, spec.max_length, spec.chat,
                                              loaded.stop_ids, max_positions)
                result = engine.run(prompt, [t.plan for t in missing], opts.scope, sample.id, opts.seed)
                summary.prefills += 1
                for target, gen in zip(missing, result.generations):
                    row = make_row(target, sample, gen, prompt, run_id, spec.name, protocol_fp,
                                   result.prefill_seconds, opts.scope, result.n_prefilled)
                    if opts.recipe is not None:
                        row["recipe"] = opts.recipe
                    target.file.append(row)
                    summary.rows_written += 1
                    summary.decodes += 1
                if progress is not None:
                    progress.advance(result.prefill_seconds, sum(g.decode_seconds for g in result.generations))
        manifest.update(status="complete", prefills=summary.prefills, decodes=summary.decodes,
                        rows_written=summary.rows_written)
        store.write_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
        log(f"done: {summary.rows_written} rows written from {summary.prefills} prefills "
            f"(one per sample) and {summary.decodes} decodes; {summary.rows_done_before} rows were already done")
        return summary
    finally:
        if progress is not None:
            progress.stop()
        for target in targets:
            target.file.close()


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


def _device_name(device: Any) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
