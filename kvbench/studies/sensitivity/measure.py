"""The measurements: how far the next-token distribution moves when only a kept set S of the context is used.

For a document x_1..x_N and a query position t (the model predicts x_{t+1}), P_t = p(.|x_1..x_t) and
Q_t^S = p(.|x_S) for a kept set S that always holds t. Distortion d_t(S) = KL(P_t || Q_t^S) in nats; the
reverse KL and the total variation are logged too. log_softmax runs in float32, sums in float64.

Apply modes: M1 re-encodes x_S alone (the primary, "suffix-only" measurement: nothing outside S leaks in);
M2 prefills x_1..x_{t-1} with full attention, keeps the cached keys/values of S minus {t} and runs x_t as the
query at its original position (kept KVs carry information from evicted tokens). M2 also measures registered
kvbench methods at the same budget, through the engine's own parts: the prefill scores come from the engine's
`PrefillObserver` fed by the attention-observer hook (`attention.observing`), the kept sets from the method's
`select` (a `Selection`, heads of one layer may keep different numbers of tokens), the pruned caches from the
engine's `KeptLayer.gather` into its `RaggedCache`, masked per head in kvbench's attention (`attention.decoding`).

One causal forward over the document gives every P_t and, by causality, every prefix x_1..x_{t-1}: its
queries, keys and values are the first t-1 positions of that forward (`PrefixScorers` hands each prefix to its
own PrefillObserver). Every M1 context is an independent forward; contexts of equal length are stacked into
one batch (at most `batch_tokens` tokens). An explicit all-ones attention mask is always passed: without one,
transformers reads non-consecutive position ids (original mode with gaps) as *packed sequences* and would
silently build a block-diagonal mask.

A measurement is a `Cell` (document, t, policy, budget, position mode, apply mode, repeat, and for a registered
method the fingerprint of its name, hyper-parameters and code version); its `key` names the row in
kl_raw.jsonl, so a resumed study measures only the cells it lacks (`measure_document(done=...)`) and a method
whose code changed is measured again rather than mixed with rows of its older version."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvbench.studies.sensitivity.policies import (
    POLICIES, POS_MODES, derive_seed, kept_digest, kept_indices, position_ids,
)

Row = dict[str, Any]


# ---- measures ---------------------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary (last axis)."""
    return torch.log_softmax(logits.float(), dim=-1)


