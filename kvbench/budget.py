"""How much of a prompt's KV cache a method keeps: a ratio or a number of tokens.

Torch-free on purpose: results and recipe tables name budgets by their label (`r0.1`, `b128`, `full`) and must
not import the engine to do so."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import InputError


@dataclass(frozen=True)
class Budget:
    """How much of the prompt's KV to keep, per layer and KV head, observation window included."""

    ratio: float | None = None  # fraction kept (0 < r <= 1): ChunkKV/KVCache-Factory convention
    tokens: int | None = None  # absolute number kept

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("a Budget has exactly one of ratio or tokens")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise InputError(f"{{ratios}} must be in (0, 1], got {self.ratio}", options=("ratios",))
        if self.tokens is not None and self.tokens <= 0:
            raise InputError(f"{{budgets}} must be a positive number of tokens, got {self.tokens}",
                             options=("budgets",))

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
