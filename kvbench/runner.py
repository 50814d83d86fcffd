"""`kvbench run`: resolve and validate everything, skip what is done, prefill each pending sample once,
decode every (method, budget) from it, score, and append one row per (sample, method, budget)."""

from __future__ import annotations

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
from typing import Any

from kvbench import __version__, data, evidence, methods, models, outputs, prompts, scoring
from kvbench.results import store
from kvbench.data import HUB_REVISION, Sample, TaskSpec
from kvbench.engine import DECODE_MODES, GRANULARITIES, Engine, Generation, Plan, storage_granularity
from kvbench.errors import InputError
from kvbench.methods.base import Budget
from kvbench.results.store import ResultFile, Shard, digest

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
    decode: str = "batched"  # batched | sequential (engine.DECODE_MODES)
    prefill_chunk: int = 0  # > 0: prefill in chunks of this many tokens
    device_map: str | None = None  # "auto": spread the model over every visible GPU (accelerate)
    granularity: str = "kv_head"  # kv_head | query_head (methods-2 §1.6; engine.GRANULARITIES)


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
    model: str = ""  # the model's name as rows record it
    results: Path = Path("results")
    skipped: list[str] = field(default_factory=list)  # selected by a group (--tasks zh) but without data


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
    out: list[Budget] = []
    for ratio in opts.ratios or [0.1]:
        budget = Budget(ratio=ratio)
        # Two equal budgets would be one result file written twice by this very run: refused, since a
        # repeated value is more often a typo for another one than a wish to run it twice.
        if any(b.label == budget.label for b in out):
            raise InputError(f"--ratio lists {ratio:g} twice; give each ratio once")
        out.append(budget)
    return out


