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
from kvbench.results.schema import digest  # noqa: F401 (store.digest: the sensitivity study keys its rows with it)

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


@dataclass(frozen=True)
class Skipped:
    """A line of a result file that holds no usable row."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.reason})"


def scan_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Skipped]]:
    """(line number, row) of the complete rows of one result file, and the lines skipped with why. A line is
    complete only with its newline: a last line without one is a write in progress or cut by a crash. A file
    of JSON objects none of which has an `_id` is not a result file (e.g. a sensitivity study's kl_raw.jsonl
    under the same folder): no rows, nothing skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    rows: list[tuple[int, dict[str, Any]]] = []
    skipped: list[Skipped] = []
    objects = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))  # str, not bytes: json would sniff each line's encoding
        except (json.JSONDecodeError, UnicodeDecodeError):
            skipped.append(Skipped(path, number, "not JSON"))
            continue
        if not isinstance(row, dict):
            skipped.append(Skipped(path, number, "not a JSON object"))
        elif "_id" not in row:
            objects += 1
            skipped.append(Skipped(path, number, "no _id"))
        else:
            rows.append((number, row))
    if not rows and objects:
        return [], []
    if lines[-1].strip():
        skipped.append(Skipped(path, len(lines), "incomplete last line: a write in progress, or cut by a crash"))
    return rows, skipped


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of one result file; a torn or corrupt line is skipped (its sample will be redone)."""
    return [row for _, row in scan_rows(path)[0]]


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


def iter_result_files(root: Path, flag: str = "--results") -> Iterator[Path]:
    """The .jsonl files under root (manifests aside); `flag` names root in errors (an option or argument)."""
    if not root.exists():
        raise InputError(f"results directory not found: {root}")
    if not root.is_dir():
        raise InputError(f"{flag} {root} is not a directory (give the folder that `kvbench run --results` wrote)")
    yield from sorted(p for p in root.rglob("*.jsonl") if "manifests" not in p.parts)


@dataclass
class ResultSet:
    """Every row under a results folder (shards merged, duplicates dropped), where each came from, and the lines
    that held no row."""

    root: Path
    rows: list[dict[str, Any]]
    skipped: list[Skipped]
    origins: dict[int, tuple[Path, int]]  # id(row) -> (file, line)

    def origin(self, row: dict[str, Any]) -> tuple[Path, int] | None:
        return self.origins.get(id(row))


def load_results(root: Path, flag: str = "--results") -> ResultSet:
    """Every row under root, shards merged; a sample that appears twice for one config (two shards that
    overlapped, a copied file) counts once."""
    seen: set[tuple[str, str, str]] = set()
    loaded = ResultSet(root, [], [], {})
    for path in iter_result_files(root, flag):
        rows, skipped = scan_rows(path)
        loaded.skipped += skipped
        for number, row in rows:
            key = (row.get("config_fp", ""), row.get("task", ""), row["_id"])
            if key in seen:
                continue
            seen.add(key)
            loaded.rows.append(row)
            loaded.origins[id(row)] = (path, number)
    return loaded


def load_all_rows(root: Path) -> list[dict[str, Any]]:
    """load_results(root).rows."""
    return load_results(root).rows


def manifest_protocols(root: Path) -> dict[str, dict[str, Any]]:
    """protocol fingerprint -> the protocol fields its runs' manifests record (for saying what differs)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob("*/manifests/*.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            out.setdefault(str(manifest["protocol_fp"]), dict(manifest["protocol"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a manifest is an aid to the message, never required
    return out
