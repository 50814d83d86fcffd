"""Which stored rows a table or a figure may show together, and the refusals when they may not.

A cell averages rows; rows are averaged only when they share the protocol fingerprint (model weights,
dtype, truncation, prompt/metric/engine versions), their task's fingerprint (prompt rules, data file) and,
within one (method, budget, task), the configuration fingerprint (hyper-parameters, scope). Anything else is
refused with one line that names the files on every side, the fields that differ where the results record
them (manifests hold each protocol's fields; rows hold params and scope), and how to pick one set.

Rows without a `score` are skipped (and named under the table); a `score` that is not a finite number is
refused, naming its file and line: it would poison every average it enters."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import InputError
from kvbench.results.store import ResultSet, Skipped, manifest_protocols

Row = dict[str, Any]
Origin = Callable[[Row], "tuple[Path, int] | None"]

PICK_PROTOCOL = "pick one with --protocol FP (or narrow with --model/--tasks)"


def scored(results: ResultSet) -> ResultSet:
    """The rows that have a score; rows without one move to `skipped`. Refuses a score that is not a number."""
    rows = []
    for row in results.rows:
        value = row.get("score")
        where = results.origin(row)
        if value is None:
            if where is not None:
                results.skipped.append(Skipped(where[0], where[1], "no score"))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            place = f"{where[0]}:{where[1]}" if where else f"row {row.get('_id')!r}"
            raise InputError(f"{place}: score must be a number, got {_json_text(value)}; fix or remove that line")
        rows.append(row)
    results.rows = rows
    return results


def _json_text(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def skipped_note(skipped: Sequence[Skipped], limit: int = 5) -> str:
    """'Skipped 3 lines that hold no usable row: a.jsonl:4 (not JSON), ...' ('' when none)."""
    if not skipped:
        return ""
    ordered = sorted(skipped, key=lambda s: (str(s.path), s.line))
    shown = ", ".join(str(s) for s in ordered[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    noun = "line that holds" if len(skipped) == 1 else "lines that hold"
    return f"Skipped {len(skipped)} {noun} no usable row: {shown}{more}."


def pick(results: ResultSet, *, model: str | None = None, tasks: Sequence[str] | None = None,
         protocol: str | None = None) -> list[Row]:
    """The rows of one table: filtered by model, tasks and protocol fingerprint (a unique prefix will do),
    then checked (see check)."""
    rows = results.rows
    if not rows:
        note = skipped_note(results.skipped)
        raise InputError(f"no result rows under {results.root}" + (f"; {note[0].lower()}{note[1:-1]}" if note else ""))
    if model is not None:
        rows = [r for r in rows if r.get("model") == model]
    if tasks:
        rows = [r for r in rows if r.get("task") in tasks]
    models = sorted({str(r.get("model")) for r in rows})
    if len(models) > 1:
        raise InputError(f"results hold several models ({', '.join(models)}); pick one with --model")
    if protocol is not None:
        present = sorted({str(r.get("protocol_fp")) for r in rows})
        chosen = [fp for fp in present if fp.startswith(protocol.strip())] if protocol.strip() else []
        if len(chosen) != 1:
            what = "no" if not chosen else "more than one"
            raise InputError(f"--protocol {protocol}: {what} protocol fingerprint of the selected rows starts with it; "
                             f"they hold {', '.join(present) or 'none'}")
        rows = [r for r in rows if r.get("protocol_fp") == chosen[0]]
    check(rows, results.origin, lambda: manifest_protocols(results.root))
    return rows


def check(rows: Sequence[Row], origin: Origin | None = None,
          protocols_of: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
    """Refuse rows that must not be averaged together (see the module docstring). `origin` names a row's
    file, `protocols_of` gives the recorded fields of each protocol fingerprint; both only improve the message."""
    protocols: set[str] = set()
    task_fps: dict[str, set[str]] = defaultdict(set)
    configs: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in rows:  # one cheap pass; the groups for a message are built only when something is refused
        protocols.add(str(r.get("protocol_fp")))
        task_fps[str(r.get("task"))].add(str(r.get("task_fp")))
        configs[(str(r.get("method")), str(r.get("budget")), str(r.get("task")))].add(str(r.get("config_fp")))
    if len(protocols) > 1:
        by_protocol = _groups(rows, lambda r: str(r.get("protocol_fp")))
        recorded = protocols_of() if protocols_of is not None else {}
        raise InputError(f"rows under {len(by_protocol)} protocol fingerprints cannot be averaged together: "
                         f"{_sides(by_protocol, origin)}; {_protocol_diff(list(by_protocol), recorded)}; "
                         f"{PICK_PROTOCOL}")
    for task, fps in task_fps.items():
        if len(fps) > 1:
            by_task_fp = _groups([r for r in rows if str(r.get("task")) == task], lambda r: str(r.get("task_fp")))
            raise InputError(f"task {task}: rows under {len(by_task_fp)} task fingerprints (its prompt rules or "
                             f"its data file differ) cannot be averaged together: {_sides(by_task_fp, origin)}; "
                             "keep one set under --results (move the other files away)")
    for (method, budget, task), fps in configs.items():
        if len(fps) > 1:
            cell = [r for r in rows
                    if (str(r.get("method")), str(r.get("budget")), str(r.get("task"))) == (method, budget, task)]
            by_config = _groups(cell, lambda r: str(r.get("config_fp")))
            raise InputError(f"{method} at {budget} on {task}: rows of {len(by_config)} configurations "
                             f"({_config_diff(by_config)}) cannot be averaged together: {_sides(by_config, origin)}; "
                             "give them different preset names or keep them in separate --results folders")


def _groups(rows: Sequence[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for row in rows:
        out[key(row)].append(row)
    return dict(sorted(out.items()))


def _sides(groups: dict[str, list[Row]], origin: Origin | None) -> str:
    """'fp1 in a.jsonl, b.jsonl (+2 more files) and fp2 in c.jsonl'; files unknown without `origin`."""
    parts = []
    for key, rows in groups.items():
        files = sorted({str(where[0]) for r in rows if origin is not None and (where := origin(r)) is not None})
        if not files:
            parts.append(f"{key} ({len(rows)} rows)")
            continue
        more = f" (+{len(files) - 2} more files)" if len(files) > 2 else ""
        parts.append(f"{key} in {', '.join(files[:2])}{more}")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _protocol_diff(fps: list[str], recorded: dict[str, dict[str, Any]]) -> str:
    missing = [fp for fp in fps if fp not in recorded]
    if missing:
        return (f"no manifest records the fields of {', '.join(missing)} (model weights, dtype, truncation length "
                "or prompt/metric/engine version differ)")
    keys = sorted({k for fp in fps for k in recorded[fp]})
    differ = [k for k in keys if len({repr(recorded[fp].get(k)) for fp in fps}) > 1]
    return "they differ in " + "; ".join(f"{k} ({' vs '.join(str(recorded[fp].get(k)) for fp in fps)})" for k in differ)


def _config_diff(groups: dict[str, list[Row]]) -> str:
    firsts = [rows[0] for rows in groups.values()]
    fields = {"scope": [r.get("scope") for r in firsts]}
    for key in sorted({k for r in firsts for k in (r.get("params") or {})}):
        fields[f"params.{key}"] = [(r.get("params") or {}).get(key) for r in firsts]
    differ = [f"{k} {' vs '.join(str(v) for v in values)}" for k, values in fields.items()
              if len(set(map(repr, values))) > 1]
    return "; ".join(differ) if differ else "hyper-parameters, scope or data differ"
