"""What a study writes besides its raw rows: T1-T4 and summary.md (always), F1-F4 (when matplotlib is
installed), and manifest.json (the plan, every choice, seeds, versions, timings and the analysis; written
atomically, first when measuring starts and again when the study is complete)."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.results.store import write_atomic
from kvbench.studies.sensitivity import figures, tables
from kvbench.studies.sensitivity.fits import Fit


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / "manifest.json"
    write_atomic(path, json.dumps(jsonable(manifest), indent=1) + "\n")
    return path


def write_outputs(out_dir: Path, model: str, a: dict[str, Any], notes: Sequence[str], draw: bool) -> dict[str, str]:
    """Tables (and figures when `draw`) into out_dir; returns {name: path} of what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"raw": str(out_dir / "kl_raw.jsonl")}
    texts = [("T1", tables.table_t1(model, a)), ("T2", tables.table_t2(model, a)), ("T3", tables.table_t3(model, a)),
             ("summary", tables.summary_md(model, a, notes))]
    if a.get("method_scaling"):
        texts.insert(3, ("T4", tables.table_t4(model, a)))
    for name, text in texts:
        write_atomic(out_dir / f"{name}.md", text)
        files[name] = str(out_dir / f"{name}.md")
    if draw:
        drawings = [("F1", figures.figure_f1), ("F2", figures.figure_f2), ("F3", figures.figure_f3)]
        if a.get("method_scaling"):
            drawings.append(("F4", figures.figure_f4))
        for name, fn in drawings:
            fn(out_dir / f"{name}.png", model, a)
            files[name] = str(out_dir / f"{name}.png")
    files["manifest"] = str(out_dir / "manifest.json")
    return files


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Fit):
        return asdict(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


def data_identity(data_dir: Path | None, tasks: str) -> dict[str, Any]:
    """The documents' source: each task file's identity (kvbench.data), so a changed file changes the study's
    fingerprint."""
    if data_dir is None:
        return {}
    from kvbench.data import LocalDir, select_tasks

    source = LocalDir(Path(data_dir))
    return {"data_dir": str(data_dir),
            "tasks": {t.name: source.identity(t) for t in select_tasks(tasks) if source.available(t)}}
