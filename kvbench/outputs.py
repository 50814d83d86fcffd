"""Checks that an output location can be written, made before any work starts, so that a command never
computes for minutes and then fails to save what it computed. They leave nothing behind: the only write is a
probe file in the nearest existing directory, removed at once. A probe, not os.access: as root, access() says
yes to /proc and to a chmod 555 folder, where creating a file still fails."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from kvbench.errors import InputError


def _error(flag: str, message: str) -> InputError:
    """`flag` is a CLI flag, or an option's `{field}` placeholder (kvbench.errors) that each front end spells."""
    placeholder = flag.startswith("{") and flag.endswith("}")
    return InputError(message, options=(flag[1:-1],) if placeholder else ())


def check_dir(path: Path, flag: str, probe: bool = True) -> None:
    """`path` is, or can be created as, a directory where files can be written. `probe=False` checks only
    that nothing on the way is a file (for callers that may turn out to have nothing to write)."""
    where = _existing_ancestor(path, flag, want_dir=True)
    if probe:
        _probe(where, path, flag)


def check_file(path: Path, flag: str) -> None:
    """`path` is a file that can be written (replaced) or created, with its missing folders."""
    if path.is_dir():
        raise _error(flag, f"{flag} {path} is a directory; give a file name")
    _probe(_existing_ancestor(path.parent, flag, want_dir=False, target=path), path, flag)


def _existing_ancestor(path: Path, flag: str, want_dir: bool, target: Path | None = None) -> Path:
    """The nearest existing directory at or above `path`; an existing non-directory on the way is an error."""
    target = target or path
    current = path
    while True:
        try:
            mode = current.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a file: look further up
            if current.parent == current:
                raise _error(flag, f"{flag} {target}: no existing folder above it") from None
            current = current.parent
            continue
        except OSError as exc:
            raise _error(flag, f"{flag} {target}: cannot check {current} ({exc.strerror or exc})") from None
        if stat.S_ISDIR(mode):
            return current
        if want_dir and current == path:
            raise _error(flag, f"{flag} {path} exists and is not a directory")
        raise _error(flag, f"{flag} {target}: {current} is a file, not a directory")


def _probe(directory: Path, target: Path, flag: str) -> None:
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".kvbench-write-check-")
    except OSError as exc:
        raise _error(
            flag, f"{flag} {target} is not writable: cannot create a file in {directory} ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(name)
