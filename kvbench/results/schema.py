"""The result row and its fingerprints: what a line of a result file holds, how each field is made from a
finished generation, and the three digests that decide which rows may share a table cell.

Adding a row field is one line in FIELDS (name, one-line meaning, how to compute it from RowInputs), plus
its entry in results/README.md, which documents every field for users (a test holds the two lists equal).
Fields are written in FIELDS' order.

Fingerprints (12 hex digits of a sha256 over sorted-key JSON):
- protocol_fp: everything outside the task and the method that changes a score (model weights identity,
  truncation length, chat policy, dtype, prompt-rule, metric and engine versions);
- task_fp: the task's prompt/generation/metric rules, the exact data (file sha256, hub commit) and protocol_fp;
- config_fp: method, resolved hyper-parameters, budget, scope, and task_fp (plus, only where they are not the
  default: granularity, the sha256 of the files the method reads, the method's code version).
Their inputs and composition are frozen: stored results carry these digests, and a table refuses to average
rows whose digests differ, so changing how they are computed would silently split old results from new ones
(tests/test_schema.py pins them). Bump a version string instead when something that moves scores changes.

Torch-free: readers of results (table, score, compare) import this module without loading torch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the runner's types; importing them here would load torch
    from kvbench.data import Sample, TaskSpec
    from kvbench.engine import Generation
    from kvbench.prompts import Prompt

FINGERPRINTS = ("protocol_fp", "task_fp", "config_fp")


def digest(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able object (sorted keys; non-JSON values by str())."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def protocol_fields(*, model_identity: str, max_length: int | None, chat: str, dtype: str, prompt_rules: str,
                    metrics: str, engine: str, decode: str = "sequential", prefill_chunk: int = 0) -> dict[str, Any]:
    """Everything outside the task and the method that changes a score (recorded in the manifest too)."""
    fields: dict[str, Any] = {"model_identity": model_identity, "max_length": max_length, "chat": chat,
                              "dtype": dtype, "prompt_rules": prompt_rules, "metrics": metrics, "engine": engine}
    # Sequential decoding of an unchunked prefill computes exactly what engine-v1 computed, so those rows keep
    # engine-v1's fingerprint (and stay comparable and resumable); anything else can move the last bits.
    if decode != "sequential":
        fields["decode"] = decode
    if prefill_chunk:
        fields["prefill_chunk"] = prefill_chunk
    return fields


def protocol_fp(fields: Mapping[str, Any]) -> str:
    return digest(dict(fields))


def task_fp(task_fields: Mapping[str, Any], data_identity: str, protocol: str) -> str:
    """`task_fields` is TaskSpec.fingerprint_fields(), `data_identity` the data source's identity of the task
    file, `protocol` the protocol_fp."""
    return digest({"task": dict(task_fields), "data": data_identity, "protocol": protocol})


def config_fields(method: str, params: Mapping[str, Any], budget: str, scope: str, version: int = 1, *,
                  granularity: str = "kv_head", artifacts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`version` is the method's code version (Method.version), `granularity` the plan's storage granularity,
    `artifacts` the files the method reads (head tables) by sha256 (Method.artifacts())."""
    fields: dict[str, Any] = {"method": method, "params": dict(params), "budget": budget, "scope": scope}
    if granularity != "kv_head":  # only then, so the fingerprints of kv_head rows stay what they were
        fields["granularity"] = granularity
    if artifacts:
        fields["artifacts"] = dict(artifacts)
    if version != 1:  # version 1 adds nothing, so the fingerprints of rows written before versions existed hold
        fields["version"] = version
    return fields


def config_fp(config: Mapping[str, Any], task: str) -> str:
    """`config` from config_fields, `task` the task_fp."""
    return digest({"config": dict(config), "task_fp": task})


@dataclass(frozen=True)
class Fingerprints:
    protocol_fp: str
    task_fp: str
    config_fp: str


@dataclass(frozen=True)
class RowInputs:
    """Everything one row is made of: one (sample, plan) generation and its context."""

    task: TaskSpec
    sample: Sample
    gen: Generation
    prompt: Prompt
    model: str  # the model's name as the user gave it (alias, file stem, directory name or hub id)
    scope: str
    score: float  # the official per-sample score of gen.text
    evidence: Mapping[str, Any]  # kvbench.evidence.row_fields
    prefilled: int
    prefill_seconds: float
    peak_memory_bytes: int | None  # the device's peak allocation over the sample (CUDA only)
    device: str  # device name (CPU model or GPU name): timings compare only on equal names
    run_id: str
    fps: Fingerprints
    recipe: dict[str, Any] | None = None  # kvbench run --recipe: {name, overrides}


@dataclass(frozen=True)
class Field:
    name: str
    meaning: str
    value: Callable[[RowInputs], Any]


def _evidence(name: str, meaning: str) -> Field:
    return Field(name, meaning, lambda r: r.evidence[name])


def _classes(r: RowInputs) -> list[str] | None:
    return list(r.sample.all_classes) if r.sample.all_classes is not None else None


def _token_keep_ratio(r: RowInputs) -> float:
    """methods-2.md §1.8: kept entries / (layers x stored heads x prefilled tokens)."""
    heads = len(r.gen.kept_indices[0].lengths) if r.gen.kept_indices else 0
    slots = len(r.gen.kept_per_layer) * heads * r.prefilled
    return round(r.gen.kept_entries / slots, 6) if slots else 1.0


