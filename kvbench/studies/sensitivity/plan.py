"""Planning a study, with no model needed: the documents (LongBench contexts, tokenised), the window grid,
the range of query positions t, the fit range, the query positions of every document, and every choice the
protocol leaves open (recorded in the manifest). `plan_study` is pure: the same options and documents give the
same plan, which is what lets an interrupted study resume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.errors import InputError
from kvbench.studies.sensitivity.options import (
    FULL, QUICK, QUICK_GRID, SPEC_FIT_RANGE, SPEC_GRID, SensitivityOptions, check_policies,
)
from kvbench.studies.sensitivity.policies import PRIMARY_POS_MODE
from kvbench.studies.sensitivity.verdicts import DELTA_ALPHA_TOL, ERR_RATIO_CLAIM, RANDOM_RATIO_CLAIM, WINDOW_FACTOR


@dataclass
class StudyPlan:
    """Everything a study measures, resolved from the options and the documents."""

    windows: tuple[int, ...]
    t_min: int
    t_max: int
    fit_range: tuple[int, int]
    docs: list["Document"]
    positions: dict[str, list[int]]  # doc_id -> query positions t
    seeds: int
    other_max_budget: int | None
    sliding_pos_modes: tuple[str, ...] | None
    n_docs_requested: int
    n_positions: int
    policies: tuple[str, ...]
    context_limit: int
    notes: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The plan as the manifest records it."""
        return {"windows": list(self.windows), "t_min": self.t_min, "t_max": self.t_max,
                "fit_range": list(self.fit_range), "seeds": self.seeds, "other_max_budget": self.other_max_budget,
                "sliding_pos_modes": self.sliding_pos_modes, "positions_per_doc": self.n_positions,
                "policies": list(self.policies), "context_limit": self.context_limit,
                "documents": [{"doc_id": d.doc_id, "task": d.task, "n_tokens_read": len(d.ids),
                               "t": self.positions[d.doc_id]} for d in self.docs]}


@dataclass
class Document:
    doc_id: str
    task: str
    ids: list[int]


def choose_t_range(w_max: int, limit: int) -> tuple[int, int, str | None]:
    """[4 w_max, 5 w_max] [ours: t_max = t_min + w_max], clipped to `limit` (the model's positions or the tokens
    read per document). Returns (t_min, t_max, note when t_min < 4 w_max)."""
    t_min, t_max = 4 * w_max, 5 * w_max
    if t_max <= limit:
        return t_min, t_max, None
    if limit < w_max:
        raise InputError(f"the largest window ({w_max}) exceeds the longest usable context ({limit} tokens)")
    t_max = limit
    t_min = min(t_min, max(w_max, limit - w_max))
    note = None
    if t_min < 4 * w_max:
        note = (f"t_min = {t_min} < 4 * w_max = {4 * w_max} (context limit {limit}): the largest windows reach "
                "towards the document start, so D(w) may drop there from finite size")
    return t_min, t_max, note


def _tokenize(tokenizer: Any, text: str, bos: bool) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if bos:
        if tokenizer.bos_token_id is None:
            raise InputError("bos_prepend: the tokenizer has no BOS token")
        ids = [int(tokenizer.bos_token_id)] + ids
    return ids


def load_documents(opts: SensitivityOptions, tokenizer: Any, max_tokens: int | None) -> list[Document]:
    """Every document of the selected tasks, in file order, tokenised (cut to max_tokens)."""
    from kvbench.data import LocalDir, select_tasks

    if opts.data_dir is None:
        raise InputError("kvbench sensitivity needs --data-dir DIR (official LongBench <task>.jsonl files)")
    source = LocalDir(Path(opts.data_dir))
    docs = []
    for task in select_tasks(opts.tasks):
        if task.synthetic:
            raise InputError(f"task '{task.name}' is synthetic; the sensitivity study needs natural documents")
        for sample in source.samples(task):
            ids = _tokenize(tokenizer, sample.context, opts.bos_prepend)
            docs.append(Document(f"{task.name}/{sample.id}", task.name, ids[:max_tokens] if max_tokens else ids))
    return docs


