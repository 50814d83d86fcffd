"""`kvbench sensitivity`, start to end: check the options, plan the study without the weights, read what an
earlier (interrupted) run of the same study already measured, load the model only if something is missing,
measure the missing cells document by document while appending every row (flushed and fsynced, through
kvbench.results.store's ResultFile), then analyse every planned row and write tables, figures and manifest.

Resuming. A row's `_id` is its cell's key (document, t, policy, budget, position mode, apply mode, repeat) and
its `study_fp` fingerprints everything else that fixes its value (model identity, dtype, device type, documents'
source files, sink, base seed, BOS rule, measurement version). Rerunning the same command after a kill
measures only the cells whose rows are missing; a torn last line is ignored and cut off. Rows of another
study in the same --out are refused before the model loads. A study that adds policies, methods or budgets
to an earlier one in the same --out reuses the rows the two share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench.errors import InputError
from kvbench.results.store import ResultFile, digest, read_rows
from kvbench.studies.sensitivity import figures, outputs
from kvbench.studies.sensitivity.analysis import analyse
from kvbench.studies.sensitivity.measure import MeasureConfig, measure_document, plan_cells
from kvbench.studies.sensitivity.options import (
    SensitivityOptions, build_methods, check_modes, check_out_dir, check_policies,
)
from kvbench.studies.sensitivity.plan import StudyPlan, load_documents, plan_study
from kvbench.studies.sensitivity.policies import PRIMARY_POS_MODE
from kvbench.studies.sensitivity.verdicts import fmt

Log = Callable[[str], None]
MEASURE_VERSION = "sensitivity-v1"  # bump when a change can move a row's numbers


@dataclass
class SensitivityResult:
    out_dir: Path
    model: str
    n_docs: int
    n_rows: int
    n_measured: int  # rows measured by this run (the rest were already in kl_raw.jsonl)
    seconds: float
    alpha: float | None
    alpha_ci: tuple[float, float] | None
    err_pow: float | None
    err_exp: float | None
    err_ratio: float | None
    alpha_sr: float | None
    delta_alpha_ci: tuple[float, float] | None
    random_sliding_ratio: float | None  # median over budgets in the fit range, primary position mode
    verdicts: dict[str, dict[str, str]]
    files: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        def ci(pair: tuple[float, float] | None, label: str) -> str:
            return f"  [{label} {fmt(pair[0])}, {fmt(pair[1])}]" if pair else ""

        lines = [
            f"sensitivity: {self.model}, {self.n_docs} documents, {self.n_rows} measurements "
            f"({self.n_measured} measured now), {self.seconds:.0f} s",
            f"alpha (sliding, power law) = {fmt(self.alpha)}" + ci(self.alpha_ci, "95% CI"),
            f"extrapolation error: power law {fmt(self.err_pow)} dec, exponential {fmt(self.err_exp)} dec, "
            f"ratio exp/pow = {fmt(self.err_ratio, '.2f')}",
            f"alpha_sr (sink+recent vs B-s) = {fmt(self.alpha_sr)}" + ci(self.delta_alpha_ci, "delta 95% CI"),
            f"random/sliding KL ratio (median over fit-range budgets) = {fmt(self.random_sliding_ratio, '.1f')}",
        ]
        for claim, v in self.verdicts.items():
            lines.append(f"  {claim}: {v['verdict'].upper()} - {v['detail']}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"wrote {self.out_dir} (" + ", ".join(sorted(Path(p).name for p in self.files.values())) + ")")
        return "\n".join(lines)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(default: int, own: int = 0) -> int:
    """[ours] On a CPU that other processes already saturate (1-minute load minus our own threads >= the CPU
    count), several torch threads spin against each other and run several times slower than one; use 1
    thread then, else `default` (scripts/BENCHMARKS.md)."""
    try:
        others = os.getloadavg()[0] - own
    except OSError:
        return default
    return 1 if others >= _cpu_count() - 0.5 else default


@dataclass
class Subject:
    """The model as the study needs it before any weight is loaded."""

    name: str
    identity: str
    dtype: str
    device: str
    config: Any
    tokenizer: Any
    load: Callable[[], Any]  # -> an object with .model (the weights, loaded on demand)


def _subject(opts: SensitivityOptions, loaded: Any) -> Subject:
    if loaded is not None:  # tests inject a tiny model
        model = loaded.model
        param = next(model.parameters())
        return Subject(getattr(getattr(loaded, "spec", None), "name", None) or opts.model,
                       getattr(loaded, "identity", "unknown"), str(param.dtype).replace("torch.", ""),
                       str(param.device), model.config, getattr(loaded, "tokenizer", None), lambda: loaded)
    from kvbench import models

    spec = models.resolve_model(opts.model)
    device = models.resolve_device(opts.device)
    dtype = models.resolve_dtype(spec.dtype if opts.dtype == "auto" else opts.dtype, device)
    pre = models.preflight(spec)
    return Subject(spec.name, pre.identity, str(dtype).replace("torch.", ""), str(device), pre.config, pre.tokenizer,
                   lambda: models.load_model(spec, device=opts.device, dtype=opts.dtype, pre=pre))


def study_fields(opts: SensitivityOptions, subject: Subject) -> dict[str, Any]:
    """Everything besides a row's key that fixes its value: its `study_fp` is their digest."""
    source = outputs.data_identity(opts.data_dir, opts.tasks).get("tasks", {})
    return {"measure": MEASURE_VERSION, "model_identity": subject.identity, "dtype": subject.dtype,
            "device_type": subject.device.split(":")[0], "data": source, "sink": opts.sink, "seed": opts.seed,
            "bos_prepend": opts.bos_prepend}


