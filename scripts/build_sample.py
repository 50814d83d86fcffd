"""Rebuild kvbench's embedded LongBench sample (kvbench/tasks/longbench-sample/) from ../shared/longbench.

For each of the 21 LongBench v1 tasks it takes the PER_TASK records with the smallest official `length`
(ties: `_id`) and copies their jsonl lines byte for byte, shortest first, so `--limit 1` reads the shortest
record. A record found both in an official file (../shared/longbench/<task>.jsonl) and in MiniLongBench
(byte-identical there, see its README step 3) is credited to the official file. manifest.json records, per
line, its source file and line number, its sha256, and MiniLongBench's own provenance entry.
tests/test_sample.py checks every line against its source when ../shared is present.

    .venv/bin/python scripts/build_sample.py [--shared ../shared/longbench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "kvbench" / "tasks" / "longbench-sample"
PER_TASK = 3
# Where the copies in ../shared/longbench come from (their READMEs give the evidence).
OFFICIAL = ("THUDM/LongBench v1 data.zip, as copied byte for byte in Zefan-Cai/KVCache-Factory "
            "@c97f9d706d63d1b56e980f8b81b2a924c21162b3 data/LongBench/<task>.jsonl")
MINI = ("MilkThink-Lab/MiniLongBench @504c24798b2f1bcf57d9e111251fd0f5454ed751 pred_data/example/"
        "MiniLongBench_<task>.json, rebuilt as a LongBench v1 record (shared/longbench/minilongbench/README.md)")


def candidates(shared: Path) -> dict[str, list[dict]]:
    """Every record per task: (line bytes, source path relative to `shared`, line number, parsed record)."""
    mini_manifest = {e["_id"]: e for e in json.loads((shared / "minilongbench" / "manifest.json").read_text())}
    files = sorted(shared.glob("*.jsonl")) + sorted((shared / "minilongbench").glob("*.jsonl")) \
        + sorted((shared / "minilongbench" / "opencompass_template").glob("*.jsonl"))
    found: dict[str, dict[bytes, dict]] = {}
    for path in files:  # official files first: a line seen there keeps that provenance
        task = path.stem
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if not line.strip() or line in found.setdefault(task, {}):
                continue
            record = json.loads(line)
            official = path.parent == shared
            found[task][line] = {
                "line": line, "record": record, "source": str(path.relative_to(shared)), "line_number": number,
                "upstream": OFFICIAL if official else MINI,
                "minilongbench": None if official else mini_manifest.get(record["_id"]),
            }
    return {task: list(lines.values()) for task, lines in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "longbench")
    args = parser.parse_args()
    found = candidates(args.shared)
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = []
    for task in sorted(found):
        chosen = sorted(found[task], key=lambda c: (c["record"]["length"], c["record"]["_id"]))[:PER_TASK]
        (OUT / f"{task}.jsonl").write_bytes(b"".join(c["line"] + b"\n" for c in chosen))
        for position, c in enumerate(chosen, 1):
            manifest.append({
                "task": task, "line": position, "_id": c["record"]["_id"], "length": c["record"]["length"],
                "sha256": hashlib.sha256(c["line"]).hexdigest(), "source": f"shared/longbench/{c['source']}",
                "source_line": c["line_number"], "upstream": c["upstream"].replace("<task>", task),
                "minilongbench": c["minilongbench"],
            })
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(manifest)} records of {len(found)} tasks in {OUT}")


if __name__ == "__main__":
    main()
