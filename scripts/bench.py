"""kvbench performance benchmarks P1-P5 (scripts/BENCHMARKS.md holds the latest results).

    .venv/bin/python scripts/bench.py P1   # sweep cost: 6 methods x 3 ratios vs a FullKV-only run
    .venv/bin/python scripts/bench.py P2   # harness overhead: kvbench FullKV vs bare model.generate
    .venv/bin/python scripts/bench.py P3   # kvpress 0.5.5 side-by-side (needs scripts/setup_kvpress.sh)
    .venv/bin/python scripts/bench.py P4   # cache bytes and decode tokens/s vs ratio
    .venv/bin/python scripts/bench.py P5   # prefill observer overhead (window methods; H2O separately)
    .venv/bin/python scripts/bench.py P6   # batched vs sequential decoding: identical predictions, logit differences

Every number that is compared is a RATIO measured inside one run of this script: the compared variants are
interleaved sample by sample (their order alternates), repeated, and summed/medianed, so machine load hits
both sides alike. Absolute seconds are printed for context only. The model is SmolLM2-135M-Instruct (the
embedded GGUF, float32, CPU); prompts are real LongBench records from ../shared/longbench (MiniLongBench
rebuilds), built with kvbench's official prompt rules and middle-truncated to --max-length tokens, keeping
those with 2,000-4,000 tokens. The last line of each benchmark is the one that goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "longbench"
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
KVPRESS_SIDE = ROOT / "scripts" / "kvpress_side.py"

# Tasks whose prompts are used by default: one per LongBench category except summarization (512 new tokens
# would make every benchmark decode-bound and take an hour on 2 CPU cores; P1's note gives the effect).
DEFAULT_TASKS = "multifieldqa_en,hotpotqa,samsum,lcc"
P1_METHODS = "snapkv,pyramidkv,chunkkv,h2o_prefill,streamingllm_prefill,knorm"


# ---- shared pieces ---------------------------------------------------------------------------------------------
@dataclass
class Item:
    task: str
    sample_id: str
    prompt: Any  # kvbench.prompts.Prompt

    @property
    def label(self) -> str:
        return f"{self.task}#{self.sample_id[:6]}"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "kvbench")
    return commit + ("+dirty(kvbench)" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(name: str, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"== {name} | {time.strftime('%Y-%m-%d %H:%M %Z')} | commit {git_commit()} | {cpu_name()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads | "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"   command: {' '.join(shlex.quote(a) for a in sys.argv)} | ratios on {CLOCK['name']} time", flush=True)


def footer() -> None:
    load = os.getloadavg()
    print(f"   load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)


def verdict(value: float, target: float, at_most: bool = True) -> str:
    ok = value <= target if at_most else value >= target
    return "met" if ok else "MISSED"


def load_model(args: argparse.Namespace):
    from kvbench import models

    spec = models.resolve_model(args.model, args.max_length)
    return models.load_model(spec, "cpu", args.dtype)


def pick_items(loaded: Any, args: argparse.Namespace) -> list[Item]:
    """The first --per-task prompts of each task with --min-tokens..--max-tokens tokens (after truncation)."""
    from kvbench import data, prompts

    items: list[Item] = []
    specs = data.load_task_specs()
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = specs[name]
        path = next((p for p in (args.data_dir / "minilongbench" / f"{name}.jsonl", args.data_dir / f"{name}.jsonl")
                     if p.is_file()), None)
        if path is None:
            raise SystemExit(f"no data for {name} under {args.data_dir}")
        found = 0
        for sample in data.read_jsonl(path, name):
            prompt = prompts.build_prompt(task, sample, loaded.tokenizer, loaded.spec.max_length, loaded.spec.chat,
                                          loaded.stop_ids, loaded.model.config.max_position_embeddings)
            if args.min_tokens <= prompt.n_tokens <= args.max_tokens:
                items.append(Item(name, sample.id, prompt))
                found += 1
                if found == args.per_task:
                    break
    if not items:
        raise SystemExit("no prompt in the token range")
    print("   prompts: " + ", ".join(f"{i.label} ({i.prompt.n_tokens} tok, max_new {i.prompt.max_new_tokens})"
                                      for i in items), flush=True)
    return items


def make_plans(methods_csv: str, ratios: list[float]) -> list:
    from kvbench.engine import Plan
    from kvbench.methods import build
    from kvbench.methods.base import Budget

    plans = []
    for name in methods_csv.split(","):
        choice = build(name.strip())
        if choice.base == "fullkv":
            plans.append(Plan(choice.label, choice.method, Budget(ratio=1.0)))
        else:
            plans.extend(Plan(choice.label, choice.method, Budget(ratio=r)) for r in ratios)
    return plans


def fullkv_plans() -> list:
    return make_plans("fullkv", [])


def engine_for(loaded: Any, decode: str | None = None):
    """The Engine `kvbench run` builds (same repetition penalty); `decode` overrides its default mode."""
    from kvbench.engine import Engine

    gen = getattr(loaded.model, "generation_config", None)
    engine = Engine(loaded.model, loaded.tokenizer, float(getattr(gen, "repetition_penalty", None) or 1.0))
    if decode is not None:
        engine.decode = decode
    return engine


@dataclass
class Clock:
    """Seconds on both clocks: wall (perf_counter) and this process's CPU time (process_time). With one torch
    thread the CPU time is the work itself, untouched by the time other processes hold the cores; on the
    shared 2-core machine the benchmarks were written on, wall time varied by up to 2x from run to run."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: "Clock") -> "Clock":
        return Clock(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: "Clock") -> "Clock":
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __mul__(self, k: float) -> "Clock":
        return Clock(self.wall * k, self.cpu * k)

    @staticmethod
    def now() -> "Clock":
        return Clock(time.perf_counter(), time.process_time())

    def get(self, which: str | None = None) -> float:
        return self.cpu if (which or CLOCK["name"]) == "cpu" else self.wall

    def __str__(self) -> str:
        return f"{self.get():.1f}s"