def _measure_config(opts: SensitivityOptions, plan: StudyPlan, methods: dict[str, Any]) -> MeasureConfig:
    return MeasureConfig(windows=plan.windows, policies=plan.policies, methods=methods, pos_modes=tuple(opts.pos_modes),
                         apply_modes=tuple(opts.apply_modes), sink=opts.sink, seeds=plan.seeds,
                         other_max_budget=plan.other_max_budget, sliding_pos_modes=plan.sliding_pos_modes,
                         base_seed=opts.seed, batch_tokens=opts.batch_tokens, bos_prepend=opts.bos_prepend)


def run_sensitivity(opts: SensitivityOptions, log: Log = print, *, loaded: Any = None,
                    documents: Any = None) -> SensitivityResult:
    """The whole study (see the module docstring). `loaded` (a LoadedModel or any object with .model,
    .tokenizer and .identity) and `documents` let tests inject a tiny model and token ids."""
    from kvbench.models import safe_name

    start = time.perf_counter()
    timings: dict[str, float] = {}
    # ---- 1. everything that can be refused without a model ----
    check_policies(opts.policies)
    methods = build_methods(opts.methods)
    check_modes(opts)
    draw = figures.available()
    if opts.out_dir is not None:
        check_out_dir(Path(opts.out_dir))
    subject = _subject(opts, loaded)
    out_dir = Path(opts.out_dir) if opts.out_dir else Path("results") / "sensitivity" / safe_name(subject.name)
    check_out_dir(out_dir)
    if not draw:
        log("note: matplotlib is not installed (pip install 'kvbench[plot]'): rows and tables are written, figures skipped")
    if documents is None:
        documents = load_documents(opts, subject.tokenizer, opts.max_doc_tokens)
    limit = int(getattr(subject.config, "max_position_embeddings", 0) or 1 << 30)
    plan = plan_study(opts, documents, limit)
    cfg = _measure_config(opts, plan, methods)
    study = study_fields(opts, subject)
    study_fp = digest(study)
    planned = {d.doc_id: [p.cell.key for p in plan_cells(cfg, d.doc_id, plan.positions[d.doc_id])] for d in plan.docs}
    n_planned = sum(len(v) for v in planned.values())

    # ---- 2. what an earlier run of this study already measured (read only; a live writer is refused now) ----
    raw = ResultFile(out_dir / "kl_raw.jsonl")
    raw.lock.check()
    _check_same_study(raw.path, study_fp)
    done = raw.done()
    pending = [d for d in plan.docs if any(k not in done for k in planned[d.doc_id])]
    n_missing = sum(k not in done for keys in planned.values() for k in keys)
    log(f"sensitivity: {subject.name}; {len(plan.docs)} documents x {plan.n_positions} positions, t in "
        f"[{plan.t_min}, {plan.t_max}], windows {list(plan.windows)}, fit range {list(plan.fit_range)}, "
        f"policies {list(plan.policies)}, methods {list(methods)}, seeds {plan.seeds}, apply {list(opts.apply_modes)}; "
        f"{n_planned - n_missing} of {n_planned} measurements already in {raw.path}")
    notes = list(plan.notes)
    for n in notes:
        log(f"note: {n}")
    manifest = {
        "kind": "kvbench-sensitivity", "status": "running", "study_fp": study_fp, "study": study,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": subject.name, "identity": subject.identity, "dtype": subject.dtype, "device": subject.device,
                  "max_positions": limit, "tokenizer": type(subject.tokenizer).__name__ if subject.tokenizer else None},
        "options": asdict(opts), "methods": {label: {"method": m.name, "params": m.params()} for label, m in methods.items()},
        "plan": {**plan.describe(), "n_measurements": n_planned, "missing_at_start": n_missing},
        "data": outputs.data_identity(opts.data_dir, opts.tasks), "choices": plan.choices, "notes": notes,
        "versions": outputs.versions(), "cpu_count": _cpu_count(),
    }
    timings["plan_s"] = time.perf_counter() - start

    # ---- 3. measure what is missing ----
    n_measured, threads_used = 0, []
    if pending:
        t0 = time.perf_counter()
        model = subject.load().model
        timings["load_model_s"] = time.perf_counter() - t0
        if methods and getattr(model.config, "_attn_implementation", "") != "kvbench":  # load_model installs it
            raise InputError("--methods needs kvbench's attention installed (kvbench.engine.attention.install)")
        done = raw.open()  # the lock, a torn tail cut off, and a fresh look at what is done
        try:
            outputs.write_manifest(out_dir, manifest)
            n_measured, threads_used = _measure(model, pending, plan, cfg, raw, done, study_fp, subject, opts, log)
        finally:
            raw.close()
        timings["measure_s"] = time.perf_counter() - t0 - timings["load_model_s"]

    # ---- 4. analyse every planned row, write tables, figures and manifest ----
    t1 = time.perf_counter()
    order = {k: i for i, k in enumerate(k for keys in planned.values() for k in keys)}
    rows = sorted((r for r in read_rows(raw.path) if r["_id"] in order and r.get("study_fp") == study_fp),
                  key=lambda r: order[r["_id"]])
    if len(rows) != n_planned:
        raise InputError(f"{raw.path} holds {len(rows)} of the {n_planned} planned measurements after measuring; "
                         "another process may be writing it")
    doc_ids = [d.doc_id for d in plan.docs]
    a = analyse(rows, doc_ids, plan.fit_range, opts.sink, tuple(opts.epsilons), opts.bootstrap, opts.seed,
                methods=tuple(methods))
    notes.extend(a["notes"])
    files = outputs.write_outputs(out_dir, subject.name, a, notes, draw)
    timings["analyse_and_write_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - start
    manifest.update(status="complete", notes=notes, timings=timings, n_rows=len(rows), n_measured_this_run=n_measured,
                    torch_threads_per_doc=threads_used, analysis=a, files=files)
    outputs.write_manifest(out_dir, manifest)
    s, sr = a.get("sliding", {}), a.get("sink_recent", {})
    gap = a.get("policy_gap", {}).get(f"M1/{PRIMARY_POS_MODE}", {})
    return SensitivityResult(
        out_dir=out_dir, model=subject.name, n_docs=len(plan.docs), n_rows=len(rows), n_measured=n_measured,
        seconds=timings["total_s"], alpha=s.get("alpha"), alpha_ci=s.get("alpha_ci"), err_pow=s.get("err_pow"),
        err_exp=s.get("err_exp"), err_ratio=s.get("ratio"), alpha_sr=sr.get("alpha_sr"),
        delta_alpha_ci=sr.get("delta_ci"), random_sliding_ratio=gap.get("median_fit_range"), verdicts=a["verdicts"],
        files=files, notes=notes,
    )


def _check_same_study(path: Path, study_fp: str) -> None:
    others = {r.get("study_fp") for r in read_rows(path)} - {study_fp}
    if others:
        raise InputError(f"{path} holds measurements of another study (model, dtype, device, documents, sink, seed "
                         "or BOS rule differ); pass another --out or remove that file")


def _measure(model: Any, todo: list[Any], plan: StudyPlan, cfg: MeasureConfig, raw: ResultFile, done: set[str],
             study_fp: str, subject: Subject, opts: SensitivityOptions, log: Log) -> tuple[int, list[int]]:
    """Measure the missing cells of the documents in `todo`, appending each batch's rows as it comes."""
    base = {"model": subject.name, "dtype": subject.dtype}
    default_threads = torch.get_num_threads()
    cpu = next(model.parameters()).device.type == "cpu"
    threads_used: list[int] = []
    n_measured = 0
    t0 = time.perf_counter()
    try:
        for i, doc in enumerate(todo):
            if opts.threads:
                torch.set_num_threads(opts.threads)
            elif cpu:
                torch.set_num_threads(auto_threads(default_threads, torch.get_num_threads() if i else 0))
            threads_used.append(torch.get_num_threads())
            start, count = time.perf_counter(), 0
            for batch in measure_document(model, doc.ids, plan.positions[doc.doc_id], cfg, doc_id=doc.doc_id,
                                          base_row={**base, "task": doc.task, "study_fp": study_fp}, done=done):
                for row in batch:
                    raw.append(row)
                count += len(batch)
            n_measured += count
            elapsed = time.perf_counter() - t0
            eta = elapsed / (i + 1) * (len(todo) - i - 1)
            log(f"  doc {i + 1}/{len(todo)} {doc.doc_id}: {count} rows in {time.perf_counter() - start:.1f} s, "
                f"{threads_used[-1]} thread(s) (eta {eta:.0f} s)")
    finally:
        torch.set_num_threads(default_threads)
    return n_measured, threads_used

