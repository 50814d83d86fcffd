"""The interface every compression method implements, and the shared pieces they are built from.

A method is a dataclass whose fields are its hyper-parameters. The engine calls it at three moments:

1. `score(view)` once per layer, inside the prefill's attention call (one prefill serves every method and
   every budget of a run). It returns budget-independent per-token scores, or None for positional methods.
   Methods whose `scorer_key()` is equal share one score computation.
2. `select(ctx)` once per layer and budget, after the prefill: the indices of the prompt tokens to keep,
   shape [H_kv, k] (k may differ between layers), or a `Selection` when heads of one layer keep different
   numbers of tokens (Ada-KV, HeadKV, DuoAttention). The engine gathers them into new, smaller cache tensors
   (per-head lengths are padded to the layer's longest head and masked in kvbench's attention function).
3. For continuous methods, `decoder(ctx)` returns a per-layer state whose `step(...)` runs after every
   later attention call (question tokens with --scope context, each generated token) and may evict more.

Methods with `stages()` (the transform wrappers of kvbench.methods.wrapper: ThinK, KIVI) also change the
gathered entries after `select`, through `transform(ctx)`, and may keep a per-plan `lifecycle` that the decode
loop runs after every forward.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvbench.budget import Budget  # noqa: F401  (methods and their callers name it here)
from kvbench.errors import InputError

if typing.TYPE_CHECKING:
    from kvbench.methods.storage import LayerStorage, Lifecycle, TransformContext

GQA_REDUCE = ("mean", "max", "sum")
LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2_E)


@dataclass(frozen=True)
class Selection:
    """The prompt positions one layer keeps when its heads keep different numbers of tokens.

    indices [H, k_max] (long); row h holds its kept positions in ascending order in its first lengths[h]
    entries. Entries past lengths[h] are padding: any valid position, never attended to (the engine masks
    them) and never counted as kept. A plain [H, k] tensor from `select` means every length is k."""

    indices: torch.Tensor
    lengths: torch.Tensor  # [H] long, 0 <= lengths[h] <= k_max

    @classmethod
    def uniform(cls, indices: torch.Tensor) -> "Selection":
        heads, k = indices.shape
        return cls(indices, torch.full((heads,), k, dtype=torch.long, device=indices.device))

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor]) -> "Selection":
        """One ascending index tensor per head (any lengths) -> a padded Selection (padding repeats position 0)."""
        k_max = max((len(r) for r in rows), default=0)
        device = rows[0].device if rows else None
        indices = torch.zeros(len(rows), k_max, dtype=torch.long, device=device)
        for h, row in enumerate(rows):
            indices[h, : len(row)] = row
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
        return cls(indices, lengths)

    @classmethod
    def of(cls, selected: "torch.Tensor | Selection") -> "Selection":
        return selected if isinstance(selected, Selection) else cls.uniform(selected)

    @property
    def is_uniform(self) -> bool:
        return bool((self.lengths == self.indices.shape[-1]).all())

    @property
    def n_heads(self) -> int:
        return self.indices.shape[0]

    @property
    def k_max(self) -> int:
        return self.indices.shape[-1]

    @property
    def n_entries(self) -> int:
        """(head, token) entries kept: what the cache really holds, padding excluded."""
        return int(self.lengths.sum())

    def rows(self) -> list[torch.Tensor]:
        return [self.indices[h, : int(n)] for h, n in enumerate(self.lengths)]

    def valid(self) -> torch.Tensor:
        """[H, k_max] bool: which entries are kept (not padding)."""
        return torch.arange(self.k_max, device=self.indices.device)[None, :] < self.lengths[:, None]


@dataclass(frozen=True)
class HeadRanking:
    """One layer's per-token scores for budgets allocated across heads (Ada-KV, HeadKV), from a method that
    selects by ranking tokens: higher is kept first, exactly as the method's own select ranks them.

    scores [H, T] float over every prompt position; `protected` [T] bool marks the tokens the method keeps in
    every head whatever their score (its observation window, attention sinks), whose scores are ignored;
    `kept` is the layer's per-head budget as the method reads it, protected tokens included (PyramidKV: its
    budget for this layer). Only asked for when the layer is compressed (T > kept) and kept covers the
    protected tokens."""

    scores: torch.Tensor
    protected: torch.Tensor
    kept: int

    @classmethod
    def plain(cls, scores: torch.Tensor, kept: int) -> "HeadRanking":
        """Scores [H, T] of every prompt token and nothing protected (the method keeps its top `kept`)."""
        return cls(scores, torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device), kept)

    @classmethod
    def with_window(cls, prefix_scores: torch.Tensor, n_tokens: int, kept: int) -> "HeadRanking":
        """Scores of the prefix 0 .. T-w-1 [H, T-w] and a protected window of the last w tokens."""
        heads, prefix = prefix_scores.shape
        scores = torch.zeros(heads, n_tokens, dtype=prefix_scores.dtype, device=prefix_scores.device)
        scores[:, :prefix] = prefix_scores
        protected = torch.zeros(n_tokens, dtype=torch.bool, device=prefix_scores.device)
        protected[prefix:] = True
        return cls(scores, protected, kept)


@dataclass
class LayerView:
    """One layer's prefill attention as the scorers see it (batch size 1, batch dim dropped).

    query: [H_q, T_q, d] post-RoPE queries of this forward; keys/values: [H_kv, T, d] (the prompt so far).
    With a chunked prefill (`partial_queries`), `query` holds only the last queries (at least the run's largest
    window) and the column sums are accumulated by the engine over every chunk and seeded here.
    Expensive views are computed on demand and cached, so several methods share them."""

    layer: int
    n_layers: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    max_window: int = 0  # the largest observation window any method of the run asked for
    partial_queries: bool = False  # chunked prefill: `query` is a suffix of the prefill's queries
    # [H_q, T_q] float32 log-sum-exp of each query's causal attention logits, when the attention kernel gave it
    lse: torch.Tensor | None = None
    # The layer's attention module (its o_proj and config), for scorers that read weights (CriticalKV). None
    # where no model is behind the view (unit tests, kvbench.sensitivity).
    module: Any = None
    # A zero-argument callable returning the model's kvbench.engine.rope.Rerotator: the model's own rotary
    # embedding, looked up only when a method asks (pre-RoPE queries and future positions: Expected
    # Attention), so models and runs without such methods never build it. None: no rotary embedding known.
    rope: Callable[[], Any] | None = None
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def seed_column_sums(self, sums: torch.Tensor) -> None:
        """Column sums accumulated over a chunked prefill ([H_q, T], float32)."""
        self._cache["colsum"] = sums

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def group(self) -> int:
        return self.query.shape[0] // self.keys.shape[0]

    def _expanded_keys(self) -> torch.Tensor:
        return self.keys.repeat_interleave(self.group, dim=0)  # [H_q, T, d], query head h uses KV head h // g

    def window_attention(self, window: int) -> torch.Tensor:
        """Causal softmax rows of the last `window` queries over all keys: [H_q, window, T], float32.
        Rows of a shorter window are the last rows of a longer one, so one computation serves all windows."""
        window = min(window, self.query.shape[1])
        big = max(window, min(self.max_window, self.query.shape[1]))
        if ("window", big) not in self._cache:
            q = self.query[:, -big:, :].float()
            logits = torch.matmul(q, self._expanded_keys().float().transpose(1, 2)) * self.scaling
            t = self.n_tokens
            causal = torch.ones(big, t, dtype=torch.bool, device=q.device).tril(t - big)
            logits = logits.masked_fill(~causal, float("-inf"))
            self._cache[("window", big)] = torch.softmax(logits, dim=-1)
        return self._cache[("window", big)][:, -window:, :]

    def column_sums(self, block: int = 512) -> torch.Tensor:
        """Sum over every query of its causal attention to each key: [H_q, T], float32, computed in query
        blocks so no T x T matrix ever exists. A block only multiplies the keys its last query can see (the
        rest would be masked to exact zeros); a KV head's g query heads share one matmul.

        With `lse` (the attention kernel's log-sum-exp of every query's logits), a query's softmax row is
        exp(logits - lse) and needs no max or sum of its own: one matmul that subtracts the lse, one exp and the
        column sum per tile of 128 queries x 256 keys, in base 2 (log2(e) folded into the query scale and the
        lse: exp2 is the cheaper kernel here). Without it each block of 512 queries takes a full softmax.
        The two agree to float32 rounding (the normalisers are summed in different orders; log2(e) rounds the
        exponents once more), and the tiles move last bits too (the matmul and sum kernels round by shape), so
        the path is part of the code version of every method that reads causal column sums (h2o, h2o_prefill,
        observed_attention)."""
        if "colsum" not in self._cache:
            if self.partial_queries:
                raise RuntimeError("column sums of a chunked prefill must be accumulated by the engine: the method "
                                   "must list 'column_sums' in prefill_needs()")
            self._cache["colsum"] = self._column_sums_lse() if self.lse is not None else self._column_sums_softmax(block)
        return self._cache["colsum"]

    def _column_sums_softmax(self, block: int) -> torch.Tensor:
        h_q, tq, d = self.query.shape
        h_kv, t, g = self.keys.shape[0], self.n_tokens, self.group
        offset = t - tq
        keys = self.keys.float()
        total = torch.zeros(h_q, t, dtype=torch.float32, device=keys.device)
        for start in range(0, tq, block):
            stop = min(start + block, tq)
            visible = stop + offset  # keys 0 .. visible-1: everything any query of the block sees
            q = self.query[:, start:stop, :].float().reshape(h_kv, g * (stop - start), d)
            logits = torch.matmul(q, keys[:, :visible, :].transpose(1, 2)).view(h_q, stop - start, visible)
            logits.mul_(self.scaling)
            rows = torch.arange(start, stop, device=keys.device)[:, None] + offset
            logits.masked_fill_(torch.arange(visible, device=keys.device)[None, :] > rows, float("-inf"))
            total[:, :visible] += torch.softmax(logits, dim=-1).sum(dim=1)
        return total

    def _column_sums_lse(self, block: int = 128, tile: int = 256) -> torch.Tensor:
        # Per tile of `block` queries x `tile` keys, small enough that the logits stay in the core's cache between
        # the matmul (which subtracts the log-sum-exp as it goes: baddbmm), the exp and the sum over queries.
        # Base 2: exp(x) = exp2(x log2 e), with log2 e folded into the scaled queries and the lse, because torch's
        # CPU exp2 is about a third cheaper than its exp on these values and far cheaper on -inf (the mask).
        h_q, tq, d = self.query.shape
        h_kv, t, g = self.keys.shape[0], self.n_tokens, self.group
        offset = t - tq
        device = self.keys.device
        scaled = (self.query.float() * (self.scaling * LOG2_E)).reshape(h_kv, g, tq, d)
        keys_t = self.keys.float().transpose(1, 2)  # [H_kv, d, T]
        neg_lse = (self.lse.float() * -LOG2_E).reshape(h_kv, g, tq)
        future = torch.ones(block, block, dtype=torch.bool, device=device).triu(1)  # row r must not see r+1 ..
        total = torch.zeros(h_q, t, dtype=torch.float32, device=device)
        for start in range(0, tq, block):
            stop = min(start + block, tq)
            n, visible, first_own = stop - start, stop + offset, start + offset
            q = scaled[:, :, start:stop, :].reshape(h_kv, g * n, d)
            shift = neg_lse[:, :, start:stop].reshape(h_kv, g * n, 1)
            for a in range(0, visible, tile):
                b = min(a + tile, visible)
                logits = torch.baddbmm(shift, q, keys_t[:, :, a:b]).view(h_q, n, b - a)
                if b > first_own:  # the tile reaches the block's own keys: the causal triangle
                    own = logits[:, :, max(first_own - a, 0):]
                    skip = max(a - first_own, 0)
                    own.masked_fill_(future[:n, skip : skip + own.shape[2]], float("-inf"))
                total[:, a:b] += logits.exp2_().sum(dim=1)
        return total

    def last_row(self) -> torch.Tensor:
        """Attention of the last query: [H_q, T], float32."""
        return self.window_attention(1)[:, -1, :]

    def value_output_norms(self, who: str, block: int = 2048) -> torch.Tensor:
        """[H_q, T] float32: |v_j W_O^(h)|_1 for query head h, the L1 norm of what key j's value adds to the
        residual stream through head h's block of the output projection (o_proj.weight^T rows h d .. h d + d - 1);
        H_q T d hidden multiply-adds, in blocks of `block` tokens so no [g, T, hidden] tensor exists at once."""
        if "value_output_norms" not in self._cache:
            o_proj = getattr(self.module, "o_proj", None)
            if o_proj is None:
                raise InputError(f"{who} needs the attention module's output projection (o_proj), which "
                                 f"{type(self.module).__name__} does not have")
            h_q, g, dim = self.query.shape[0], self.group, self.values.shape[-1]
            w_o = o_proj.weight.float().t().reshape(h_q, dim, -1)  # [H_q, d, hidden]
            values = self.values.float()
            out = torch.empty(h_q, self.n_tokens, dtype=torch.float32, device=values.device)
            for start in range(0, self.n_tokens, block):
                stop = min(start + block, self.n_tokens)
                for kv in range(values.shape[0]):
                    projected = torch.matmul(values[kv, start:stop], w_o[kv * g : (kv + 1) * g])  # [g, b, hidden]
                    out[kv * g : (kv + 1) * g, start:stop] = projected.abs().sum(dim=-1)
            self._cache["value_output_norms"] = out
        return self._cache["value_output_norms"]

    def rerotator(self, who: str) -> Any:
        """The model's Rerotator (kvbench.engine.rope); `who` names the method in the error."""
        if self.rope is None:
            raise InputError(f"{who} needs the model's rotary embedding, which this layer view does not carry")
        try:
            return self.rope()
        except InputError as exc:
            raise InputError(f"{who} needs a RoPE model: {exc}") from None

    def query_prerope(self, who: str) -> torch.Tensor:
        """The queries before RoPE (after any q_norm): [H_q, T_q, d], float32. RoPE is undone with the model's
        own rotary embedding: query i sits at position T - T_q + i, and rotating it back by that position (a
        pure rotation, attention_scaling divided out) is exact up to float rounding (~1 ulp in float32;
        bf16 queries carry bf16's rounding of the rotated values)."""
        if "query_prerope" not in self._cache:
            rot = self.rerotator(who)
            heads, tq, _ = self.query.shape
            positions = torch.arange(self.n_tokens - tq, self.n_tokens, device=self.query.device)
            back = rot.rotate(self.query.float(), -positions.expand(heads, tq))
            self._cache["query_prerope"] = back / rot.scaling if rot.scaling != 1.0 else back
        return self._cache["query_prerope"]


