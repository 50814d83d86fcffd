"""ThinK: key-channel pruning after token eviction (Xu et al. 2024, arXiv 2407.21018; methods-2.md §2.17).

A transform wrapper: the inner method selects tokens (default SnapKV with the official ThinK settings, window
32, kernel 7, max pooling: preset snapkv_official), then, per layer and KV head:
1. channel score s_c = mean over the last `channel_window` prefill queries of q_c^2 (post-RoPE; averaged over the
   g query heads of the KV head, as kvpress ThinKPress does) x mean over the kept keys of k_c^2 (the
   rank-one factorisation of ||Q_w[:, c] K[:, c]^T||_F; SalesforceAIResearch/ThinK@d200577
   ThinK_flash/src/kv_pruning_utils.py `key_pruner_query_driven` L11-27, kvpress think_press.py L63-98);
2. the floor(pruning_ratio * d) channels of lowest score are pruned (ties: the lower channel index);
3. pruned channels are dropped from every kept entry's key except the last `recent` of each head, whose keys
   keep every channel, as the official cache does (`recent_size` 32); keys appended while decoding are
   never pruned. `recent=0` is kvpress's zeroing of all kept tokens (preset think_kvpress).

Storage [ours]: the pruned channels are zeroed in place and the cache keeps its shape, which gives exactly
the attention logits of the official masked-query product q[c not pruned] . k_pruned (a zeroed key channel
adds nothing to q . k). The bytes are those of the official physical layout (pruned keys at d - p channels,
recent keys at d, plus a d-bit channel mask per head; kvbench.methods.storage), reported as simulated.

Granularity: the official code repeats K/V to query-head granularity and prunes per query head; with a cache
per KV head (kvbench's default) the query term is the group mean, as kvpress does, and with a cache stored per
query head each head uses its own query term, as the official code. With g = 1 they coincide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import LayerView, reduce_groups
from kvbench.methods.storage import TransformContext
from kvbench.methods.wrapper import TransformWrapper


@dataclass
class ThinKScores:
    inner: Any  # the inner method's scores for this layer (None when it has no scorer)
    query_energy: torch.Tensor  # [H_q, d] float32: mean over the window queries of q_c^2, per query head


def pruned_channels(query_energy: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """[H, d] bool, True where a channel is pruned: the n_pruned lowest s_c = query_energy * mean_j k_jc^2 over
    each head's kept entries (keys [H, W, d], head h's entries in its first lengths[h] columns)."""
    heads, width, dim = keys.shape
    squared = keys.float().pow(2)
    if bool((lengths == width).all()):
        key_energy = squared.mean(dim=1)
    else:
        valid = torch.arange(width, device=keys.device)[None, :] < lengths.to(keys.device)[:, None]
        key_energy = (squared * valid[..., None]).sum(dim=1) / lengths.to(keys.device).clamp(min=1)[:, None]
    scores = query_energy.to(keys.device) * key_energy
    order = torch.argsort(scores.double(), dim=-1, stable=True)[:, :n_pruned]  # lowest first, ties: lower channel
    return torch.zeros(heads, dim, dtype=torch.bool, device=keys.device).scatter_(1, order, True)


@dataclass
class ThinK(TransformWrapper):
    name: ClassVar[str] = "think"
    source: ClassVar[str] = (
        "Xu et al. 2024 (arXiv 2407.21018); SalesforceAIResearch/ThinK@d200577 ThinK_flash/src/kv_pruning_utils.py "
        "key_pruner_query_driven; kvpress 0.5.5 ThinKPress; methods-2.md §2.17"
    )
    family: ClassVar[str] = "channel pruning"
    stage: ClassVar[str] = "channel_mask"
    inner: str = "snapkv_official"
    pruning_ratio: float = 0.4  # lambda: the fraction of key channels pruned (floor(lambda * d) of them)
    channel_window: int = 32  # prefill queries the channel scores read (kvpress ThinKPress window_size)
    recent: int = 32  # the last kept entries of each head whose keys keep every channel (kvpress: 0)

    def __post_init__(self) -> None:
        if not 0 <= self.pruning_ratio < 1:
            raise InputError(f"think: pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        if self.channel_window < 1:
            raise InputError(f"think: channel_window must be >= 1, got {self.channel_window}")
        if self.recent < 0:
            raise InputError(f"think: recent must be >= 0, got {self.recent}")
        super().__post_init__()

    @property
    def query_aware(self) -> bool:
        return True

    def window(self) -> int:
        return max(self.channel_window, self._inner.window())

    def scorer_key(self) -> tuple:
        return ("think", self.channel_window, self._inner.scorer_key())

    def score(self, view: LayerView) -> ThinKScores:
        inner = self._inner.score(view) if self._inner.scorer_key() is not None else None
        queries = view.query[:, -self.channel_window:, :].float()
        return ThinKScores(inner, queries.pow(2).mean(dim=1))

    def inner_scores(self, scores: Any) -> Any:
        return scores.inner if isinstance(scores, ThinKScores) else scores

    def own_scores(self, scores: Any) -> Any:
        return scores

    def apply(self, ctx: TransformContext, scores: Any) -> None:
        dim = ctx.keys.shape[-1]
        n_pruned = int(dim * self.pruning_ratio)
        if n_pruned == 0:
            return
        if not isinstance(scores, ThinKScores):
            raise RuntimeError(f"think: no channel scores for layer {ctx.layer} (the scorer did not observe it)")
        energy = scores.query_energy
        if energy.shape[0] != ctx.keys.shape[0]:  # a cache per KV head: the group mean (kvpress's choice)
            energy = reduce_groups(energy, ctx.keys.shape[0], "mean")
        mask = pruned_channels(energy, ctx.keys, ctx.lengths, n_pruned)
        width = ctx.keys.shape[1]
        pruned_entries = (ctx.lengths - self.recent).clamp(min=0).to(ctx.keys.device)  # per head: all but the recent
        rows = torch.arange(width, device=ctx.keys.device)[None, :] < pruned_entries[:, None]
        ctx.keys.masked_fill_(rows[:, :, None] & mask[:, None, :], 0)
        ctx.storage.pruned_channels = n_pruned
        ctx.storage.recent = self.recent