def divergences(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Rows of [KL(P||Q), KL(Q||P), TV(P,Q)] in nats, float64, from float32 log-probabilities [n, V].
    Raw values: KL can come out a few 1e-9 below zero from float32 rounding; they are not clipped."""
    lp, lq = logp.double(), logq.double()
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum(-1)
    rkl = (q * (lq - lp)).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    return torch.stack([kl, rkl, tv], dim=-1)


# ---- what to measure --------------------------------------------------------------------------------------
@dataclass
class MeasureConfig:
    windows: tuple[int, ...]
    policies: tuple[str, ...] = POLICIES  # built-in kept-set rules
    methods: dict[str, Any] = field(default_factory=dict)  # registered methods (M2 only): label -> Method
    pos_modes: tuple[str, ...] = POS_MODES
    apply_modes: tuple[str, ...] = ("M1",)
    sink: int = 4
    seeds: int = 2
    other_max_budget: int | None = None  # sink_recent and random are measured only up to this budget
    sliding_pos_modes: tuple[str, ...] | None = None  # None: pos_modes
    base_seed: int = 0
    batch_tokens: int = 8192
    bos_prepend: bool = False


@dataclass(frozen=True)
class Cell:
    """One measurement. `repeat` is random retention's r (1..R), None for every other policy."""

    doc_id: str
    t: int
    policy: str  # a built-in policy or a registered method's label
    budget: int
    pos_mode: str
    apply_mode: str
    repeat: int | None = None
    method_fp: str | None = None  # registered methods: digest of name, hyper-parameters and code version

    @property
    def key(self) -> str:
        """The row's `_id` in kl_raw.jsonl."""
        fields = [self.doc_id, self.t, self.policy, self.budget, self.pos_mode, self.apply_mode, self.repeat]
        return json.dumps(fields + ([self.method_fp] if self.method_fp else []))


def method_fingerprint(method: Any) -> str:
    """What fixes a registered method's selection: its name, hyper-parameters and code version."""
    from kvbench.results.store import digest

    return digest({"method": method.name, "params": method.params(), "version": getattr(method, "version", 1)})


@dataclass
class Planned:
    """A cell with what it keeps: the built-in policies' indices into ids[0:t] (None for a registered method,
    whose kept set depends on the prefill) and the seed that drew them."""

    cell: Cell
    kept: np.ndarray | None
    rng_seed: int | None


def _budget_ok(cfg: MeasureConfig, policy: str, budget: int) -> bool:
    """[ours] Only sink_recent and random are cut at other_max_budget: a registered method costs one selection
    and one single-token forward per budget in M2, and the method-scaling table needs the whole grid."""
    return policy not in ("sink_recent", "random") or cfg.other_max_budget is None or budget <= cfg.other_max_budget


def plan_cells(cfg: MeasureConfig, doc_id: str, ts: Sequence[int]) -> list[Planned]:
    """Every measurement of one document, in the order the study batches them."""
    out: list[Planned] = []
    for t in sorted(int(t) for t in ts):
        for policy in cfg.policies:
            for b in cfg.windows:
                if b > t or (policy == "sink_recent" and b <= cfg.sink) or not _budget_ok(cfg, policy, b):
                    continue
                repeats = range(1, cfg.seeds + 1) if policy == "random" else [None]
                for r in repeats:
                    seed = derive_seed(cfg.base_seed, doc_id, t, b, r) if r is not None else None
                    kept = kept_indices(policy, t, b, cfg.sink, seed)
                    if "M1" in cfg.apply_modes:
                        modes = cfg.sliding_pos_modes if (policy == "sliding" and cfg.sliding_pos_modes) else cfg.pos_modes
                        out += [Planned(Cell(doc_id, t, policy, b, mode, "M1", r), kept, seed) for mode in modes]
                    if "M2" in cfg.apply_modes:
                        out.append(Planned(Cell(doc_id, t, policy, b, "original", "M2", r), kept, seed))
        if "M2" in cfg.apply_modes:
            for label, method in cfg.methods.items():
                fp = method_fingerprint(method)
                for b in cfg.windows:
                    if 2 <= b <= t and _budget_ok(cfg, label, b):
                        out.append(Planned(Cell(doc_id, t, label, b, "original", "M2", method_fp=fp), None,
                                           derive_seed(cfg.base_seed, doc_id, t, b, 1)))
    return out


# ---- forward passes ---------------------------------------------------------------------------------------
def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def full_pass(model: Any, ids: Sequence[int], ts: Sequence[int], keep_cache: bool = False, observer: Any = None):
    """One causal forward over ids[0:max(ts)]: float32 log-probs [len(ts), V] of the next token after each
    context ids[0:t], and (keep_cache) the DynamicCache of that forward. `observer` sees every layer's
    attention through the engine's hook."""
    from kvbench.engine import attention

    device = _device(model)
    n = max(ts)
    x = torch.as_tensor(list(ids[:n]), dtype=torch.long, device=device)[None]
    pos = torch.arange(n, device=device)[None]
    keep = torch.as_tensor([t - 1 for t in ts], dtype=torch.long, device=device)
    with attention.observing(observer):
        out = model(
            input_ids=x, position_ids=pos, attention_mask=torch.ones_like(x), use_cache=keep_cache, logits_to_keep=keep
        )
    return log_probs(out.logits[0]).cpu(), (out.past_key_values if keep_cache else None)


@torch.inference_mode()
def reencode_logits(model: Any, ids: np.ndarray, pos: np.ndarray) -> torch.Tensor:
    """Last-token logits of a batch of equal-length contexts: ids, pos [b, L] -> float32 [b, V]."""
    device = _device(model)
    x = torch.as_tensor(ids, dtype=torch.long, device=device)
    p = torch.as_tensor(pos, dtype=torch.long, device=device)
    out = model(input_ids=x, position_ids=p, attention_mask=torch.ones_like(x), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


@dataclass
class Context:
    """One M1 measurement's input: the kept token ids, their position ids and which reference P it is compared
    to (a row of the full pass)."""

    ids: np.ndarray
    pos: np.ndarray
    ref: int


def reencode_divergences(model: Any, contexts: Sequence[Context], ref_logp: torch.Tensor,
                         batch_tokens: int = 8192) -> Iterator[tuple[list[int], np.ndarray]]:
    """(context indices, [n, 3] (KL, reverse KL, TV)) batch after batch, forwarding contexts of equal length
    together (at most batch_tokens tokens per forward). Identical contexts with the same reference are
    computed once and reported for each of them."""
    unique: dict[tuple, int] = {}
    owners: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        first = unique.setdefault((c.ref, c.ids.tobytes(), c.pos.tobytes()), i)
        owners.setdefault(first, []).append(i)
    by_len: dict[int, list[int]] = {}
    for first in owners:
        by_len.setdefault(len(contexts[first].ids), []).append(first)
    for length in sorted(by_len):
        members = by_len[length]
        rows = max(1, batch_tokens // length)
        for start in range(0, len(members), rows):
            chunk = members[start : start + rows]
            ids = np.stack([contexts[i].ids for i in chunk])
            pos = np.stack([contexts[i].pos for i in chunk])
            logq = log_probs(reencode_logits(model, ids, pos)).cpu()
            div = divergences(ref_logp[[contexts[i].ref for i in chunk]], logq).numpy()
            which = [j for first in chunk for j in owners[first]]
            yield which, np.stack([div[n] for n, first in enumerate(chunk) for _ in owners[first]])


@dataclass
class Eviction:
    """One M2 measurement: for query t, the prefix positions kept, either one shared 1-D array for every layer
    and head (the built-in policies) or a `Selection` per layer (a registered method)."""

    t: int
    kept: np.ndarray | list[Any]
    ref: int


@torch.inference_mode()
def evict_divergences(model: Any, cache: Any, ids: Sequence[int], evictions: Sequence[Eviction],
                      ref_logp: torch.Tensor, batch_tokens: int = 8192) -> Iterator[tuple[list[int], np.ndarray]]:
    """M2: keep the full pass's cached K/V at the given prefix positions (the engine's KeptLayer.gather into its
    RaggedCache), run x_t (ids[t-1]) as the query at its original position t-1, and compare with the
    full-context distribution. Yields (eviction indices, [n, 3]) batch after batch.

    Evictions are batched only with others of the same per-layer widths whose heads all keep the same number
    of tokens, so such a batch needs no mask and computes what one eviction alone computes; a ragged selection
    (heads of a layer keeping different numbers) is measured alone, masked per head in kvbench's attention."""
    from kvbench.engine import attention
    from kvbench.engine.cache import KeptLayer, RaggedCache
    from kvbench.methods.base import Selection

    device = _device(model)
    layers = cache.layers
    n_layers, n_heads = len(layers), layers[0].keys.shape[1]

    def selections(e: Eviction) -> list[Any]:
        if isinstance(e.kept, np.ndarray):
            idx = torch.as_tensor(e.kept, dtype=torch.long, device=device)
            return [Selection.uniform(idx[None].expand(n_heads, -1))] * n_layers
        return list(e.kept)

    groups: dict[tuple, list[int]] = {}
    per_eviction = [selections(e) for e in evictions]
    for i, sels in enumerate(per_eviction):
        uniform = all(sel.is_uniform for sel in sels)
        groups.setdefault(tuple(sel.k_max for sel in sels) if uniform else ("ragged", i), []).append(i)
    for sizes, members in groups.items():
        widths = [sel.k_max for sel in per_eviction[members[0]]]
        rows = max(1, batch_tokens // max(1, max(widths)))
        for start in range(0, len(members), rows):
            chunk = members[start : start + rows]
            query = torch.as_tensor([[ids[evictions[i].t - 1]] for i in chunk], dtype=torch.long, device=device)
            qpos = torch.as_tensor([[evictions[i].t - 1] for i in chunk], dtype=torch.long, device=device)
            if max(widths) == 0:
                logits = model(input_ids=query, position_ids=qpos, attention_mask=torch.ones_like(query),
                               use_cache=False, logits_to_keep=1).logits[:, -1]
            else:
                # Layers of different widths (PyramidKV) and ragged heads need kvbench's attention, whose masks
                # follow each layer's own rows; the 2-D mask below has layer 0's width, the one transformers
                # builds its mask from.
                if (min(widths) != max(widths) or sizes[0] == "ragged") and \
                        getattr(model.config, "_attn_implementation", "") != "kvbench":
                    raise ValueError("M2 with per-layer or per-head kept lengths needs kvbench's attention "
                                     "(kvbench.engine.attention.install)")
                kept = RaggedCache([[KeptLayer.gather(layers[layer].keys[0], layers[layer].values[0],
                                                      per_eviction[i][layer]) for layer in range(n_layers)]
                                    for i in chunk], reserve=1)
                mask = torch.ones(len(chunk), widths[0] + 1, dtype=torch.long, device=device)
                with attention.decoding(kept):
                    logits = model(input_ids=query, position_ids=qpos, attention_mask=mask, past_key_values=kept,
                                   use_cache=True, logits_to_keep=1).logits[:, -1]
            div = divergences(ref_logp[[evictions[i].ref for i in chunk]], log_probs(logits).cpu()).numpy()
            yield list(chunk), div


# ---- registered methods on the engine's hooks ---------------------------------------------------------------
class PrefixScorers:
    """An attention observer for the full pass that hands every prefix x_1..x_n (n in `lengths`) to its own
    engine PrefillObserver: by causality the prefix's post-RoPE queries, keys and values are the first n
    positions of the full pass, so one forward scores every query position's prefix as a prefill of that
    prefix alone would."""

    def __init__(self, methods: Sequence[Any], n_layers: int, lengths: Sequence[int]):
        from kvbench.engine import PrefillObserver

        self.by_length = {int(n): PrefillObserver(list(methods), n_layers) for n in lengths}

    @property
    def wants_lse(self) -> bool:
        """Column-sum scorers take the attention kernel's log-sum-exp, as in the engine's prefill."""
        return any(observer.wants_lse for observer in self.by_length.values())

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     lse: torch.Tensor | None = None) -> None:
        # a query's log-sum-exp covers the keys up to itself, so it too is the prefix's
        for n, observer in self.by_length.items():
            observer.on_attention(module, query[:, :, :n], key[:, :, :n], value[:, :, :n],
                                  lse=None if lse is None else lse[:, :, :n])


def select_layers(method: Any, observer: Any, cache: Any, n_prefix: int, kept: int, group: int,
                  seed: int) -> list[Any]:
    """A registered method's prefill-time selection for the prefix x_1..x_{n_prefix}, layer by layer as the
    engine compresses (the layer below's choice passed on as `previous`): one `Selection` per layer."""
    from kvbench.methods.base import SelectContext, Selection

    scorer_key = method.scorer_key()
    out, previous = [], None
    n_layers = len(cache.layers)
    for layer in range(n_layers):
        keys = cache.layers[layer].keys[0, :, :n_prefix]
        ctx = SelectContext(layer=layer, n_layers=n_layers, n_tokens=n_prefix, kept=min(kept, n_prefix),
                            scores=observer.scores[scorer_key].get(layer) if scorer_key is not None else None,
                            keys=keys, n_kv_heads=keys.shape[0], group=group, previous=previous, seed=seed)
        keep = method.select(ctx)
        previous = keep
        out.append(Selection.of(keep))
    return out


# ---- one document -----------------------------------------------------------------------------------------
def measure_document(model: Any, ids: Sequence[int], ts: Sequence[int], cfg: MeasureConfig, doc_id: str = "doc",
                     base_row: Row | None = None, done: frozenset[str] | set[str] = frozenset()) -> Iterator[list[Row]]:
    """The kl_raw rows of one document's cells whose key is not in `done`, batch after batch (the caller
    appends each batch before the next is computed). The full pass always covers every planned t, so a cell's
    reference distribution does not depend on what was done before."""
    ts = sorted(int(t) for t in ts)
    if max(ts) > len(ids):
        raise ValueError(f"query position {max(ts)} beyond the document ({len(ids)} tokens)")
    pending = [p for p in plan_cells(cfg, doc_id, ts) if p.cell.key not in done]
    if not pending:
        return
    ref_of = {t: i for i, t in enumerate(ts)}
    need_m2 = any(p.cell.apply_mode == "M2" for p in pending)
    method_ts = sorted({p.cell.t for p in pending if p.cell.policy in cfg.methods})
    scorers = PrefixScorers(list(cfg.methods.values()), model.config.num_hidden_layers, [t - 1 for t in method_ts]) \
        if method_ts else None
    ref_logp, cache = full_pass(model, ids, ts, keep_cache=need_m2, observer=scorers)
    if need_m2 and cache is None:
        raise RuntimeError("the model returned no cache")
    base = dict(base_row or {})
    arr = np.asarray(ids, dtype=np.int64)

    m1 = [p for p in pending if p.cell.apply_mode == "M1"]
    if m1:
        contexts = [Context(arr[p.kept], position_ids(p.kept, p.cell.pos_mode), ref_of[p.cell.t]) for p in m1]
        for which, div in reencode_divergences(model, contexts, ref_logp, cfg.batch_tokens):
            yield [_row(base, m1[i], cfg, d) for i, d in zip(which, div)]
    builtin = [p for p in pending if p.cell.apply_mode == "M2" and p.kept is not None]
    if builtin:
        evictions = [Eviction(p.cell.t, p.kept[p.kept != p.cell.t - 1], ref_of[p.cell.t]) for p in builtin]
        for which, div in evict_divergences(model, cache, ids, evictions, ref_logp, cfg.batch_tokens):
            yield [_row(base, builtin[i], cfg, d) for i, d in zip(which, div)]
    group = model.config.num_attention_heads // cache.layers[0].keys.shape[1] if need_m2 else 1
    for p in (p for p in pending if p.kept is None):
        c = p.cell
        method = cfg.methods[c.policy]
        sel = select_layers(method, scorers.by_length[c.t - 1], cache, c.t - 1, c.budget - 1, group, p.rng_seed)
        # one eviction at a time: batching them would change the float arithmetic of these rows
        ((_, div),) = list(evict_divergences(model, cache, ids, [Eviction(c.t, sel, ref_of[c.t])], ref_logp,
                                             cfg.batch_tokens))
        # n_kept: the most any layer's head keeps, x_t included; the digest covers every head's kept entries
        extra = {"n_kept": max(int(x.lengths.max()) for x in sel) + 1, "method_fp": c.method_fp,
                 "kept_digest": kept_digest(np.concatenate([r.cpu().numpy() for x in sel for r in x.rows()]))}
        yield [_row(base, p, cfg, div[0], extra)]


def _row(base: Row, p: Planned, cfg: MeasureConfig, div: np.ndarray, extra: Row | None = None) -> Row:
    c = p.cell
    kl, rkl, tv = (float(v) for v in div)
    return {"_id": c.key, **base, "doc_id": c.doc_id, "t": c.t, "policy": c.policy, "B": c.budget,
            "s": cfg.sink if c.policy == "sink_recent" else 0, "bos_prepend": cfg.bos_prepend, "seed": c.repeat,
            "rng_seed": p.rng_seed, "n_kept": int(len(p.kept)) if p.kept is not None else None,
            "kept_digest": kept_digest(p.kept) if p.kept is not None else None, **(extra or {}),
            "pos_mode": c.pos_mode, "apply_mode": c.apply_mode, "w": c.budget if c.policy == "sliding" else None,
            "kl_fwd": kl, "kl_rev": rkl, "tv": tv}
