"""The cost check: speed and memory of NEW against BASE on the common samples of a (method, budget, task).

Measures (each a ratio NEW / BASE, larger is worse):
- prefill seconds per prompt token: sum of `prefill_seconds` / sum of `prefilled_tokens` (the prefill is
  shared by every method decoded from it, so each method's rows carry the same time);
- decode seconds per generated token: sum of `decode_seconds` / sum of `generated_tokens`;
- cache bytes: mean `cache_bytes` (K and V held after compression; device independent);
- peak memory: max `peak_memory_bytes` (null on CPU runs: not compared).
Timings fail above --max-slowdown and memory above --max-memory. Timings and peak memory depend on the
hardware, so they are compared only when every row of both cells ran on one and the same device name (the
run manifests' `device_name`); cache bytes are always compared. `gate_timings=False` reports the timing
ratios without failing on them, for runners whose load varies (a shared CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbench.gate.findings import Finding
from kvbench.gate.sets import Cell


@dataclass(frozen=True)
class Tolerance:
    max_slowdown: float = 1.2
    max_memory: float = 1.05
    gate_timings: bool = True


def _per_token(rows: list[dict[str, Any]], seconds: str, tokens: str) -> float | None:
    total = sum(int(r.get(tokens) or 0) for r in rows)
    if total == 0 or any(r.get(seconds) is None for r in rows):
        return None
    return sum(float(r[seconds]) for r in rows) / total


def _mean(rows: list[dict[str, Any]], field: str) -> float | None:
    values = [r.get(field) for r in rows]
    return None if not values or None in values else sum(float(v) for v in values) / len(values)


def _peak(rows: list[dict[str, Any]], field: str) -> float | None:
    values = [r.get(field) for r in rows]
    return None if not values or None in values else float(max(values))


# (name, how to measure a cell's common rows, is it hardware dependent, is it a timing)
MEASURES: list[tuple[str, Callable[[list[dict[str, Any]]], float | None], bool, bool]] = [
    ("prefill s/token", lambda rows: _per_token(rows, "prefill_seconds", "prefilled_tokens"), True, True),
    ("decode s/token", lambda rows: _per_token(rows, "decode_seconds", "generated_tokens"), True, True),
    ("cache bytes", lambda rows: _mean(rows, "cache_bytes"), False, False),
    ("peak memory", lambda rows: _peak(rows, "peak_memory_bytes"), True, False),
]


def same_device(base: Cell, new: Cell) -> str | None:
    """The one device name both cells ran on, or None."""
    devices = base.devices | new.devices
    return next(iter(devices)) if len(devices) == 1 and None not in devices else None


def _devices(cell: Cell) -> str:
    return ", ".join(sorted(d or "unknown" for d in cell.devices))


def check(scope: str, base: Cell, new: Cell | None, tolerance: Tolerance) -> Finding:
    if new is None:
        return Finding("cost", scope, "skip", "in BASE but missing from NEW")
    common = sorted(set(base.rows) & set(new.rows))
    if not common:
        return Finding("cost", scope, "skip", "no sample in common")
    old_rows, new_rows = [base.rows[i] for i in common], [new.rows[i] for i in common]
    device = same_device(base, new)
    failed, warned, details, compared = [], [], [], []
    for name, measure, on_hardware, timing in MEASURES:
        if on_hardware and device is None:
            continue
        old, now = measure(old_rows), measure(new_rows)
        if old is None or now is None or old == 0:
            continue
        ratio = now / old
        limit = tolerance.max_slowdown if timing else tolerance.max_memory
        gated = tolerance.gate_timings or not timing
        over = ratio > limit
        note = (f" > {limit:g}: FAIL" if gated else f" > {limit:g} (timings not gated)") if over else ""
        details.append(f"{name}: {old:.6g} -> {now:.6g} (x{ratio:.3f}){note}")
        compared.append(f"{name} x{ratio:.2f}")
        if over:
            (failed if gated else warned).append(f"{name} x{ratio:.2f} (limit {limit:g})")
    where = f"on {device}" if device else f"timings not compared (devices: BASE {_devices(base)}, NEW {_devices(new)})"
    if failed:
        return Finding("cost", scope, "fail", f"{'; '.join(failed)} on {len(common)} samples {where}", tuple(details))
    if warned:
        return Finding("cost", scope, "warn", f"{'; '.join(warned)}, not gated, on {len(common)} samples {where}",
                       tuple(details))
    if not compared:
        return Finding("cost", scope, "skip", f"nothing comparable; {where}", tuple(details))
    return Finding("cost", scope, "pass", f"{', '.join(compared)} on {len(common)} samples {where}", tuple(details))
