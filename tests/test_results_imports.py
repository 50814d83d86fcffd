"""Reading results never loads torch or transformers: `kvbench table`, `score` and `compare` run in a fresh
interpreter under `-X importtime`, and no imported module belongs to either package (they cost seconds to
import, and a table must work where only the results are)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "accelerate", "gguf", "safetensors")
STAMP = {"name": "chunkkv-table17", "granularity": "query_head", "overrides": {"model": "m"}}


def write_results(root: Path, task: str = "hotpotqa", recipe: dict | None = None) -> Path:
    """FullKV and SnapKV rows of one task, 3 samples each; with `recipe` (a stamp) as `kvbench run --recipe`
    writes them: stamped, scope full, snapkv at the recipe's query_head."""
    for method, budget in (("fullkv", "full"), ("snapkv", "r0.1")):
        path = root / "m" / task / f"{method}__{budget}__full__c{method}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        stamped = {} if recipe is None else {
            "scope": "full", "granularity": "query_head" if method == "snapkv" else "kv_head", "recipe": recipe}
        rows = [{"_id": f"s{i}", "task": task, "model": "m", "method": method, "budget": budget,
                 "score": i / 4, "length": 100, "protocol_fp": "p", "task_fp": "t", "config_fp": f"c{method}",
                 **stamped} for i in range(3)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_predictions(root: Path) -> Path:
    root.mkdir()
    rows = [{"pred": "Paris", "answers": ["Paris"], "all_classes": None}, {"pred": "x", "answers": ["y"], "all_classes": None}]
    (root / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def imported_modules(args: list[str], cwd: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvbench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "kvbench.cli" in names  # the import log is there: an empty set would pass vacuously
    return names


@pytest.mark.parametrize("command", ["table", "table-help", "table-recipe", "score", "compare"])
def test_reading_results_imports_no_torch(command, tmp_path):
    results = write_results(tmp_path / "results")
    args = {
        "table": ["table", "--results", str(results), "--model", "m"],
        "table-help": ["table", "--help"],
        "table-recipe": ["table", "--recipe", "chunkkv-table17", "--results",
                         str(write_results(tmp_path / "recipe-results", "lsht", STAMP))],
        "score": ["score", str(write_predictions(tmp_path / "preds"))],
        "compare": ["compare", str(results), str(results)],
    }[command]
    names = imported_modules(args, tmp_path)
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert heavy == [], f"kvbench {command} imported {heavy[:5]}"


def test_plain_table_starts_without_numpy_or_pydantic(tmp_path):
    """numpy (needed only by LongBench-E buckets and --ci statistics) and pydantic (typer 0.29 coerces options
    through it) were two thirds of a `kvbench table` start; a plain table needs neither (scripts/BENCHMARKS.md)."""
    results = write_results(tmp_path / "results")
    names = imported_modules(["table", "--results", str(results), "--model", "m"], tmp_path)
    assert "kvbench.results.report" in names  # the table was really built
    assert sorted({n.split(".")[0] for n in names} & {"numpy", "pydantic"}) == []
