"""The bytes check of issue #14 for the head-adaptive methods and --granularity query_head: a `kvbench run` at
ratio 0.1 on real LongBench samples, then every row's `cache_bytes` against what methods-2 §1.8 predicts for
its method, within 1%.

§1.8: an eviction method's bytes are its kept (head, token) entries x 2 d s (K and V), with no padding and no
masking counted; under query_head the kept entries are per query head, so g times the kv_head entries. The
prediction of each method is its own budget rule, computed here from the prompt length and the method's
parameters, never from the row's kept indices:
- uniform per-head methods (snapkv, h2o_prefill, ...): L H k, k = round(0.1 T); pyramidkv: H sum_l k_l;
- adakv (kvpress variant): the layer budget H k of its inner method, so exactly the inner method's bytes
  (ratio x FullKV); official variant: the same up to the caps' rounding;
- headkv: H w + sum over heads of min(cap, T - w) per layer, caps from the head-score file;
- duo_attention: streaming heads x (sink + recent) + the other heads x T;
- positional and layer-shared methods under query_head keep H_kv storage: their kv_head bytes.

Usage (the head tables must exist: kvbench headscores --model M --method headkv / duo_attention):
  .venv/bin/python scripts/bytes_check.py --data-dir ../shared/longbench/minilongbench --limit 1 \
      --max-length 2000 --results /tmp/bytes-check [--methods ...] [--granularity kv_head,query_head]
Exit status 1 when a row misses its prediction by more than 1%."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from kvbench import methods as registry, models, runner
from kvbench.headtables import HeadTable
from kvbench.methods.base import Budget
from kvbench.methods.duo_attention import streaming_count
from kvbench.methods.headkv import group_mean_caps, headkv_caps
from kvbench.methods.pyramidkv import pyramid_budgets
from kvbench.results import store

HEADWISE = ["snapkv_adakv", "pyramidkv_adakv", "snapkv_adakv_official", "snapkv_adakv_kcf", "headkv", "headkv_kcf",
            "duo_attention"]
PREFILL = ["snapkv", "pyramidkv", "chunkkv", "h2o_prefill", "random", "knorm", "streamingllm_prefill"]


def predicted_entries(row: dict[str, Any], config: Any, method: Any) -> int:
    """Kept (head, token) entries of the row's method, from its budget rule (module docstring)."""
    n_layers, g = config.num_hidden_layers, config.num_attention_heads // config.num_key_value_heads
    heads = config.num_key_value_heads * (g if row["granularity"] == "query_head" else 1)
    t = row["prefilled_tokens"]
    k = Budget(ratio=row["ratio"]).kept(t) if row["ratio"] is not None else Budget(tokens=row["budget_tokens"]).kept(t)
    inner = getattr(method, "wrapped", method)
    if t <= k:
        return n_layers * heads * t
    if type(method).__name__ == "HeadKV":
        window = method.window_size
        budget = k - window if method.variant == "official" else k
        caps = headkv_caps(method.table.scores, budget, method.beta, method.tau)
        total = 0
        for layer in range(n_layers):
            row_caps = caps[layer] if heads == config.num_attention_heads else group_mean_caps(caps[layer], heads)
            total += int(row_caps.clamp(max=t - window).sum()) + heads * window
        return total
    if type(method).__name__ == "DuoAttention":
        table: HeadTable = method.table
        n = table.scores.numel()
        count = round(n * method.head_ratio) if method.allocation == "head_ratio" else \
            streaming_count(n, t, k, method.sink, method.recent)
        if t <= method.sink + method.recent:
            return n * t
        return count * (method.sink + method.recent) + (n - count) * t
    if type(inner).__name__ == "PyramidKV":
        return heads * sum(pyramid_budgets(t, k, inner.window_size, n_layers, inner.beta))
    return n_layers * heads * k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--tasks", default="multifieldqa_en")
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(HEADWISE))
    parser.add_argument("--granularity", default="kv_head,query_head")
    parser.add_argument("--ratio", default="0.1")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = models.resolve_model(args.model, args.max_length)
    config = models.preflight(spec).config
    identity = models.model_identity(spec)
    failures = 0
    for granularity in args.granularity.split(","):
        opts = runner.RunOptions(model=args.model, method=args.methods, ratios=runner.parse_ratios(args.ratio),
                                 tasks=args.tasks, data="local", data_dir=args.data_dir, limit=args.limit,
                                 results=args.results / granularity, device="cpu", max_length=args.max_length,
                                 granularity=granularity)
        runner.run(opts, log=lambda line: print(line, file=sys.stderr))
        rows = store.load_all_rows(args.results / granularity)
        print(f"\n{granularity}: {'method':24s} {'T':>5s} {'cache_bytes':>12s} {'predicted':>12s} {'error':>8s} "
              f"{'of FullKV':>9s}")
        for row in sorted(rows, key=lambda r: (r["method"], r["_id"])):
            method = registry.build(row["method"]).method
            method.bind_model(identity, spec.name)
            entry = row["full_cache_bytes"] // (config.num_hidden_layers * config.num_key_value_heads
                                               * row["prefilled_tokens"])
            want = predicted_entries(row, config, method) * entry
            error = (row["cache_bytes"] - want) / want
            failures += abs(error) > 0.01
            print(f"{'':12s}{row['method']:24s} {row['prefilled_tokens']:5d} {row['cache_bytes']:12d} {want:12d} "
                  f"{100 * error:+7.3f}% {row['cache_bytes'] / row['full_cache_bytes']:9.4f}")
    print(f"\n{failures} row(s) off by more than 1%")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
