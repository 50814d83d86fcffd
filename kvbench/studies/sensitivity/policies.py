"""Kept-set policies of the truncation-sensitivity study and their position ids.

Token indices are 0-based: the context of query t is ids[0:t] and its last token ids[t-1] is x_t. A budget B
counts every kept token, x_t included:
  sliding      {t-B .. t-1}
  sink_recent  {0 .. s-1} U {t-(B-s) .. t-1}           (only B > s)
  random       {t-1} U (B-1 indices drawn uniformly without replacement from {0 .. t-2}); the draw is a
               numpy Generator seeded with derive_seed(base seed, doc, t, B, r), so one set serves both
               position modes and both apply modes, whatever order things run in.
Position modes: `contiguous` renumbers the kept tokens 0..|S|-1; `original` keeps their indices in the full
sequence (the position-preserving ablation)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

POLICIES = ("sliding", "sink_recent", "random")
POS_MODES = ("contiguous", "original")
APPLY_MODES = ("M1", "M2")
PRIMARY_POS_MODE = "contiguous"  # [ours] truncation as a fresh context; `original` is the ablation


def derive_seed(base: int, doc: str, t: int, budget: int, repeat: int) -> int:
    """The random-retention seed of (doc, t, B, repeat): a stable 63-bit hash, the same for every position mode
    and apply mode, and independent of the order in which things run."""
    text = json.dumps([int(base), str(doc), int(t), int(budget), int(repeat)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def kept_indices(policy: str, t: int, budget: int, sink: int = 4, seed: int | None = None) -> np.ndarray:
    """Sorted 0-based indices (into ids[0:t]) that a policy keeps at budget B for query t; t-1 is always kept."""
    if t < 1 or budget < 1:
        raise ValueError(f"need t >= 1 and budget >= 1, got t={t}, budget={budget}")
    if budget >= t:
        return np.arange(t, dtype=np.int64)
    if policy == "sliding":
        return np.arange(t - budget, t, dtype=np.int64)
    if policy == "sink_recent":
        if budget <= sink:
            raise ValueError(f"sink_recent needs B > s (B={budget}, s={sink})")
        recent = budget - sink
        return np.concatenate([np.arange(sink), np.arange(t - recent, t)]).astype(np.int64)
    if policy == "random":
        if seed is None:
            raise ValueError("random retention needs a seed")
        rng = np.random.default_rng(seed)
        drawn = rng.choice(t - 1, size=budget - 1, replace=False) if budget > 1 else np.zeros(0, dtype=np.int64)
        return np.concatenate([np.sort(drawn), [t - 1]]).astype(np.int64)
    raise ValueError(f"unknown policy '{policy}'")


def position_ids(kept: np.ndarray, mode: str) -> np.ndarray:
    if mode == "contiguous":
        return np.arange(len(kept), dtype=np.int64)
    if mode == "original":
        return np.asarray(kept, dtype=np.int64)
    raise ValueError(f"unknown position mode '{mode}'")


def kept_digest(kept: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(kept, dtype=np.int64).tobytes()).hexdigest()[:12]