CLOCK = {"name": "cpu"}  # which clock the ratios use (main() sets it: --clock)


def timed(fn: Callable[[], Any]) -> tuple[Clock, Any]:
    start = Clock.now()
    out = fn()
    return Clock.now() - start, out


class PrefillClock:
    """Times every multi-token forward of the model (the prefill; with --scope context also the question feed)
    on both clocks, through forward hooks, so a prefill is measured without the decode around it."""

    def __init__(self, model: Any):
        self.model, self.calls, self._start = model, [], None

    def __enter__(self) -> "PrefillClock":
        def pre(module: Any, args: Any, kwargs: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._start = Clock.now() if ids is not None and ids.shape[1] > 1 else None

        def post(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self._start is not None:
                self.calls.append(Clock.now() - self._start)
                self._start = None

        self._hooks = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                       self.model.register_forward_hook(post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()

    def take(self) -> Clock:
        """The first multi-token forward since the last take (the prefill)."""
        first, self.calls = self.calls[0], []
        return first


def alternating(n: int, rep: int, index: int) -> list[int]:
    """Order of n variants for one (repeat, sample): rotate so every variant runs first equally often."""
    shift = (rep + index) % n
    return list(range(shift, n)) + list(range(shift))


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- P1: sweep cost --------------------------------------------------------------------------------------------
def p1(args: argparse.Namespace) -> None:
    loaded = load_model(args)
    header("P1 sweep cost", args)
    items = pick_items(loaded, args)
    engine = engine_for(loaded, args.decode)
    sequential = engine_for(loaded, "sequential")
    sweep = make_plans(args.methods, args.ratios)
    print(f"   sweep: {len(sweep)} plans ({args.methods} x {args.ratios}), scope full, one prefill per sample, "
          f"decode {engine.decode}")
    variants = {"fullkv": fullkv_plans(), "sweep": sweep}
    if args.also_sequential:
        variants["sequential"] = sweep  # the same sweep with plans decoded one after another
    if args.compare_methods:
        variants["other"] = make_plans(args.compare_methods, args.ratios)
        print(f"   also timed: a sweep of {len(variants['other'])} plans ({args.compare_methods} x {args.ratios})")
    totals = {name: Clock() for name in variants}
    naive_total, ratios, decode_share = Clock(), [], []
    compress = [Clock()]  # time in engine.compress (selection + gathering the kept keys/values) of the sweeps
    import kvbench.engine as engine_module

    def timed_compress(*a: Any, _inner: Any = engine_module.compress, **k: Any) -> Any:
        spent, out = timed(lambda: _inner(*a, **k))
        compress[0] += spent
        return out

    engine_module.compress = timed_compress
    with PrefillClock(loaded.model) as prefill:
        for rep in range(args.repeats):
            for index, item in enumerate(items):
                runs, secs, pre = {}, {}, {}
                for v in alternating(len(variants), rep, index):
                    name = list(variants)[v]
                    runner = sequential if name == "sequential" else engine
                    secs[name], runs[name] = timed(lambda: runner.run(item.prompt, variants[name], "full",
                                                                      item.sample_id))
                    pre[name] = prefill.take()
                    totals[name] += secs[name]
                if "sequential" in runs:
                    same = [g.token_ids for g in runs["sweep"].generations] == [
                        g.token_ids for g in runs["sequential"].generations]
                    print(f"   rep {rep} {item.label}: sweep with plans decoded one at a time {secs['sequential']}, "
                          f"tokens {'identical' if same else 'DIFFER'}")
                decodes = secs["sweep"] - pre["sweep"]  # compression and the 18 decodes
                naive = pre["fullkv"] * len(sweep) + decodes  # one plain prefill per plan, the same decodes
                naive_total += naive
                ratios.append(secs["sweep"].get() / secs["fullkv"].get())
                decode_share.append(decodes.get() / secs["sweep"].get())
                tokens = sum(len(g.token_ids) for g in runs["sweep"].generations)
                print(f"   rep {rep} {item.label}: FullKV {secs['fullkv']} (prefill {pre['fullkv']}, "
                      f"{len(runs['fullkv'].generations[0].token_ids)} tok) | sweep {secs['sweep']} (prefill+observers "
                      f"{pre['sweep']}, {len(sweep)} decodes {decodes}, {tokens} tok) | sweep/FullKV "
                      f"{ratios[-1]:.2f}x (wall {secs['sweep'].wall / secs['fullkv'].wall:.2f}x), naive "
                      f"{naive.get() / secs['fullkv'].get():.1f}x", flush=True)
    total = totals["sweep"].get() / totals["fullkv"].get()
    n_sweeps = args.repeats * len(items) * (len(variants) - 1)
    print(f"   compression (select + gather, all plans) per sweep: {compress[0] * (1 / n_sweeps)}")
    print(f"   decode share of the sweep: median {100 * med(decode_share):.0f}%; per-sample ratio median "
          f"{med(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); on wall time "
          f"{totals['sweep'].wall / totals['fullkv'].wall:.2f}x")
    if "other" in totals:
        print(f"   sweep of {args.compare_methods} x {args.ratios} / FullKV: "
              f"{totals['other'].get() / totals['fullkv'].get():.2f}x (wall "
              f"{totals['other'].wall / totals['fullkv'].wall:.2f}x)")
    if "sequential" in totals:
        print(f"   sweep with plans decoded one at a time / FullKV: "
              f"{totals['sequential'].get() / totals['fullkv'].get():.2f}x; {engine.decode} decoding saves "
              f"{100 * (1 - totals['sweep'].get() / totals['sequential'].get()):.0f}% of the sweep "
              f"({100 * (1 - totals['sweep'].wall / totals['sequential'].wall):.0f}% on wall time)")
    footer()
    print(f"P1 | sweep / FullKV: {total:.2f}x (target <= 1.5x) {verdict(total, 1.5)} | decode {engine.decode} | "
          f"naive re-prefill / FullKV: "
          f"{naive_total.get() / totals['fullkv'].get():.1f}x | {CLOCK['name']} time, {len(items)} prompts x "
          f"{args.repeats} repeats, {len(sweep)} plans")


# ---- P2: harness overhead --------------------------------------------------------------------------------------
@contextmanager
def attention_impl(model: Any, name: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def bare_generate(loaded: Any, prompt: Any) -> list[int]:
    """What a user would write: model.generate, greedy, plain sdpa attention, DynamicCache, same stops."""
    ids = torch.tensor([prompt.ids])
    with attention_impl(loaded.model, "sdpa"), torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=prompt.max_new_tokens,
                                    min_new_tokens=1, do_sample=False, eos_token_id=sorted(prompt.stop_ids),
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def p2(args: argparse.Namespace) -> None:
    loaded = load_model(args)
    header("P2 harness overhead", args)
    items = pick_items(loaded, args)
    engine = engine_for(loaded)
    plans = fullkv_plans()
    totals, rest = [Clock(), Clock()], [Clock(), Clock()]
    pair_ratios, same = [], 0
    with PrefillClock(loaded.model) as prefill:
        for rep in range(args.repeats):
            for index, item in enumerate(items):
                secs: dict[int, Clock] = {}
                out: dict[int, list[int]] = {}
                for v in alternating(2, rep, index):
                    if v == 0:
                        secs[0], run = timed(lambda: engine.run(item.prompt, plans, "full", item.sample_id))
                        out[0] = run.generations[0].token_ids
                    else:
                        secs[1], out[1] = timed(lambda: bare_generate(loaded, item.prompt))
                    totals[v] += secs[v]
                    rest[v] += secs[v] - prefill.take()  # everything but the prefill forward
                same += out[0] == out[1]
                pair_ratios.append(secs[0].get() / secs[1].get())
                print(f"   rep {rep} {item.label}: kvbench {secs[0]}, generate {secs[1]}, {len(out[0])} tok, ratio "
                      f"{pair_ratios[-1]:.3f} (wall {secs[0].wall / secs[1].wall:.3f}), tokens "
                      f"{'identical' if out[0] == out[1] else 'DIFFER'}", flush=True)
    total = totals[0].get() / totals[1].get()
    print(f"   per-pair ratio median {med(pair_ratios):.3f} (min {min(pair_ratios):.3f}, max {max(pair_ratios):.3f}); "
          f"on wall time {totals[0].wall / totals[1].wall:.3f}x; identical tokens in {same}/{len(pair_ratios)} pairs")
    print(f"   outside the prefill forward (decode loop, cache set-up, text): kvbench {rest[0]}, generate "
          f"{rest[1]}, ratio {rest[0].get() / rest[1].get():.3f}")
    footer()
    print(f"P2 | kvbench FullKV / model.generate: {total:.3f}x (target <= 1.05x) {verdict(total, 1.05)} | "
          f"{CLOCK['name']} time, {len(items)} prompts x {args.repeats} repeats, tokens identical "
          f"{same}/{len(pair_ratios)}")


# ---- P3: kvpress side-by-side ----------------------------------------------------------------------------------
class KvpressWorker:
    """scripts/kvpress_side.py running in .venv-kvpress, loaded once, driven by JSON lines."""

    def __init__(self, model_dir: Path, threads: int, python: Path = KVPRESS_PYTHON):
        if not python.is_file():
            raise SystemExit(f"{python} not found: run scripts/setup_kvpress.sh first")
        self.proc = subprocess.Popen(
            [str(python), str(KVPRESS_SIDE), "--model-dir", str(model_dir), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvpress worker exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, context_ids: list[int], question_ids: list[int], presses: list[dict], max_new_tokens: int,
            kept: bool, stop_ids: list[int] | None = None) -> list[dict]:
        request = {"op": "run", "context_ids": context_ids, "question_ids": question_ids, "presses": presses,
                   "max_new_tokens": max_new_tokens, "kept": kept, "stop_ids": stop_ids}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()["results"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# kvbench method (preset) -> kvpress press with the same settings. compression_ratio = 1 - ratio at the boundary.
KVPRESS_EQUIVALENT = {
    "knorm": {"name": "knorm"},
    "streamingllm_prefill": {"name": "streamingllm", "n_sink": 4},
    "snapkv_kvpress": {"name": "snapkv", "window_size": 64, "kernel_size": 5},
    "chunkkv_kvpress": {"name": "chunkkv", "window_size": 64, "kernel_size": 5, "chunk_length": 20},
}


def kvpress_n_kept(n_tokens: int, compression_ratio: float) -> int:
    """kvpress's rule (scorer_press / utils.compute_n_kept): int(k_len * (1 - compression_ratio))."""
    return int(n_tokens * (1 - compression_ratio))


def kvbench_side(engine: Any, item: Item, methods: list[str], compression_ratios: list[float]):
    """One kvbench run (scope context: the question is fed after compression, as kvpress does) with budgets in
    kvpress's own rounding. Returns (Clock, SampleRun, plans, kept positions per plan)."""
    from kvbench.engine import Plan
    from kvbench.methods import build
    from kvbench.methods.base import Budget

    n_context = item.prompt.question_start
    plans = [Plan(m, build(m).method, Budget(tokens=kvpress_n_kept(n_context, cr)))
             for m in methods for cr in compression_ratios]
    recorders = [record_selections(plan.method) for plan in plans]
    clock, run = timed(lambda: engine.run(item.prompt, plans, "context", item.sample_id))
    kept = []
    for plan, gen, recorded in zip(plans, run.generations, recorders):
        indices = getattr(gen, "kept_indices", None) or recorded
        kept.append([[sorted(head.tolist()) for head in (layer.rows() if hasattr(layer, "rows") else layer)]
                     for layer in indices])
        del plan.method.select  # drop the recorder: back to the class's select
    return clock, run, plans, kept


def record_selections(method: Any) -> list[torch.Tensor]:
    """Record what method.select returns (the kept prompt positions per layer, [H_kv, k])."""
    recorded: list[torch.Tensor] = []
    select = method.select

    def recording(ctx: Any) -> torch.Tensor:
        keep = select(ctx)
        recorded.append(keep.detach().cpu())
        return keep

    method.select = recording
    return recorded


def key_norms(model: Any, context: list[int]) -> list[torch.Tensor]:
    """Per layer, the L2 norms of the context's keys ([H_kv, T] fp32): KnormPress's scores, negated."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([context]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [torch.linalg.vector_norm(layer.keys[0], dim=-1, dtype=torch.float32) for layer in cache.layers]


def compare_kept(ours: list[list[list[int]]], theirs: list[list[list[int]]], kept: int,
                 norms: list[torch.Tensor] | None) -> tuple[int, int, int, int]:
    """(identical (layer, head) sets, all sets, sets differing only by exact score ties at the budget boundary
    (checked for knorm, whose scores are the key norms), positions in the other differences)."""
    same = total = ties = diff = 0
    for layer, (layer_ours, layer_theirs) in enumerate(zip(ours, theirs, strict=True)):
        for head, (a, b) in enumerate(zip(layer_ours, layer_theirs, strict=True)):
            total += 1
            if a == b:
                same += 1
                continue
            differing = set(a) ^ set(b)
            if norms is not None:
                scores = norms[layer][head]
                boundary = scores.sort().values[kept - 1].item()
                if all(scores[p].item() == boundary for p in differing):
                    ties += 1
                    continue
            diff += len(differing)
    return same, total, ties, diff


def p3(args: argparse.Namespace) -> None:
    from kvbench import models

    loaded = load_model(args)
    header("P3 kvpress 0.5.5 side-by-side", args)
    items = pick_items(loaded, args)
    engine = engine_for(loaded, args.decode)
    model_dir = models.weights_location(loaded.spec)[0]
    worker = KvpressWorker(Path(model_dir), torch.get_num_threads())
    print(f"   kvpress worker: {worker.info}")
    try:
        # (a) kept indices, kvpress's settings (context only, n_kept = int(T (1 - cr))), per layer and KV head
        parity_methods = ["knorm", "streamingllm_prefill", "snapkv_kvpress"]
        crs = [1 - r for r in args.parity_ratios]
        parity: dict[str, bool] = {}
        tie_sets: dict[str, int] = {}
        for item in items[: args.parity_prompts]:
            context, question = list(item.prompt.ids[: item.prompt.question_start]), list(
                item.prompt.ids[item.prompt.question_start:])
            short = replace(item, prompt=replace(item.prompt, max_new_tokens=1))
            _, _, plans, ours = kvbench_side(engine, short, parity_methods, crs)
            theirs = worker.run(context, question, [{**KVPRESS_EQUIVALENT[m], "compression_ratio": cr}
                                                    for m in parity_methods for cr in crs], 1, kept=True)
            norms = key_norms(loaded.model, context)
            for plan, mine, result in zip(plans, ours, theirs):
                same, total, ties, diff = compare_kept(mine, result["kept"], plan.budget.tokens,
                                                       norms if plan.label == "knorm" else None)
                parity[plan.label] = parity.get(plan.label, True) and same + ties == total
                tie_sets[plan.label] = tie_sets.get(plan.label, 0) + ties
                print(f"   (a) {item.label} ctx {len(context)} tok: {plan.label} cr={result['press']['compression_ratio']:g}"
                      f" kept {plan.budget.tokens}: identical sets {same}/{total} (layer, KV head)"
                      + (f", {ties} differ only by an exact tie at the boundary" if ties else "")
                      + (f", {diff} positions differ otherwise" if diff else ""), flush=True)
        summary_a = "; ".join(
            f"{m}: " + ("DIFFERENT" if not ok else "identical" if not tie_sets[m] else
                        f"identical up to exact score ties ({tie_sets[m]} (layer, head) sets: kvbench gives a tie to "
                        f"the earlier token, torch.topk to either)") for m, ok in parity.items())
        print(f"   (a) {summary_a}")
        if args.parity_only:
            footer()
            print(f"P3 | (a) kept indices vs kvpress: {summary_a}")
            return
        # (b) wall time of a 4-method x 2-ratio sweep, interleaved kvbench / kvpress
        sweep_methods = list(KVPRESS_EQUIVALENT)
        crs = [1 - r for r in args.sweep_ratios]
        totals, pair = [Clock(), Clock()], []
        for rep in range(args.repeats):
            for index, item in enumerate(items):
                context, question = list(item.prompt.ids[: item.prompt.question_start]), list(
                    item.prompt.ids[item.prompt.question_start:])
                secs: dict[int, Clock] = {}
                for v in alternating(2, rep, index):
                    if v == 0:
                        secs[0], run, _, _ = kvbench_side(engine, item, sweep_methods, crs)
                        ours_tok = sum(len(g.token_ids) for g in run.generations)
                    else:
                        results = worker.run(context, question, [{**KVPRESS_EQUIVALENT[m], "compression_ratio": cr}
                                                                 for m in sweep_methods for cr in crs],
                                             item.prompt.max_new_tokens, kept=False,
                                             stop_ids=sorted(item.prompt.stop_ids))  # the same stopping rule
                        secs[1] = Clock(sum(r["seconds"] for r in results), sum(r["cpu_seconds"] for r in results))
                        theirs_tok = sum(r["generated_tokens"] for r in results)
                    totals[v] += secs[v]
                pair.append(secs[0].get() / secs[1].get())
                print(f"   (b) rep {rep} {item.label}: kvbench {secs[0]} ({ours_tok} tok), kvpress {secs[1]} "
                      f"({theirs_tok} tok), ratio {pair[-1]:.2f} (wall {secs[0].wall / secs[1].wall:.2f})", flush=True)
    finally:
        worker.close()
    total = totals[0].get() / totals[1].get()
    print(f"   per-pair ratio median {med(pair):.2f}; on wall time {totals[0].wall / totals[1].wall:.2f}x")
    footer()
    print(f"P3 | (a) kept indices vs kvpress: {summary_a} | "
          f"(b) sweep kvbench / kvpress: {total:.2f}x (target <= 0.5x) {verdict(total, 0.5)} | {CLOCK['name']} "
          f"time, {len(sweep_methods)} methods x {len(crs)} ratios, {len(items)} prompts x {args.repeats} repeats")


# ---- P4: cache bytes and decode speed vs ratio -----------------------------------------------------------------
def p4(args: argparse.Namespace) -> None:
    import kvbench.engine as engine_module

    loaded = load_model(args)
    header("P4 memory and decode speed vs ratio", args)
    items = pick_items(loaded, args)
    engine = engine_for(loaded, "sequential")  # one plan at a time: each plan's tokens/s is its own
    ratios = sorted(args.ratios)
    plans = make_plans(args.method, [r for r in ratios if r < 1]) + fullkv_plans()
    labels = [p.budget.label for p in plans]
    # Time every decode forward (q_len 1) of the plan being decoded (sequential: one decode_group per plan).
    current: dict[str, Any] = {"label": None}
    stamps: dict[str, list[Clock]] = {}
    original_group = engine_module.decode_group

    def decode_group(model: Any, runs: list, *a: Any, **k: Any) -> Any:
        current["label"] = runs[0].plan.budget.label
        stamps[current["label"]] = []
        return original_group(model, runs, *a, **k)

    def pre_hook(module: Any, inputs: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", inputs[0] if inputs else None)
        if ids is not None and ids.shape[1] == 1 and current["label"] is not None:
            stamps[current["label"]].append(Clock.now())

    engine_module.decode_group = decode_group
    hook = loaded.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    speed: dict[str, list[float]] = {label: [] for label in labels}
    bytes_ratio: dict[str, list[float]] = {label: [] for label in labels}
    alloc_ratio: dict[str, list[float]] = {label: [] for label in labels}
    try:
        for rep in range(args.repeats):
            for index, item in enumerate(items):
                # no stop ids: every plan decodes exactly --new-tokens tokens
                prompt = replace(item.prompt, max_new_tokens=args.new_tokens, stop_ids=frozenset())
                order = [plans[i] for i in alternating(len(plans), rep, index)]
                run = engine.run(prompt, order, "full", item.sample_id)
                for gen in run.generations:
                    label = gen.plan.budget.label
                    ts = stamps[label]
                    speed[label].append((len(ts) - 1) / (ts[-1] - ts[0]).get())  # forward start to start
                    bytes_ratio[label].append(gen.cache_bytes / gen.full_cache_bytes)
                    alloc_ratio[label].append(gen.cache_bytes_allocated / gen.full_cache_bytes)
                print(f"   rep {rep} {item.label}: " + ", ".join(
                    f"{label} {speed[label][-1]:.1f} tok/s" for label in labels), flush=True)
    finally:
        hook.remove()
        engine_module.decode_group = original_group
    full_speed = med(speed["full"])
    worst = 0.0
    print(f"   {'ratio':>6} | {'bytes/full':>10} | {'off by':>7} | {'allocated/full (with room for the answer)':>14} | "
          f"{'tok/s':>6} | vs FullKV")
    for plan in plans:
        label = plan.budget.label
        r = plan.budget.ratio
        b = med(bytes_ratio[label])
        off = abs(b - r) / r
        worst = max(worst, off)
        print(f"   {r:>6g} | {b:>10.4f} | {100 * off:>6.2f}% | {med(alloc_ratio[label]):>14.4f} | "
              f"{med(speed[label]):>6.1f} | {med(speed[label]) / full_speed:.2f}x")
    at01 = next((med(speed[p.budget.label]) / full_speed for p in plans if p.budget.ratio == 0.1), float("nan"))
    footer()
    print(f"P4 | cache bytes vs ratio: worst {100 * worst:.2f}% off (target <= 1%) {verdict(worst, 0.01)} | "
          f"decode tok/s at 0.1 / FullKV: {at01:.2f}x (target >= 1.3x) {verdict(at01, 1.3, at_most=False)} | "
          f"{CLOCK['name']} time, {args.method}, {len(items)} prompts x {args.repeats} repeats, {args.new_tokens} new "
          f"tokens, FullKV {full_speed:.1f} tok/s")


# ---- P5: observer overhead -------------------------------------------------------------------------------------
def p5(args: argparse.Namespace) -> None:
    loaded = load_model(args)
    header("P5 prefill observer overhead", args)
    items = pick_items(loaded, args)
    engine = engine_for(loaded)
    variants = {"none": fullkv_plans(), "window": make_plans(args.window_methods, [0.1]),
                "h2o": make_plans(args.h2o_methods, [0.1])}
    print(f"   window observers: {args.window_methods}; column sums: {args.h2o_methods}")
    prefill: dict[str, list[Clock]] = {v: [] for v in variants}
    with PrefillClock(loaded.model) as clock:
        for rep in range(args.repeats):
            for index, item in enumerate(items):
                prompt = replace(item.prompt, max_new_tokens=1)  # prefill only (the first token comes from it)
                for v in alternating(len(variants), rep, index):
                    name = list(variants)[v]
                    engine.run(prompt, variants[name], "full", item.sample_id)
                    prefill[name].append(clock.take())
                print(f"   rep {rep} {item.label}: " + ", ".join(f"{v} {prefill[v][-1]}" for v in variants), flush=True)

    def overhead(name: str, which: str | None = None) -> float:
        return sum(c.get(which) for c in prefill[name]) / sum(c.get(which) for c in prefill["none"]) - 1

    window, h2o = overhead("window"), overhead("h2o")
    pairs = [w.get() / n.get() - 1 for w, n in zip(prefill["window"], prefill["none"])]
    print(f"   window overhead per prompt: median {100 * med(pairs):+.1f}% (min {100 * min(pairs):+.1f}%, "
          f"max {100 * max(pairs):+.1f}%); on wall time {100 * overhead('window', 'wall'):+.1f}%, H2O "
          f"{100 * overhead('h2o', 'wall'):+.1f}%")
    footer()
    print(f"P5 | prefill with window observers / without: {1 + window:.3f}x, overhead {100 * window:+.1f}% "
          f"(target <= 5%) {verdict(window, 0.05)} | H2O column sums: {100 * h2o:+.1f}% (target <= 20%) "
          f"{verdict(h2o, 0.20)} | "
          f"{CLOCK['name']} time, {len(items)} prompts x {args.repeats} repeats")


# ---- P6: what batching does to the numbers ---------------------------------------------------------------------
def every_method_plans(ratios: list[float], model: str, max_length: int) -> list:
    from kvbench import methods, models

    names = list(methods.METHODS.names()) + [p for p in methods.presets() if p not in methods.METHODS]
    plans = make_plans(",".join(names), ratios)
    spec = models.resolve_model(model, max_length)
    for plan in plans:  # HeadKV's and DuoAttention's head tables of this model, as `kvbench run` binds them
        plan.method.bind_model(models.model_identity(spec), spec.name)
    return plans


def p6(args: argparse.Namespace) -> None:
    """Every registered method and preset x the ratios, on every prompt, decoded one plan at a time and batched:
    the fraction of identical predictions and the largest difference between the logits of the first decode
    forward (the second generated token; the first comes from the shared prefill)."""
    loaded = load_model(args)
    header("P6 batched vs sequential decoding", args)
    items = pick_items(loaded, args)
    plans = every_method_plans(args.ratios, args.model, args.max_length)
    print(f"   {len(plans)} plans per prompt (every method and preset x {args.ratios}, plus FullKV)", flush=True)
    engines = {mode: engine_for(loaded, mode) for mode in ("sequential", "batched")}
    first_forward: dict[tuple[str, str], torch.Tensor] = {}

    def recorder(mode: str) -> Callable[..., None]:
        def record(plan: Any, step: int, logits: torch.Tensor) -> None:
            if step == 1:  # the logits of the first decode forward
                first_forward[(mode, f"{plan.label}@{plan.budget.label}")] = logits.detach().float().cpu()
        return record

    for mode, engine in engines.items():
        engine.on_logits = recorder(mode)
    same = total = 0
    worst = 0.0
    differing: list[str] = []
    dumped: list[dict] = []
    seconds = {mode: Clock() for mode in engines}
    for item in items:
        gens = {}
        for mode, engine in engines.items():
            secs, run = timed(lambda: engine.run(item.prompt, plans, "full", item.sample_id))
            seconds[mode] += secs
            gens[mode] = run.generations
        for a, b in zip(gens["sequential"], gens["batched"]):
            key = f"{a.plan.label}@{a.plan.budget.label}"
            total += 1
            if a.token_ids == b.token_ids:
                same += 1
            else:
                differing.append(f"{item.label} {key}")
            dumped.append({"prompt": item.label, "plan": key, "sequential": list(a.token_ids),
                           "batched": list(b.token_ids)})
            x, y = first_forward.get(("sequential", key)), first_forward.get(("batched", key))
            if x is not None and y is not None:
                worst = max(worst, float((x - y).abs().max()))
        print(f"   {item.label}: {sum(a.token_ids == b.token_ids for a, b in zip(gens['sequential'], gens['batched']))}"
              f" of {len(plans)} predictions identical; sequential {seconds['sequential']}, batched "
              f"{seconds['batched']} (cumulative)", flush=True)
    for line in differing:
        print(f"   differs: {line}")
    if args.dump:
        args.dump.write_text("".join(json.dumps(row) + "\n" for row in dumped))
        print(f"   wrote every prediction's token ids to {args.dump}")
    footer()
    print(f"P6 | identical predictions batched vs sequential: {same}/{total} ({100 * same / total:.1f}%) | largest "
          f"first-decode-step logit difference {worst:.2e} | batched / sequential time "
          f"{seconds['batched'].get() / seconds['sequential'].get():.2f}x | {CLOCK['name']} time, {len(items)} prompts")


# ---- command line ----------------------------------------------------------------------------------------------
def ratio_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["P1", "P2", "P3", "P4", "P5", "P6"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=3500, help="middle truncation (official rule)")
    parser.add_argument("--min-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=P1_METHODS, help="P1 sweep methods")
    parser.add_argument("--compare-methods", default=None, help="P1: also time a sweep of these methods")
    parser.add_argument("--ratios", type=ratio_list, default=None, help="P1: 0.1,0.2,0.3; P4: 0.05 ... 1.0")
    parser.add_argument("--method", default="snapkv", help="P4 method")
    parser.add_argument("--new-tokens", type=int, default=64, help="P4 decode length")
    parser.add_argument("--window-methods", default="snapkv,pyramidkv,chunkkv,snapkv_kvpress,tova", help="P5")
    parser.add_argument("--h2o-methods", default="h2o_prefill", help="P5")
    parser.add_argument("--parity-ratios", type=ratio_list, default=[0.1, 0.25, 0.5], help="P3 (a), kept fractions")
    parser.add_argument("--parity-prompts", type=int, default=2, help="P3 (a)")
    parser.add_argument("--sweep-ratios", type=ratio_list, default=[0.25, 0.5], help="P3 (b), kept fractions")
    parser.add_argument("--parity-only", action="store_true", help="P3: part (a) only")
    parser.add_argument("--decode", choices=["batched", "sequential"], default=None,
                        help="P1/P3: the engine's decode mode (default: the engine's)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="what the ratios use: this process's CPU time or wall time (auto: CPU time with one "
                             "torch thread, where it is the work itself and immune to other processes' load)")
    parser.add_argument("--dump", type=Path, default=None, help="P6: write every prediction's token ids (jsonl)")
    parser.add_argument("--also-sequential", action="store_true",
                        help="P1: also time the sweep with plans decoded one after another (--decode sequential)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["name"] = args.clock if args.clock != "auto" else ("cpu" if torch.get_num_threads() == 1 else "wall")
    if args.ratios is None:
        args.ratios = {"P1": [0.1, 0.2, 0.3], "P6": [0.1, 0.3]}.get(args.bench, [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    {"P1": p1, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6}[args.bench](args)


if __name__ == "__main__":
    main()
