"""PyramidKV: SnapKV scores and selection with a layer budget that shrinks linearly from the bottom layer up.

Budget (methods.md §2.3, KVCache-Factory PyramidKVCluster at ffac160, floor division throughout), with C the
nominal per-layer budget (window included), w the window, L layers, l the layer index from 0, beta = 20:

    min_num = (C - w) // beta
    max_num = 2 (C - w) - min_num
    if max_num >= T - w:  max_num = T - w;  min_num = 2 (C - w) - max_num
    steps   = (max_num - min_num) // (L - 1)
    k_l     = max_num - l * steps            # selected prefix tokens; layer l keeps k_l + w

Branches: T < C keeps everything; C <= T < 2 (C - w) is uniform SnapKV (C - w + w per layer); otherwise the
pyramid. Because `steps` is floored the mean kept length is slightly above C (757.5 for C = 750, T = 7500,
32 layers). Layers keep different numbers of tokens; the engine and kvbench.engine.attention handle uneven lengths.
With C <= w every layer keeps the last C tokens (as SnapKV). A one-layer model (where the official code
divides by L - 1 = 0) is uniform SnapKV."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import InputError
from kvbench.methods.base import SelectContext
from kvbench.methods.snapkv import SnapKV


def pyramid_budgets(n_tokens: int, kept: int, window: int, n_layers: int, beta: int = 20) -> list[int]:
    """Tokens kept per layer (window included) for a prompt of n_tokens and nominal budget `kept`."""
    if n_tokens < kept or kept <= window:
        return [min(n_tokens, kept)] * n_layers
    base = kept - window
    if n_tokens < 2 * base or n_layers == 1:
        return [kept] * n_layers
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= n_tokens - window:
        max_num = n_tokens - window
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return [max_num - layer * steps + window for layer in range(n_layers)]


@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    source = (
        "Cai et al. 2024, PyramidKV, arXiv 2406.02069; layer budget as KVCache-Factory PyramidKVCluster "
        "(ffac160, beta=20, floor division), SnapKV scoring and selection"
    )

    beta: int = 20  # min_num = (C - w) // beta: the top layer's share

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise InputError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def prefix_budget(self, ctx: SelectContext) -> int:
        budgets = pyramid_budgets(ctx.n_tokens, ctx.kept, self.window_size, ctx.n_layers, self.beta)
        return budgets[ctx.layer] - self.window_size
