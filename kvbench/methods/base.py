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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvbench.errors import InputError

GQA_REDUCE = ("mean", "max", "sum")


@dataclass(frozen=True)
class Budget:
    """How much of the prompt's KV to keep, per layer and KV head, observation window included."""

    ratio: float | None = None  # fraction kept (0 < r <= 1): ChunkKV/KVCache-Factory convention
    tokens: int | None = None  # absolute number kept

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("a Budget has exactly one of ratio or tokens")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise InputError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.tokens is not None and self.tokens <= 0:
            raise InputError(f"--budget must be a positive number of tokens, got {self.tokens}")

    def kept(self, n_tokens: int) -> int:
        """Tokens kept out of n_tokens: round(r * n) as KVCache-Factory computes it, at least 1, at most n."""
        want = self.tokens if self.tokens is not None else round(self.ratio * n_tokens)  # type: ignore[operator]
        return max(1, min(n_tokens, want))

    @property
    def label(self) -> str:
        if self.ratio == 1.0:
            return "full"  # nothing evicted, whatever the method: the FullKV block of a table
        return f"r{self.ratio:g}" if self.ratio is not None else f"b{self.tokens}"

    @property
    def is_full(self) -> bool:
        return self.ratio == 1.0


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


@dataclass
class LayerView:
    """One layer's prefill attention as the scorers see it (batch size 1, batch dim dropped).

    query: [H_q, T_q, d] post-RoPE queries of this forward; keys/values: [H_kv, T, d] (the prompt so far).
    Expensive views are computed on demand and cached, so several methods share them."""

    layer: int
    n_layers: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    max_window: int = 0  # the largest observation window any method of the run asked for
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

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
        blocks so no T x T matrix ever exists.

        A block only multiplies the keys its last query can see (the rest would be masked to exact zeros),
        and scales and masks in place: 2.8x faster than full-width blocks at 3.5k tokens with SmolLM2's
        shapes, and bit-identical to them here, because dropping trailing exp(-inf) = 0 terms leaves every
        softmax sum and every block's partial sum as it was. The block size is fixed: it sets the order of the float additions
        into `total`, so changing it moves the last bits. GQA: a KV head's g query heads share one matmul
        instead of copying the keys g times."""
        if "colsum" not in self._cache:
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
            self._cache["colsum"] = total
        return self._cache["colsum"]

    def last_row(self) -> torch.Tensor:
        """Attention of the last query: [H_q, T], float32."""
        return self.window_attention(1)[:, -1, :]


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


@dataclass
class DecodeContext:
    """What `decoder` gets: the layer's selection and everything `select` saw."""

    select: SelectContext
    kept_indices: torch.Tensor  # [H_kv, k] positions (in the prompt) of the kept tokens


class LayerDecoder:
    """Per-layer state of a continuous method. `step` sees the attention rows of the newest queries
    ([H_q, q, L] over the current cache, float32) and returns indices to keep ([H_kv, k]) or None."""

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError


@dataclass
class Method:
    """Base class. Subclasses are dataclasses; their fields are the hyper-parameters."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""  # paper and code the method follows
    continuous: ClassVar[bool] = False  # keeps evicting while decoding
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

    def score(self, view: LayerView) -> torch.Tensor | None:
        return None

    def select(self, ctx: SelectContext) -> "torch.Tensor | Selection":
        raise NotImplementedError

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        return None

    # ---- description -----------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The hyper-parameters that identify this configuration (what the fingerprint digests)."""
        return {name: value for name, value in self.all_params().items()
                if name not in self.added_params or value != self.added_params[name]}

    def all_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

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

