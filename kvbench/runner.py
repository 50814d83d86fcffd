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

from kvbench import __version__, data, evidence, methods, metrics, models, prompts, scoring
from kvbench.results import schema, store
from kvbench.data import HUB_REVISION, Sample, TaskSpec
from kvbench.engine import DECODE_MODES, Engine, Plan
from kvbench.errors import InputError
from kvbench.methods.base import Budget
from kvbench.results.store import ResultFile, Shard

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
        fields = set(base.method.params())
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


def run(opts: RunOptions, log: Callable[[str], None] = print, progress: Any = None) -> RunSummary:
    # ---- 1. validate everything before touching the disk or loading weights ----
    if opts.limit is not None and opts.limit < 0:
        raise InputError(f"--limit must be >= 0, got {opts.limit}")
    if opts.scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got '{opts.scope}'")
    if opts.decode not in DECODE_MODES:
        raise InputError(f"--decode must be one of {', '.join(DECODE_MODES)}, got '{opts.decode}'")
    if opts.prefill_chunk < 0:
        raise InputError(f"--prefill-chunk must be a number of tokens >= 0 (0: no chunking), got {opts.prefill_chunk}")
    if opts.device_map not in (None, "auto"):
        raise InputError(f"--device-map must be auto, got '{opts.device_map}'")
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
    protocol = schema.protocol_fields(
        model_identity=identity, max_length=spec.max_length, chat=spec.chat, dtype=dtype,
        prompt_rules=prompts.PROMPT_RULES_VERSION, metrics=metrics.METRICS_VERSION, engine=ENGINE_VERSION,
        decode=opts.decode, prefill_chunk=opts.prefill_chunk)
    protocol_fp = schema.protocol_fp(protocol)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    # ---- 2. find what is already done: read only, nothing created, a live writer refused now ----
    targets: list[Target] = []
    summary = RunSummary()
    for task in runnable:
        task_fp = schema.task_fp(task.fingerprint_fields(), sources[task.name].identity(task), protocol_fp)
        for plan in plans:
            config = schema.config_fields(plan.method.name, plan.method.params(), plan.budget.label, opts.scope,
                                          getattr(type(plan.method), "version", 1))
            config_fp = schema.config_fp(config, task_fp)
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
        device_label = device_name(loaded.device)
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
            "device_name": device_label,
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
                    row = schema.build_row(schema.RowInputs(
                        task=task, sample=sample, gen=gen, prompt=prompt, model=spec.name, scope=opts.scope,
                        score=score_generation(task, sample, gen.text),
                        evidence=evidence.row_fields(task, sample, prompt, gen.kept_indices, gen.kept_per_layer,
                                                     result.n_prefilled),
                        prefilled=result.n_prefilled, prefill_seconds=result.prefill_seconds,
                        peak_memory_bytes=result.peak_memory_bytes, device=device_label,
                        run_id=run_id, fps=schema.Fingerprints(protocol_fp, target.task_fp, target.config_fp)))
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