def _interleave(docs: Sequence[Document]) -> list[Document]:
    """Round-robin over tasks, each task in file order."""
    by_task: dict[str, list[Document]] = {}
    for d in docs:
        by_task.setdefault(d.task, []).append(d)
    out, queues = [], [list(v) for v in by_task.values()]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def default_fit_range(windows: Sequence[int]) -> tuple[int, int]:
    """[ours] The spec's [8, 256], with hi lowered to the largest grid window <= w_max / 4 so the holdout spans
    two octaves (quick grid 1..512 -> [8, 128]); lo drops to the smallest window if [8, hi] holds < 3."""
    ws = sorted(windows)
    cap = min(SPEC_FIT_RANGE[1], ws[-1] // 4)
    below = [w for w in ws if w <= cap]
    if not below:
        return ws[0], ws[-1]
    hi = below[-1]
    lo = SPEC_FIT_RANGE[0]
    if sum(lo <= w <= hi for w in ws) < 3:
        lo = ws[0]
    return lo, hi


def plan_study(opts: SensitivityOptions, documents: Sequence[Document], model_limit: int) -> StudyPlan:
    """Resolve defaults (quick or full), the grid, the t range and the documents. Pure: no model needed."""
    mode = QUICK if opts.quick else FULL
    n_docs = opts.docs if opts.docs is not None else mode["docs"]
    n_pos = opts.positions if opts.positions is not None else mode["positions"]
    seeds = opts.seeds if opts.seeds is not None else mode["seeds"]
    for name, value in (("--docs", n_docs), ("--positions", n_pos), ("--seeds", seeds)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if opts.sink < 0:
        raise InputError(f"--sink must be >= 0, got {opts.sink}")
    limit = model_limit if opts.max_doc_tokens is None else min(model_limit, opts.max_doc_tokens - 1)
    notes: list[str] = []
    choices: dict[str, str] = {}
    lengths = sorted((len(d.ids) for d in documents), reverse=True)
    if opts.windows:
        windows = tuple(sorted(set(int(w) for w in opts.windows)))
        choices["windows"] = "given"
    elif opts.quick:
        windows = QUICK_GRID
        choices["windows"] = "[ours] quick grid: powers of two 1..512"
    else:
        # [ours] the largest spec-grid w_max such that at least max(2, docs/2) documents hold t_max + 1 tokens
        need = max(2, n_docs // 2)
        usable = [w for w in SPEC_GRID if 5 * w <= limit and sum(n >= 5 * w + 1 for n in lengths) >= need]
        if not usable:
            raise InputError(f"no window grid fits: fewer than {need} documents are long enough (longest "
                             f"{lengths[0] if lengths else 0} tokens); pass --windows")
        windows = tuple(w for w in SPEC_GRID if w <= usable[-1])
        choices["windows"] = (f"[ours] spec grid up to the largest w_max with >= {need} documents of "
                              f">= 5 w_max + 1 tokens and 5 w_max <= {limit}")
    w_max = windows[-1]
    if opts.t_range:
        t_min, t_max = int(opts.t_range[0]), int(opts.t_range[1])
        if not w_max <= t_min <= t_max <= limit:
            raise InputError(f"t range [{t_min}, {t_max}] must satisfy w_max={w_max} <= t_min <= t_max <= {limit}")
        note = None if t_min >= 4 * w_max else f"t_min = {t_min} < 4 * w_max = {4 * w_max}: finite-size effects possible"
    else:
        t_min, t_max, note = choose_t_range(w_max, limit)
    if note:
        notes.append(note)
    if opts.fit_range:
        fit_range = tuple(int(v) for v in opts.fit_range)
        choices["fit_range"] = "given"
    else:
        fit_range = default_fit_range(windows)
        choices["fit_range"] = ("[ours] spec [8, 256] capped so that at least two octaves of windows remain as "
                                "holdout: hi = largest grid w <= min(256, w_max / 4); lo = 8, or the smallest grid "
                                "w when fewer than 3 windows would be in range")
    if not fit_range[0] < fit_range[1]:
        raise InputError(f"fit range {fit_range} is empty")
    in_fit = [w for w in windows if fit_range[0] <= w <= fit_range[1]]
    if len(in_fit) < 3:
        raise InputError(f"fit range {list(fit_range)} holds {len(in_fit)} grid windows; need at least 3")
    if not any(w > fit_range[1] for w in windows):
        notes.append(f"no window above the fit range {list(fit_range)}: no extrapolation test")
    if opts.other_max_budget is not None:
        other_max = int(opts.other_max_budget)
        choices["other_max_budget"] = f"given: sink_recent and random measured for B <= {other_max}"
    elif opts.quick:
        other_max = int(fit_range[1])
        choices["other_max_budget"] = (f"[ours] --quick measures sink_recent and random only for "
                                       f"B <= {other_max} (the fit range's hi: every statistic of theirs uses only "
                                       "fit-range budgets); the sliding window covers the whole grid")
    else:
        other_max = None
    if opts.sliding_pos_modes is not None:
        sliding_modes = tuple(opts.sliding_pos_modes)
    elif opts.quick:
        sliding_modes = (PRIMARY_POS_MODE,)
        choices["sliding_pos_modes"] = ("[ours] --quick runs the sliding window in contiguous positions only: with RoPE a "
                                        "contiguous window is shift-invariant, so original positions give the same KL "
                                        "(tests/test_sensitivity.py checks it); the ablation is run on sink_recent and "
                                        "random, whose kept sets have gaps")
    else:
        sliding_modes = None
    eligible = [d for d in _interleave(documents) if len(d.ids) >= t_max + 1]
    if not eligible:
        raise InputError(f"no document has t_max + 1 = {t_max + 1} tokens (longest: {lengths[0] if lengths else 0}); "
                         "pass smaller --windows")
    chosen = eligible[:n_docs]
    if len(chosen) < n_docs:
        notes.append(f"only {len(chosen)} of the {n_docs} requested documents have >= {t_max + 1} tokens")
    if len(chosen) < 2:
        notes.append("one document: no bootstrap confidence intervals")
    plan_positions = {}
    for i, d in enumerate(chosen):
        rng = np.random.default_rng([opts.seed, i, 1])
        pool = np.arange(t_min, t_max + 1)
        plan_positions[d.doc_id] = sorted(int(t) for t in rng.choice(pool, size=min(n_pos, len(pool)), replace=False))
    policies = check_policies(opts.policies)
    choices.update({
        "distortion": "forward KL(P_full || Q_kept) in nats (also reverse KL and TV); fp32 log_softmax, fp64 sums",
        "primary_position_mode": f"{PRIMARY_POS_MODE} (kept tokens renumbered 0..|S|-1); 'original' is the ablation",
        "primary_apply_mode": "M1 re-encode of x_S only; M2 = prefill x_1..x_{t-1}, keep S's cached K/V, query x_t "
                              "at its original position (M2 runs original positions only)",
        "t_range": f"t uniform without replacement in [{t_min}, {t_max}] (t_min = 4 w_max, t_max = t_min + w_max where "
                   "the context allows); t = number of context tokens, the model predicts x_{t+1}",
        "documents": "LongBench contexts of the selected tasks, round-robin over tasks, file order, the first "
                     f"{n_docs} with >= t_max + 1 tokens; tokenised without special tokens"
                     + (" (BOS prepended)" if opts.bos_prepend else " (no BOS: bos_prepend=no)"),
        "budget": "B counts every kept token including x_t; sink_recent only for B > s",
        "random": "{t-1} + B-1 of {0..t-2} uniformly without replacement, numpy default_rng(sha256(seed, doc, t, B, r)); "
                  "one set per (doc, t, B, r) shared by both position modes and M1/M2; layer- and head-shared",
        "fit": f"least squares (numpy.polyfit) of ln D on ln w (power) and on w (exp), fit range {list(fit_range)}, "
               f"holdout w > {fit_range[1]}; R2 on the log scale; holdout error = RMSE of log10(fit/measured) in decades",
        "bootstrap": f"{opts.bootstrap} resamples of documents with replacement (numpy seed [{opts.seed}, 20260525]), "
                     "percentile 95% CIs; one set of resamples shared by every curve (paired differences)",
        "alpha_sr": "power-law fit of sink_recent (contiguous, M1) mean KL vs B - s over the fit range",
        "policy_gap": "r(B) = mean KL random / mean KL sliding, same position and apply mode; claim statistic = "
                      "median of r over budgets in the fit range (contiguous, M1)",
        "windows_eps": "w* = (C/eps)^(1/alpha) from the primary sliding fit; w_emp = first crossing of the mean "
                       f"curve, log-log interpolated; agreement within {WINDOW_FACTOR:g}x",
        "verdict_thresholds": f"extrapolation ratio >= {ERR_RATIO_CLAIM:g} holds (>1 partial); |delta alpha| <= "
                              f"{DELTA_ALPHA_TOL:g} or CI covers 0; ablation |alpha_orig - alpha_contig| <= "
                              f"{DELTA_ALPHA_TOL:g}; random/sliding median >= {RANDOM_RATIO_CLAIM:g} (>= 10 partial)",
        "registered_methods": "--methods: kvbench registry methods or presets, measured in M2 only through their "
                              "prefill-time select() on the prefix x_1..x_{t-1} (budget B-1 prefix tokens + x_t), "
                              "original positions whatever the method's position_mode, random seed derive_seed(.., "
                              "r=1), every grid budget >= 2 (other_max_budget does not apply to them)",
        "method_scaling": "beta of D(B) ~ C B^-beta per registered method (M2) over the fit range, bootstrap CI over "
                          "documents paired with alpha (M1 sliding, contiguous); beats suffix-only scaling when beta's "
                          "95% interval lies above alpha's",
    })
    return StudyPlan(
        windows=windows, t_min=t_min, t_max=t_max, fit_range=fit_range, docs=chosen, positions=plan_positions,
        seeds=seeds, other_max_budget=other_max, sliding_pos_modes=sliding_modes, n_docs_requested=n_docs,
        n_positions=n_pos, policies=policies, context_limit=limit, notes=notes, choices=choices,
    )
