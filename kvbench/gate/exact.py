"""The exact check: every prediction of BASE reproduced by NEW, sample by sample.

Greedy decoding under one protocol fingerprint (weights, dtype, prompt, metric and engine versions) on one
device is deterministic, so any changed prediction is a change of behaviour, however small. Each change is
listed with its sample id, both texts and the first differing token (from the rows' `generated_token_ids`;
rows written before kvbench stored them fall back to the first differing character, and say so). Samples of BASE
missing from NEW are changes too: they were not reproduced. Under `--exact` any change fails; otherwise the
changes are listed as a warning."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvbench.gate.findings import Finding
from kvbench.gate.sets import Cell


@dataclass(frozen=True)
class Change:
    sample_id: str
    old: str
    new: str
    where: str  # "token 7: 1234 -> 5678", "token 3: 42 -> (end)", or "character 12 (no token ids stored)"


def token_ids(row: dict[str, Any]) -> list | None:
    """The generated ids; `token_ids` is what the gate's first rows called them."""
    return row.get("generated_token_ids", row.get("token_ids"))


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = token_ids(old), token_ids(new)
    if isinstance(a, list) and isinstance(b, list):
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if index == len(a) == len(b):  # same tokens, different text: only a detokenizer change does that
            return "same token ids (the text differs: detokenization changed)"

        def at(ids: list) -> str:
            return str(ids[index]) if index < len(ids) else "(end)"

        return f"token {index}: {at(a)} -> {at(b)}"
    x, y = str(old.get("prediction", "")), str(new.get("prediction", ""))
    index = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return f"character {index} (no token ids stored)"


def changes(base: Cell, new: Cell) -> tuple[list[Change], list[str]]:
    """Changed predictions on the common samples, and the BASE sample ids NEW lacks."""
    out = []
    for sample_id in sorted(set(base.rows) & set(new.rows)):
        old, now = base.rows[sample_id], new.rows[sample_id]
        if old.get("prediction") != now.get("prediction") or token_ids(old) != token_ids(now):
            out.append(Change(sample_id, str(old.get("prediction")), str(now.get("prediction")),
                              first_difference(old, now)))
    return out, sorted(set(base.rows) - set(new.rows))


def describe(change: Change) -> str:
    """One change on one line; json quoting makes whitespace and newlines visible."""
    return (f"{change.sample_id}: {change.where}; old {json.dumps(change.old, ensure_ascii=False)} "
            f"new {json.dumps(change.new, ensure_ascii=False)}")


def check(scope: str, base: Cell, new: Cell | None, strict: bool) -> Finding:
    if new is None:
        return Finding("exact", scope, "fail" if strict else "warn", "in BASE but missing from NEW")
    changed, missing = changes(base, new)
    if not changed and not missing:
        return Finding("exact", scope, "pass", f"all {len(base.rows)} predictions reproduced")
    parts = [f"{len(changed)} of {len(base.rows)} predictions changed"] if changed else []
    if missing:
        parts.append(f"{len(missing)} BASE samples missing from NEW")
    details = tuple(describe(c) for c in changed) + tuple(f"{i}: missing from NEW" for i in missing)
    return Finding("exact", scope, "fail" if strict else "warn", "; ".join(parts), details)
