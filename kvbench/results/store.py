"""Results on disk: one append-only jsonl per (run config, task), rows keyed by sample id, resumable.

Layout (results/README.md documents it for users):
    <root>/<model>/<task>/<method>__<budget>__<scope>__<config fp>[.shard-<i>-of-<n>].jsonl
    <root>/<model>/manifests/<utc time>-<run id>.json

Every line is one complete scored row. Appends are flushed and fsynced; a torn last line (a crash in the
middle of a write) is ignored when reading and cut off before the next append, so the sample is redone.
A lock file next to each result file stops two processes from writing it at once.

Test hook: KVBENCH_TEST_SLOW_WRITE=<seconds> makes ResultFile.append write half a line, sync, sleep that long
and then write the rest, so a test can kill a run in the middle of a write (tests/test_reliability.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import InputError, KvbenchError
from kvbench.models import safe_name

SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def digest(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


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


class LockedError(KvbenchError):
    pass


class FileLock:
    """An exclusive lock file holding 'pid host'. A lock whose process is gone (same host) is taken over;
    the take-over itself is serialised by a second O_EXCL file, so two processes finding the same stale lock
    cannot both end up holding it."""

    def __init__(self, path: Path, wait: bool = False, poll: float = 0.5):
        self.path = path.with_name(path.name + ".lock")
        self.wait, self.poll = wait, poll
        self.held = False

    def _holder(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _stale(self, holder: tuple[int, str] | None) -> bool:
        """The holder's process is gone (same host only), or the lock stayed empty (a crash while creating it)."""
        if holder is None:
            return time.time() - self._mtime(self.path) > 5
        return holder[1] == socket.gethostname() and not self._alive(holder[0])

    def _take_over(self, holder: tuple[int, str] | None) -> None:
        """Remove a stale lock, unless another process took it over (or is doing so) meanwhile."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            if time.time() - self._mtime(guard) > 10:  # its creator died inside the few lines below
                guard.unlink(missing_ok=True)
            time.sleep(0.05)
            return
        try:
            if self._holder() == holder and self._stale(holder):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def check(self) -> None:
        """Refuse now, creating nothing, if a live process holds the lock and we are not to wait."""
        if self.wait or not self.path.exists():
            return
        holder = self._holder()
        if not self._stale(holder):
            raise self._locked(holder)

    def _locked(self, holder: tuple[int, str] | None) -> LockedError:
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        return LockedError(
            f"{self.path.with_suffix('')} is being written by {who}; use {{wait}} to wait for it "
            f"(or delete {self.path.name} if that process is gone)", options=("wait",)
        )

    def acquire(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as handle:
                    handle.write(me)
                self.held = True
                return
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self._take_over(holder)
                    continue
                if not self.wait:
                    raise self._locked(holder) from None
                time.sleep(self.poll)

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return time.time()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


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