def _byte_ratio(r: RowInputs) -> float | None:
    return round(r.gen.cache_bytes / r.gen.full_cache_bytes, 6) if r.gen.full_cache_bytes else None


def _stages(r: RowInputs) -> list[dict[str, Any]] | None:
    return [{"stage": stage, "bytes": nbytes} for stage, nbytes in r.gen.stages] if r.gen.stages else None


FIELDS: tuple[Field, ...] = (
    Field("_id", "LongBench's sample id", lambda r: r.sample.id),
    Field("task", "task name", lambda r: r.task.name),
    Field("model", "model name as given to --model", lambda r: r.model),
    Field("method", "method or preset name as given to --method", lambda r: r.gen.plan.label),
    Field("method_base", "the registered method behind a preset", lambda r: r.gen.plan.method.name),
    Field("params", "resolved hyper-parameters", lambda r: r.gen.plan.method.params()),
    Field("ratio", "fraction of the prompt's KV kept (null with --budget)", lambda r: r.gen.plan.budget.ratio),
    Field("budget_tokens", "tokens kept with --budget (else null)", lambda r: r.gen.plan.budget.tokens),
    Field("budget", "budget label: full, r<ratio> or b<tokens>", lambda r: r.gen.plan.budget.label),
    Field("scope", "full or context", lambda r: r.scope),
    Field("granularity", "kv_head or query_head: the heads the cache is stored per", lambda r: r.gen.plan.granularity),
    Field("prediction", "the generated answer", lambda r: r.gen.text),
    Field("answers", "reference answers", lambda r: list(r.sample.answers)),
    Field("all_classes", "class list of classification tasks (else null)", _classes),
    Field("length", "LongBench's own length of the sample", lambda r: r.sample.length),
    Field("score", "official per-sample metric, 0..1", lambda r: r.score),
    Field("prompt_tokens", "tokens of the final prompt", lambda r: r.prompt.n_tokens),
    Field("prompt_tokens_untruncated", "tokens before middle truncation", lambda r: r.prompt.n_original_tokens),
    Field("prefilled_tokens", "tokens through the observed prefill", lambda r: r.prefilled),
    Field("kept_tokens", "per layer, prompt tokens held right after compression", lambda r: r.gen.kept_per_layer),
    Field("kept_tokens_mean", "mean of kept_tokens",
          lambda r: sum(r.gen.kept_per_layer) / len(r.gen.kept_per_layer)),
    Field("cache_bytes", "bytes of K and V held after compression", lambda r: r.gen.cache_bytes),
    Field("cache_bytes_allocated", "bytes of this plan's decode buffers (padding, room for the answer)",
          lambda r: r.gen.cache_bytes_allocated),
    Field("full_cache_bytes", "bytes of the uncompressed cache", lambda r: r.gen.full_cache_bytes),
    Field("token_keep_ratio", "kept entries / (layers x stored heads x prefilled tokens)", _token_keep_ratio),
    Field("byte_ratio", "cache_bytes / full_cache_bytes (null when full_cache_bytes is 0)", _byte_ratio),
    Field("storage", "physical (cache_bytes are the buffers) or simulated (the packed layout's bytes)",
          lambda r: r.gen.storage),
    Field("stages", "bytes after each transform stage, [{stage, bytes}] (null: no transform)", _stages),
    Field("max_cache_tokens", "largest cache any layer held while decoding", lambda r: r.gen.max_cache_tokens),
    _evidence("evidence_tokens", "tokens of the known evidence in the final prompt (null: none known)"),
    _evidence("evidence_retention", "per layer, fraction of (KV head, evidence token) pairs kept"),
    _evidence("evidence_retention_mean", "mean of evidence_retention over layers"),
    _evidence("evidence_retention_min", "min of evidence_retention over layers"),
    _evidence("layer_overlap", "mean Jaccard of adjacent layers' kept index sets (null: nothing evicted)"),
    Field("generated_tokens", "tokens generated", lambda r: len(r.gen.token_ids)),
    Field("generated_token_ids", "the greedy token ids generated", lambda r: list(r.gen.token_ids)),
    Field("decode", "batched or sequential decoding", lambda r: r.gen.decode),
    Field("prefill_seconds", "prefill wall time, shared by the plans of that prefill",
          lambda r: round(r.prefill_seconds, 4)),
    Field("decode_seconds", "decode wall time of this plan", lambda r: round(r.gen.decode_seconds, 4)),
    Field("peak_memory_bytes", "the device's peak allocation over the sample (CUDA only, else null)",
          lambda r: r.peak_memory_bytes),
    Field("device", "device name (CPU model or GPU name)", lambda r: r.device),
    Field("protocol_fp", "protocol fingerprint", lambda r: r.fps.protocol_fp),
    Field("task_fp", "task and data fingerprint", lambda r: r.fps.task_fp),
    Field("config_fp", "method configuration fingerprint", lambda r: r.fps.config_fp),
    Field("run_id", "the run that wrote the row (its manifest: manifests/<run_id>.json)", lambda r: r.run_id),
    Field("recipe", "kvbench run --recipe: {name, granularity, overrides} (null otherwise; in no fingerprint)", lambda r: r.recipe),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)


def build_row(inputs: RowInputs) -> dict[str, Any]:
    """One complete result row, fields in FIELDS' order."""
    return {f.name: f.value(inputs) for f in FIELDS}
