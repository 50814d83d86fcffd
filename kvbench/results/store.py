"""Results on disk: one append-only jsonl per (run config, task), rows keyed by sample id, resumable.

Layout (results/README.md documents it for users):
    <root>/<model>/<task>/<method>__<budget>__<scope>__<config fp>[.shard-<i>-of-<n>].jsonl
    <root>/<model>/manifests/<utc time>-<run id>.json

Every line is one complete scored row. Appends are flushed and fsynced; a torn last line (a crash in the
middle of a write) is ignored when reading and cut off before the next append, so the sample is redone.
An OS lock per result file (kvbench.results.lock) stops two processes from writing it at once.

Test hook: KVBENCH_TEST_SLOW_WRITE=<seconds> makes ResultFile.append write half a line, sync, sleep that long
and then write the rest, so a test can kill a run in the middle of a write (tests/test_reliability.py)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import InputError
from kvbench.results.lock import FileLock, LockedError  # noqa: F401 (LockedError: part of store's interface)

SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def safe_name(text: str) -> str:
    """A file-system-safe name: no separators, no '..', nothing but [A-Za-z0-9._-]."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return slug or "unnamed"


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @staticmethod
    def parse(text: str | None) -> Shard:
        if not text:
            return Shard()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or int(match.group(2)) < 1 or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise InputError(f"--shard must be i/n with 0 <= i < n, got '{text}'")
        return Shard(int(match.group(1)), int(match.group(2)))

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def owns(self, position: int) -> bool:
        return position % self.count == self.index


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of one result file; a torn or corrupt line is skipped (its sample will be redone). A line
    is complete only with its newline: a last line without one is a write in progress or cut by a crash."""
    rows = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return rows
    for line in data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and "_id" in row:
            rows.append(row)
    return rows


class ResultFile:
    """Append-only writer for one result file."""

    def __init__(self, path: Path, wait: bool = False):
        self.path = path
        self.lock = FileLock(path, wait=wait)

    def open(self) -> set[str]:
        """Take the lock, repair a torn tail, and return the ids already done."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self._cut_torn_tail()
        return self.done()

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())

    def done(self) -> set[str]:
        """Ids already written, read without the lock and without creating anything."""
        return {row["_id"] for row in read_rows(self.path)}

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")
        new = not self.path.exists()
        slow = float(os.environ.get("KVBENCH_TEST_SLOW_WRITE") or 0)  # test hook, see the module docstring
        with open(self.path, "ab") as handle:
            if slow > 0:
                handle.write(line[: len(line) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                time.sleep(slow)
                line = line[len(line) // 2:]
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            _fsync_dir(self.path.parent)

    def close(self) -> None:
        self.lock.release()


def result_path(root: Path, model: str, task: str, method_label: str, budget_label: str, scope: str,
                config_fp: str, shard: Shard) -> Path:
    name = f"{safe_name(method_label)}__{budget_label}__{scope}__{config_fp}{shard.suffix}.jsonl"
    return root / safe_name(model) / safe_name(task) / name


def _fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def iter_result_files(root: Path) -> Iterator[Path]:
    if not root.exists():
        raise InputError(f"results directory not found: {root}")
    yield from sorted(p for p in root.rglob("*.jsonl") if "manifests" not in p.parts)


def load_all_rows(root: Path) -> list[dict[str, Any]]:
    """Every row under root, shards merged; a sample that appears twice for one config (two shards that
    overlapped, a copied file) counts once."""
    seen: set[tuple[str, str, str]] = set()
    rows = []
    for path in iter_result_files(root):
        for row in read_rows(path):
            key = (row.get("config_fp", ""), row.get("task", ""), row["_id"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
    return rows