@dataclass
class SelectContext:
    """What `select` gets for one layer and one budget."""

    layer: int
    n_layers: int
    n_tokens: int  # prompt tokens in this layer's cache before compression
    kept: int  # the budget in tokens (Budget.kept(n_tokens))
    scores: torch.Tensor | None  # what score() returned for this layer
    keys: torch.Tensor  # [H_kv, T, d]
    n_kv_heads: int
    group: int
    previous: torch.Tensor | None = None  # indices chosen for the layer below (layer-wise reuse)
    seed: int = 0  # per-sample seed for random methods
    budget: Budget | None = None  # the plan's budget (`kept` is its value at n_tokens); decoding-time targets


@dataclass
class DecodeContext:
    """What `decoder` gets: the layer's selection and everything `select` saw."""

    select: SelectContext
    kept_indices: torch.Tensor  # [H_kv, k] positions (in the prompt) of the kept tokens


@dataclass
class DecodeStep:
    """One attention call of one plan's layer while decoding, as a continuous method's decoder sees it."""

    query: torch.Tensor  # [H_q, q, d] post-RoPE queries of the q new tokens
    keys: torch.Tensor  # [H_kv, L, d] the layer's cache, the new tokens included (the last q entries)
    values: torch.Tensor  # [H_kv, L, d_v]
    scaling: float
    rope: Callable[[], Any] | None = None  # the model's kvbench.engine.rope.Rerotator, looked up on demand
    _rows: torch.Tensor | None = field(default=None, repr=False)

    def rows(self) -> torch.Tensor:
        """Causal softmax rows of the new queries over the cache: [H_q, q, L], float32 (computed once)."""
        if self._rows is None:
            q = self.query.float()
            length, q_len = self.keys.shape[1], q.shape[1]
            group = q.shape[0] // self.keys.shape[0]
            logits = torch.matmul(q, self.keys.float().repeat_interleave(group, dim=0).transpose(1, 2)) * self.scaling
            if q_len > 1:
                causal = torch.ones(q_len, length, dtype=torch.bool, device=q.device).tril(length - q_len)
                logits = logits.masked_fill(~causal, float("-inf"))
            self._rows = torch.softmax(logits, dim=-1)
        return self._rows


