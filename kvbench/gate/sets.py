"""The two result sets a gate compares, grouped per (method, budget, task), with the device each row ran on.

A row's device is its `device` field, or for rows written before rows held it, its run's manifest
`device_name` (rows carry their `run_id`; manifests live in `<root>/<model>/manifests/`). Rows with neither
have device None: their timings are never
compared, since "the same device" cannot be established. Fingerprint agreement between the sets is checked by
`kvbench.results.compare.compare_dirs`, which the gate runs first; this module only groups."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.results import store

Key = tuple[str, str, str]  # (method, budget, task)


@dataclass(frozen=True)
class Cell:
    """One (method, budget, task) of one set: its rows by sample id."""

    rows: dict[str, dict[str, Any]]

    @property
    def devices(self) -> frozenset[str | None]:
        return frozenset(row.get("_device") for row in self.rows.values())


@dataclass(frozen=True)
class ResultSet:
    root: Path
    cells: dict[Key, Cell]

    @property
    def devices(self) -> frozenset[str | None]:
        return frozenset(d for cell in self.cells.values() for d in cell.devices)


def _run_devices(root: Path) -> dict[str, str]:
    """run_id -> device name, from every manifest under root."""
    out = {}
    for path in sorted(root.rglob("manifests/*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a manifest torn by a crash: its rows just have no known device
        if isinstance(manifest, dict) and manifest.get("run_id") and manifest.get("device_name"):
            out[str(manifest["run_id"])] = str(manifest["device_name"])
    return out


def load(root: Path) -> ResultSet:
    devices = _run_devices(root)
    cells: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in store.load_all_rows(root):
        cells[(row["method"], row["budget"], row["task"])][row["_id"]] = {
            **row, "_device": row.get("device") or devices.get(str(row.get("run_id")))}
    return ResultSet(root, {key: Cell(rows) for key, rows in cells.items()})


def label(key: Key) -> str:
    return " ".join(key)
