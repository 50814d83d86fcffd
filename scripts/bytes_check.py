"""The bytes check of issue #14: a `kvbench run` at ratio 0.1 on real LongBench samples with every method issue
#14 added (and the head-adaptive presets), then every row's `cache_bytes` against what methods-2 §1.8
predicts for its method, within 1%.

§1.8: an eviction method's bytes are its kept (head, token) entries x (d + d_v) s (K and V), with no padding
and no masking counted; under query_head the kept entries are per query head (rows whose storage granularity
is query_head: g times the kv_head entries). The prediction of each method is its own budget rule, computed
here from the prompt length and the method's parameters, never from the row's kept indices:
- uniform per-head methods (snapkv, h2o_prefill, keydiff, block_keydiff, expected_attention, lagkv,
  observed_attention, criticalkv, ...): L H k, k = round(0.1 T); pyramidkv: H sum_l k_l;
- adakv (kvpress variant) and critical_adakv: the layer budget H k of the inner method, so exactly the inner
  method's bytes; official variant: the same up to the caps' rounding;
- headkv: H w + sum over heads of min(cap, T - w) per layer, caps from the head-score file;
- duo_attention: streaming heads x (sink + recent) + the other heads x T;
- decoding: the prefill is not compressed (compression happens every `interval` decode steps), so the row's
  post-prefill cache is the whole prompt, L H T (with prefill=true: its inner method's rule);
- think (§2.17 storage) over k entries per head, p = floor(lambda d) pruned channels, r = min(recent, k):
  (k - r)(d - p) s + r d s keys + k d_v s values + a d-bit channel mask;
- kivi2 / kivi4 (§2.18) over n entries per head (n = T alone, k composed: snapkv+kivi4), group G, residual R,
  b bits: N_k = n - (n mod R) (0 if n < R) keys and N_v = max(0, n - R) values quantized:
  keys N_k d b/8 + (N_k / G) d 2s + (n - N_k) d s, values N_v d_v b/8 + N_v ceil(d_v / G) 2s + (n - N_v) d_v s.

Usage (the head tables must exist: kvbench headscores --model M --method headkv / duo_attention):
  .venv/bin/python scripts/bytes_check.py --data-dir ../shared/longbench --limit 1 \
      --max-length 2000 --results /tmp/bytes-check [--methods ...] [--granularity kv_head,query_head]
Exit status 1 when a row misses its prediction by more than 1%."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from kvbench import api, methods as registry, models
from kvbench.headtables import HeadTable
from kvbench.methods.base import Budget
from kvbench.methods.duo_attention import streaming_count
from kvbench.methods.headkv import group_mean_caps, headkv_caps
from kvbench.methods.pyramidkv import pyramid_budgets
from kvbench.results import store

HEADWISE = ["snapkv_adakv", "pyramidkv_adakv", "snapkv_adakv_official", "snapkv_adakv_kcf", "expected_attention_adakv",
            "critical_adakv", "headkv", "headkv_kcf", "duo_attention"]
NEW = ["criticalkv", "expected_attention", "keydiff", "block_keydiff", "lagkv", "observed_attention", "think",
       "kivi2", "kivi4", "snapkv+kivi4", "snapkv+kivi2", "decoding"]
PREFILL = ["snapkv", "pyramidkv", "chunkkv", "h2o_prefill", "random", "knorm", "streamingllm_prefill"]


def unwrap(method: Any) -> tuple[Any, list[Any]]:
    """(the eviction method at the core, the transform wrappers around it from the inside out)."""
    transforms = []
    while type(method).__name__ in ("ThinK", "KIVI2", "KIVI4", "KIVI"):
        transforms.insert(0, method)
        method = method.inner_method
    return method, transforms


def predicted_lengths(t: int, k: int, n_layers: int, heads: int, query_heads: int, method: Any) -> list[int]:
    """Kept entries of every (layer, head) of the method's eviction rule (module docstring), flat."""
    name = type(method).__name__
    if name == "FullKV" or t <= k:
        return [t] * (n_layers * heads)
    if name == "Decoding":
        return predicted_lengths(t, k, n_layers, heads, query_heads, method.inner_method) if method.prefill \
            else [t] * (n_layers * heads)
    if name == "HeadKV":
        window = method.window_size
        budget = k - window if method.variant == "official" else k
        caps = headkv_caps(method.table.scores, budget, method.beta, method.tau)
        out = []
        for layer in range(n_layers):
            row_caps = caps[layer] if heads == query_heads else group_mean_caps(caps[layer], heads)
            out += [min(int(c), t - window) + window for c in row_caps.tolist()]
        return out
    if name == "DuoAttention":
        table: HeadTable = method.table
        n = table.scores.numel()
        if t <= method.sink + method.recent:
            return [t] * n
        count = round(n * method.head_ratio) if method.allocation == "head_ratio" else \
            streaming_count(n, t, k, method.sink, method.recent)
        return [method.sink + method.recent] * count + [t] * (n - count)
    inner = method.inner_method if name == "AdaKV" else method  # Ada-KV: the inner method's layer budgets
    if type(inner).__name__ == "PyramidKV":
        return [b for b in pyramid_budgets(t, k, inner.window_size, n_layers, inner.beta) for _ in range(heads)]
    return [k] * (n_layers * heads)