class LayerDecoder:
    """Per-layer state of a continuous method. `step` sees the attention rows of the newest queries
    ([H_q, q, L] over the current cache, float32) and returns indices to keep ([H_kv, k]) or None.
    Decoders that need more than the rows (the queries themselves, the values) override `on_step`."""

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def on_step(self, step: DecodeStep) -> "torch.Tensor | Selection | None":
        return self.step(step.rows(), step.keys)


@dataclass
class Method:
    """Base class. Subclasses are dataclasses; their fields are the hyper-parameters."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""  # paper and code the method follows
    continuous: ClassVar[bool] = False  # keeps evicting while decoding
    # Bumped whenever the method's code can select or score differently for the same hyper-parameters; part
    # of its configuration fingerprint, so rows of an older version never mix with newer ones. A method defined
    # outside kvbench also has a hash of its module's source there (methods.plugins.source_version).
    version: ClassVar[int] = 1
    family: ClassVar[str] = ""  # what the scores read, for `kvbench methods`' grouping
    # Its scores read the prompt's queries (attention rows or query statistics), so with --scope full the
    # question steers what is kept; False: keys, values or positions only.
    query_aware: ClassVar[bool] = False
    # The heads of one layer keep different numbers of tokens (select() returns a ragged Selection).
    head_adaptive: ClassVar[bool] = False
    # select keeps the top of ranking()'s per-token scores, so Ada-KV and HeadKV can reallocate its budget
    ranked: ClassVar[bool] = False
    # Hyper-parameters added after results were stored, each with the value that reproduces the behaviour from
    # before it existed: params() leaves a field out while it holds that value, so the configuration
    # fingerprints of earlier results do not move (describe() still shows it).
    added_params: ClassVar[dict[str, Any]] = {}
    gqa_reduce: str = "mean"  # how query-head scores become KV-head scores
    position_mode: str = "original"  # original: new tokens continue from the uncompressed length

    def __post_init__(self) -> None:
        if self.gqa_reduce not in GQA_REDUCE:
            raise InputError(f"gqa_reduce must be one of {', '.join(GQA_REDUCE)}, got '{self.gqa_reduce}'")
        if self.position_mode not in ("original", "contiguous"):
            raise InputError(f"position_mode must be original or contiguous, got '{self.position_mode}'")

    # ---- hooks for the engine -------------------------------------------------------------------------
    def window(self) -> int:
        """Observation window this method needs from the prefill queries (0: none)."""
        return 0

    def scorer_key(self) -> tuple | None:
        """Methods with equal keys share score(); None: no scoring."""
        return None

    def query_head_selection(self) -> bool:
        """Can the query heads that share a KV head keep different tokens? Under --granularity query_head
        (methods-2 §1.6, what KVCache-Factory does by default) such a method scores and selects per query head
        on a cache stored at H_q heads (select sees `n_kv_heads` = H_q, `group` = 1 and keys repeated to H_q).
        False where the kept set cannot differ between a group's query heads whatever their queries
        (positional, layer-shared, scored from keys or values only): those keep H_kv storage, the same
        output for 1/g of the memory."""
        return True

    def prefill_needs(self) -> frozenset[str]:
        """What score() reads beyond the last `window()` queries, so a chunked prefill can provide it:
        "column_sums" (accumulated chunk by chunk) or "all_queries" (refuses chunking)."""
        return frozenset()

    def score(self, view: LayerView) -> torch.Tensor | None:
        return None

    def select(self, ctx: SelectContext) -> "torch.Tensor | Selection":
        raise NotImplementedError

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        return None

    # ---- transforms after selection (methods-2.md §1.8, §4 item 4; kvbench.methods.storage) -----------------
    def stages(self) -> tuple[str, ...]:
        """Names of the transforms applied to the kept entries after selection, in order (ThinK's channel
        mask, then KIVI's quantization); () for eviction only."""
        return ()

    def transform(self, ctx: "TransformContext") -> None:
        """Apply this method's transforms to one layer's kept entries, in place, recording the storage."""

    def lifecycle(self, storages: "list[LayerStorage]") -> "Lifecycle | None":
        """Per-plan state the decode loop runs after every forward (KIVI's quantization of new entries)."""
        return None

    @property
    def uses_budget(self) -> bool:
        """False for methods that keep every token whatever the budget (FullKV, KIVI alone): one plan each."""
        return self.name != "fullkv"

    def bind_model(self, identity: str, model_name: str) -> None:
        """Resolve what the method reads that depends on the model (head tables: kvbench.headtables), once the
        run knows its model and before fingerprints are computed. Nothing by default."""

    def artifacts(self) -> dict[str, str]:
        """Files the method reads beyond its hyper-parameters (kind -> sha256): part of its fingerprint."""
        return {}

    def ranking(self, ctx: SelectContext) -> HeadRanking | None:
        """The per-token ranking `select` keeps the top of, for wrappers that allocate budgets across heads
        (Ada-KV, HeadKV); None: this method does not select by a per-token ranking and cannot be wrapped."""
        return None

    # ---- description -----------------------------------------------------------------------------------
    def code_version(self) -> int:
        """The code version of this configuration (what the fingerprint records): the class's `version`, unless
        a method's parameters pick code paths that changed at different times."""
        return type(self).version

    def params(self) -> dict[str, Any]:
        """The hyper-parameters that identify this configuration (what the fingerprint digests)."""
        return {name: value for name, value in self.all_params().items()
                if name not in self.added_params or value != self.added_params[name]}

    def all_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def parameter_names(self) -> set[str]:
        """What --method-arg may set on this method (a wrapper's include its inner method's)."""
        return set(self.all_params())

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.all_params().items())


