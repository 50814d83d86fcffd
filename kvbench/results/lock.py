"""One writer per file: an exclusive OS lock (`filelock`, flock on POSIX) on `<file>.lock`, and the holder's
"pid host" in `<file>.lock.pid` so a refused writer can say which process holds it.

Invariants:
- The OS drops the lock when its process ends, however it ends (SIGKILL included): no lock is ever stale, so
  nothing detects or takes over dead holders.
- `<file>.lock` stays after release: a waiter blocks on that inode, and deleting the file would let a third
  process lock a new inode of the same name while the waiter gets the old one.
- `<file>.lock.pid` is written right after acquiring and removed before releasing. A killed holder leaves it
  behind, so it is believed only while the lock is actually held and only when it names a live process.

Advisory: it keeps kvbench processes apart, not other programs. On a file system without flock, filelock falls
back to its own soft lock (with a warning)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import filelock

from kvbench.errors import KvbenchError


class LockedError(KvbenchError):
    pass


class FileLock:
    """Exclusive lock for writing `target`. `wait`: block until free instead of refusing; `on_wait` hears one
    line when that happens."""

    def __init__(self, target: Path, wait: bool = False, poll: float = 0.2,
                 on_wait: Callable[[str], None] | None = None):
        self.target = target
        self.path = target.with_name(target.name + ".lock")
        self.pid_path = target.with_name(target.name + ".lock.pid")
        self.wait, self.poll, self.on_wait = wait, poll, on_wait
        self._lock: filelock.BaseFileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def check(self) -> None:
        """Refuse now if another process holds the lock and we are not to wait; creates nothing."""
        if self.wait or not self.path.exists():
            return
        probe = filelock.FileLock(str(self.path))
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            raise self._locked() from None
        probe.release()

    def acquire(self) -> None:
        lock = filelock.FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if not self.wait:
                raise self._locked() from None
            if self.on_wait is not None:
                self.on_wait(f"{self.target} is being written by {self.holder()}; waiting for it")
            lock.acquire(timeout=-1, poll_interval=self.poll)
        self._lock = lock
        tmp = self.pid_path.with_name(f".{self.pid_path.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}")
        os.replace(tmp, self.pid_path)  # a reader sees the old holder's line or ours, never half of one

    def release(self) -> None:
        if self._lock is not None:
            self.pid_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder(self, patience: float = 1.0) -> str:
        """Who holds the lock, as 'process PID on HOST' (or 'another process'). A new holder writes its line
        just after locking: a line naming a dead process of this host is a killed holder's, so wait a little
        for the new one."""
        deadline = time.monotonic() + patience
        while True:
            try:
                pid_text, host = self.pid_path.read_text().split()
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = None, ""
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                return f"process {pid} on {host}"
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.05)

    def _locked(self) -> LockedError:
        return LockedError(f"{self.target} is being written by {self.holder()}; use {{wait}} to wait for it",
                           options=("wait",))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