def think_bytes(n: int, d: int, dv: int, s: int, method: Any) -> float:
    p = math.floor(method.pruning_ratio * d)
    if p == 0:
        return n * (d + dv) * s
    r = min(method.recent, n)
    return (n - r) * (d - p) * s + r * d * s + n * dv * s + d / 8


def kivi_bytes(n: int, d: int, dv: int, s: int, method: Any) -> float:
    b, g, r = method.bits, method.group_size, method.residual
    n_k = n - n % r if n >= r else 0
    n_v = max(0, n - r)
    keys = n_k * d * b / 8 + (n_k / g) * d * 2 * s + (n - n_k) * d * s
    values = n_v * dv * b / 8 + n_v * math.ceil(dv / g) * 2 * s + (n - n_v) * dv * s
    return keys + values


def predicted_bytes(row: dict[str, Any], config: Any, method: Any) -> float:
    n_layers, h_kv = config.num_hidden_layers, config.num_key_value_heads
    query_heads = config.num_attention_heads
    heads = query_heads if row["granularity"] == "query_head" else h_kv
    t = row["prefilled_tokens"]
    k = Budget(ratio=row["ratio"]).kept(t) if row["ratio"] is not None else Budget(tokens=row["budget_tokens"]).kept(t)
    d = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    s = row["full_cache_bytes"] // (n_layers * h_kv * t * 2 * d)  # element size (K and V of head dim d)
    core, transforms = unwrap(method)
    if not core.uses_budget:  # kivi alone: the whole prompt
        k = t
    lengths = predicted_lengths(t, k, n_layers, heads, query_heads, core)
    if not transforms:
        return sum(lengths) * 2 * d * s
    if len(transforms) > 1:
        raise SystemExit(f"{row['method']}: no prediction for two transforms in a row")
    formula = think_bytes if type(transforms[0]).__name__ == "ThinK" else kivi_bytes
    return sum(formula(n, d, d, s, transforms[0]) for n in lengths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--tasks", default="multifieldqa_en")
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(HEADWISE + NEW))
    parser.add_argument("--granularity", default="kv_head,query_head")
    parser.add_argument("--ratio", default="0.1")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = models.resolve_model(args.model, args.max_length)
    config = models.preflight(spec).config
    identity = models.model_identity(spec)
    failures = 0
    for granularity in args.granularity.split(","):
        api.run(args.model, args.methods.split(","), ratios=[float(r) for r in args.ratio.split(",")],
                tasks=args.tasks.split(","), data="local", data_dir=args.data_dir, limit=args.limit,
                results=args.results / granularity, device="cpu", max_length=args.max_length,
                granularity=granularity, log=lambda line: print(line, file=sys.stderr))
        rows = store.load_all_rows(args.results / granularity)
        print(f"\n{granularity}: {'method':24s} {'T':>5s} {'cache_bytes':>12s} {'predicted':>12s} {'error':>8s} "
              f"{'of FullKV':>9s}")
        for row in sorted(rows, key=lambda r: (r["method"], r["_id"])):
            method = registry.build(row["method"]).method
            method.bind_model(identity, spec.name)
            want = predicted_bytes(row, config, method)
            error = (row["cache_bytes"] - want) / want
            failures += abs(error) > 0.01
            print(f"{'':12s}{row['method']:24s} {row['prefilled_tokens']:5d} {row['cache_bytes']:12d} {want:12.0f} "
                  f"{100 * error:+7.3f}% {row['cache_bytes'] / row['full_cache_bytes']:9.4f}")
    print(f"\n{failures} row(s) off by more than 1%")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