# ---- shared building blocks -------------------------------------------------------------------------------
def reduce_groups(scores: torch.Tensor, n_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """[H_q, T] query-head scores -> [H_kv, T]: query heads h*g .. h*g+g-1 share KV head h."""
    grouped = scores.reshape(n_kv_heads, scores.shape[0] // n_kv_heads, -1)
    if how == "mean":
        return grouped.mean(dim=1)
    if how == "max":
        return grouped.amax(dim=1)
    return grouped.sum(dim=1)


def pool1d(scores: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Same-length 1-D pooling along the token axis (stride 1, padding kernel//2), as SnapKV smooths scores."""
    if kernel <= 1 or kind == "none":
        return scores
    x = scores.unsqueeze(1) if scores.dim() == 2 else scores
    pad = kernel // 2
    if kind == "max":
        out = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=pad)
    elif kind == "avg":
        out = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=pad)
    else:
        raise InputError(f"pooling must be max, avg or none, got '{kind}'")
    return out[..., : scores.shape[-1]].reshape(scores.shape)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, in ascending position order. Ties go to the earlier token
    (torch.topk is not stable, so ties are broken explicitly for reproducibility)."""
    k = max(0, min(k, scores.shape[-1]))
    if k == 0:
        return torch.zeros(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    # Sort by (score desc, position asc): a stable descending sort keeps earlier positions first on ties.
    order = torch.argsort(scores.double(), dim=-1, descending=True, stable=True)
    return order[..., :k].sort(dim=-1).values


def with_window(selected: torch.Tensor, n_tokens: int, window: int) -> torch.Tensor:
    """Append the last `window` positions (the observation window) to selected prefix positions."""
    tail = torch.arange(n_tokens - window, n_tokens, device=selected.device)
    tail = tail.expand(selected.shape[0], window)
    return torch.cat([selected, tail], dim=-1)


def split_budget(kept: int, window: int) -> tuple[int, int]:
    """(selected prefix tokens, window tokens) for a budget that includes the window."""
    w = min(window, kept)
    return kept - w, w


def full_indices(n_heads: int, n_tokens: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_tokens, device=device).expand(n_heads, n_tokens)