def _format_param(value: Any) -> str:
    """A hyper-parameter as --method-arg would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ":".join(str(v) for v in value)
    return str(value)


def _label(name: str, choice: methods.MethodChoice, plain: methods.MethodChoice) -> str:
    """The row's `method`: the canonical method name (an alias is another spelling of it) or the preset, plus
    the hyper-parameters --method-arg/--gqa-reduce set to something else, e.g. `snapkv(kernel_size=5)`; so
    two settings of one method are two rows of a table, never one cell mixing them."""
    label = choice.base if name in methods.METHODS else choice.label
    before, after = plain.method.params(), choice.method.params()
    changed = [f"{k}={_format_param(v)}" for k, v in after.items() if before.get(k) != v]
    return f"{label}({','.join(changed)})" if changed else label


def build_plans(opts: RunOptions) -> list[Plan]:
    names = methods.parse_method_list(opts.method)
    budget_list = budgets(opts)  # validated even when only fullkv (which ignores them) is selected
    overrides_all = dict(opts.method_args)
    if opts.gqa_reduce is not None:
        overrides_all["gqa_reduce"] = opts.gqa_reduce
    choices: list[tuple[str, methods.MethodChoice]] = []
    used: set[str] = set()
    given: dict[str, str] = {}  # label -> the name that asked for it first
    for name in names:
        base = methods.build(name)  # validates the name
        # FullKV evicts nothing, so no hyper-parameter changes its rows: --gqa-reduce for the other methods of
        # a sweep must not make it a second FullKV configuration (and label). A wrapper's names include its
        # inner method's.
        fields = set() if base.base == "fullkv" else set(base.method.parameter_names())
        applicable = {k: v for k, v in overrides_all.items() if k in fields}
        used |= set(applicable)
        choice = methods.build(name, applicable)
        label = _label(name, choice, base)
        if label in given:  # one result file, written twice by this run: refused like a repeated ratio
            other = "" if given[label] == name else f" ('{given[label]}' and '{name}' are one method)"
            raise InputError(f"--method lists {label.split('(')[0]} twice{other}; give each method once")
        given[label] = name
        choices.append((label, choice))
    unused = set(opts.method_args) - used
    if unused:
        key = sorted(unused)[0]
        raise InputError(f"--method-arg {key}: no selected method has a parameter '{key}'")
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


def protocol_fields(spec: models.ModelSpec, identity: str, dtype: str, decode: str = "sequential",
                    prefill_chunk: int = 0) -> dict[str, Any]:
    """Everything outside the task and the method that changes a score."""
    from kvbench import metrics

    fields = {
        "model_identity": identity,
        "max_length": spec.max_length,
        "chat": spec.chat,
        "dtype": dtype,
        "prompt_rules": prompts.PROMPT_RULES_VERSION,
        "metrics": metrics.METRICS_VERSION,
        "engine": ENGINE_VERSION,
    }
    # Sequential decoding of an unchunked prefill computes exactly what engine-v1 computed, so those rows keep
    # engine-v1's fingerprint (and stay comparable and resumable); anything else can move the last bits.
    if decode != "sequential":
        fields["decode"] = decode
    if prefill_chunk:
        fields["prefill_chunk"] = prefill_chunk
    return fields


def config_fields(plan: Plan, scope: str) -> dict[str, Any]:
    fields = {"method": plan.method.name, "params": plan.method.params(), "budget": plan.budget.label, "scope": scope}
    if plan.granularity != "kv_head":  # only then, so the fingerprints of kv_head rows stay what they were
        fields["granularity"] = plan.granularity
    artifacts = plan.method.artifacts()  # files the method reads (head tables), by sha256
    if artifacts:
        fields["artifacts"] = artifacts
    version = getattr(type(plan.method), "version", 1)
    if version != 1:  # version 1 adds nothing, so the fingerprints of rows written before versions existed hold
        fields["version"] = version
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
             model_name: str, protocol_fp: str, prefill_seconds: float, scope: str, prefilled: int,
             peak_memory_bytes: int | None = None) -> dict[str, Any]:
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
        "granularity": plan.granularity,
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
        "cache_bytes_allocated": gen.cache_bytes_allocated,
        "full_cache_bytes": gen.full_cache_bytes,
        **storage_fields(gen, prefilled),
        "max_cache_tokens": gen.max_cache_tokens,
        # evidence_tokens, evidence_retention (per layer), _mean, _min, layer_overlap: see results/README.md
        **evidence.row_fields(target.task, sample, prompt, gen.kept_indices, gen.kept_per_layer, prefilled),
        "generated_tokens": len(gen.token_ids),
        "token_ids": list(gen.token_ids),  # `kvbench compare` names the first differing token of a changed answer
        "decode": gen.decode,
        "prefill_seconds": round(prefill_seconds, 4),
        "decode_seconds": round(gen.decode_seconds, 4),
        "peak_memory_bytes": peak_memory_bytes,
        "protocol_fp": protocol_fp,
        "task_fp": target.task_fp,
        "config_fp": target.config_fp,
        "run_id": run_id,
    }


def storage_fields(gen: Generation, prefilled: int) -> dict[str, Any]:
    """methods-2.md §1.8: token keep ratio (kept entries / (layers x KV heads x prefilled tokens)), byte ratio
    (cache_bytes / full_cache_bytes), whether cache_bytes is physical or the formula's bytes of a simulated
    layout, and the bytes after each transform stage."""
    layers = len(gen.kept_per_layer)
    heads = len(gen.kept_indices[0].lengths) if gen.kept_indices else 0
    slots = layers * heads * prefilled
    return {
        "token_keep_ratio": round(gen.kept_entries / slots, 6) if slots else 1.0,
        "byte_ratio": round(gen.cache_bytes / gen.full_cache_bytes, 6) if gen.full_cache_bytes else None,
        "storage": gen.storage,
        "stages": [{"stage": stage, "bytes": nbytes} for stage, nbytes in gen.stages] if gen.stages else None,
    }


def run(opts: RunOptions, log: Callable[[str], None] = print, progress: Any = None) -> RunSummary:
    # ---- 1. validate everything before touching the disk or loading weights ----
    if opts.limit is not None and opts.limit < 0:
        raise InputError(f"--limit must be >= 0, got {opts.limit}")
    if opts.limit == 0:
        raise InputError("--limit 0 selects no sample; give --limit N with N >= 1, or leave it out for every sample")
    if opts.scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got '{opts.scope}'")
    if opts.decode not in DECODE_MODES:
        raise InputError(f"--decode must be one of {', '.join(DECODE_MODES)}, got '{opts.decode}'")
    if opts.prefill_chunk < 0:
        raise InputError(f"--prefill-chunk must be a number of tokens >= 0 (0: no chunking), got {opts.prefill_chunk}")
    if opts.granularity not in GRANULARITIES:
        raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{opts.granularity}'")
    if opts.device_map not in (None, "auto"):
        raise InputError(f"--device-map must be auto, got '{opts.device_map}'")
    if opts.data not in ("auto", "hub", "local"):
        raise InputError(f"--data must be auto, hub or local, got '{opts.data}'")
    if opts.data == "local" and opts.data_dir is None:
        raise InputError("--data local needs --data-dir DIR")
    outputs.check_dir(opts.results, "--results", probe=False)  # writability: once there is work (step 2)
    spec = models.resolve_model(opts.model, opts.max_length)
    shard = rank_shard(opts)
    plans = build_plans(opts)
    task_specs = data.select_tasks(opts.tasks)
    sources = data.open_source(
        opts.data, opts.data_dir, task_specs, models.cache_root(), opts.synthetic_length, opts.hub_revision
    )
    explicit = {p.strip() for p in opts.tasks.split(",")}
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
    device = rank_device(opts.device)
    dtype = dtype_name(opts, spec, device)
    identity = models.model_identity(spec)
    for plan in plans:  # head tables of the run's model (HeadKV, DuoAttention): part of the fingerprints
        plan.method.bind_model(identity, spec.name)
    protocol = protocol_fields(spec, identity, dtype, opts.decode, opts.prefill_chunk)
    protocol_fp = digest(protocol)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    # ---- 2. find what is already done: read only, nothing created, a live writer refused now ----
    targets: list[Target] = []
    summary = RunSummary(model=spec.name, results=opts.results, skipped=skipped)
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

    def skipped_note() -> None:
        if skipped:
            log(f"skipped {len(skipped)} selected task(s) without data in {opts.data_dir}: {', '.join(skipped)}")

    def all_done() -> RunSummary:
        log(describe_run(runnable, sources))
        log(f"all {n_samples} samples x {len(plans)} configs done ({summary.rows_done_before} rows); nothing to run")
        skipped_note()
        return summary

    pending, total = _pending(runnable, targets, samples, summary)
    if total == 0:
        return all_done()
    outputs.check_dir(opts.results, "--results")

    # ---- 3. check the model (RoPE, tokenizer) and that every pending prompt fits it from its config and
    # tokenizer alone, then load the weights: bad input is refused before anything is written ----
    pre = models.preflight(spec, opts.trust_remote_code)
    max_positions = getattr(pre.config, "max_position_embeddings", None)
    check_prompts(runnable, pending, pre.tokenizer, spec, max_positions, plans)
    log(describe_run(runnable, sources))
    for label, stages in {p.label: p.method.stages() for p in plans if p.method.stages()}.items():
        log(f"{label}: select -> {' -> '.join(stages)}; storage simulated in the model dtype, cache_bytes are "
            "the packed layout's (methods-2.md §1.8)")
    note = granularity_note(opts, plans)
    if note:
        log(note)
    log(f"{total} of {n_samples} samples pending; loading {spec.name} ...")
    loaded = models.load_model(spec, device, dtype, opts.trust_remote_code, pre, opts.device_map)
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
            "plans": [{"method": p.label, "params": p.method.params(), "budget": p.budget.label,
                       "granularity": p.granularity, "artifacts": p.method.artifacts()} for p in plans],
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
                    row = make_row(target, sample, gen, prompt, run_id, spec.name, protocol_fp,
                                   result.prefill_seconds, opts.scope, result.n_prefilled, result.peak_memory_bytes)
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
        skipped_note()
        return summary
    finally:
        if progress is not None:
            progress.stop()
        for target in targets:
            target.file.close()


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
            f"--budget {by_tokens[0].budget.tokens} keeps every token of every prompt (the longest has {longest} "
            f"tokens{plus}): each method would equal FullKV; give a smaller --budget, or --ratio")


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
