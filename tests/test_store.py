"""The result store: append-only rows, torn tails, the OS lock and its holder line, shard parsing and merging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kvbench.errors import InputError
from kvbench.results.store import FileLock, LockedError, ResultFile, Shard, load_all_rows, read_rows, result_path


def row(i: int, **extra) -> dict:
    return {"_id": f"id{i}", "task": "hotpotqa", "config_fp": "cfgA", "score": i / 10, "prediction": f"答案 {i}", **extra}


def test_append_read_round_trip(tmp_path):
    path = tmp_path / "m" / "t" / "r.jsonl"
    file = ResultFile(path)
    assert file.open() == set()
    rows = [row(0), row(1, nested={"a": [1, 2]}), row(2)]
    for r in rows:
        file.append(r)
    file.close()
    assert read_rows(path) == rows
    assert path.read_bytes().count(b"\n") == 3
    reopened = ResultFile(path)
    assert reopened.open() == {"id0", "id1", "id2"}
    reopened.close()


def test_read_rows_of_a_missing_file_is_empty(tmp_path):
    assert read_rows(tmp_path / "none.jsonl") == []


def test_torn_tail_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = json.dumps(row(0)) + "\n" + json.dumps(row(1)) + "\n"
    torn = json.dumps(row(2))[:25]  # half a line, no newline: a crash mid-write
    path.write_text(whole + torn, encoding="utf-8")
    assert [r["_id"] for r in read_rows(path)] == ["id0", "id1"]

    file = ResultFile(path)
    assert file.open() == {"id0", "id1"}  # id2 will be redone
    assert path.read_text(encoding="utf-8") == whole  # the torn bytes are gone
    file.append(row(2))
    file.close()
    assert [r["_id"] for r in read_rows(path)] == ["id0", "id1", "id2"]
    assert path.read_text(encoding="utf-8").splitlines()[2] == json.dumps(row(2), ensure_ascii=False)


def test_torn_line_that_happens_to_parse_is_still_cut(tmp_path):
    # A line cut right after a complete nested value can be valid JSON without "_id": it is not a row.
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + '{"task": "x"}', encoding="utf-8")
    assert [r["_id"] for r in read_rows(path)] == ["id0"]
    file = ResultFile(path)
    file.open()
    file.append(row(1))
    file.close()
    assert [json.loads(line)["_id"] for line in path.read_text().splitlines()] == ["id0", "id1"]


def test_complete_json_without_newline_is_not_a_row(tmp_path):
    # The writer may have written the JSON but not yet its newline: not done until the newline is there.
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)), encoding="utf-8")
    assert [r["_id"] for r in read_rows(path)] == ["id0"]
    file = ResultFile(path)
    assert file.open() == {"id0"}
    file.close()
    assert path.read_text(encoding="utf-8") == json.dumps(row(0)) + "\n"


def test_corrupt_middle_line_is_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(row(0)).encode() + b"\n\xff\xfe not json\n" + json.dumps(row(1)).encode() + b"\n")
    assert [r["_id"] for r in read_rows(path)] == ["id0", "id1"]


def test_second_lock_names_the_holder(tmp_path):
    path = tmp_path / "r.jsonl"
    first = FileLock(path)
    first.acquire()
    try:
        assert first.pid_path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(LockedError, match=rf"^{path} is being written by process {os.getpid()} on .*use wait= to wait"):  # the API spelling of {wait}
            FileLock(path).acquire()
        with pytest.raises(LockedError):
            ResultFile(path).open()
    finally:
        first.release()
    assert not first.pid_path.exists()
    second = FileLock(path)
    second.acquire()  # free again after release
    second.release()


def test_check_refuses_a_live_holder_without_creating_anything(tmp_path):
    path = tmp_path / "r.jsonl"
    FileLock(path).check()  # no lock yet: fine
    assert list(tmp_path.iterdir()) == []
    holder = FileLock(path)
    holder.acquire()
    try:
        before = sorted(tmp_path.iterdir())
        with pytest.raises(LockedError, match=str(os.getpid())):
            FileLock(path).check()
        FileLock(path, wait=True).check()  # a waiting writer is not refused up front
        assert sorted(tmp_path.iterdir()) == before
    finally:
        holder.release()
    FileLock(path).check()  # released: fine


HOLD = """
import sys, time
from pathlib import Path
from kvbench.results.lock import FileLock
lock = FileLock(Path(sys.argv[1]))  # kept referenced: a collected lock is released
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = _holder(path, 60)
    try:
        with pytest.raises(LockedError, match=f"process {proc.pid} on {socket.gethostname()}"):
            FileLock(path).check()
    finally:
        proc.kill()
        proc.wait()
    assert FileLock(path).pid_path.exists()  # what SIGKILL leaves: the dead holder's line, no live lock
    FileLock(path).check()
    lock = FileLock(path)
    lock.acquire()
    assert lock.pid_path.read_text().split()[0] == str(os.getpid())
    lock.release()


def test_wait_blocks_until_the_holder_ends(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = _holder(path, 1.0)
    heard: list[str] = []
    lock = FileLock(path, wait=True, on_wait=heard.append)
    start = time.monotonic()
    lock.acquire()
    assert time.monotonic() - start > 0.5  # it got the lock only when the holder ended (1 s after 'held')
    assert proc.wait(timeout=10) == 0
    assert heard == [f"{path} is being written by process {proc.pid} on {socket.gethostname()}; waiting for it"]
    lock.release()
    proc.wait()


def test_a_dead_holders_line_is_not_believed(tmp_path):
    """Between locking and writing its line, a new holder shows the line a killed one left: never name a dead
    process."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "r.jsonl"
    lock = FileLock(path)
    lock.pid_path.write_text(f"{dead.pid} {socket.gethostname()}")
    assert lock.holder(patience=0.1) == "another process"
    lock.pid_path.write_text("1 some-other-host")  # another machine's process: cannot tell, so believed
    assert lock.holder(patience=0.1) == "process 1 on some-other-host"


@pytest.mark.parametrize("text, expected", [("0/2", Shard(0, 2)), ("1/2", Shard(1, 2)), (" 3 / 4 ", Shard(3, 4)),
                                            (None, Shard(0, 1)), ("", Shard(0, 1))])
def test_shard_parse_ok(text, expected):
    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["2/2", "a/b", "1/0", "0/0", "-1/2", "1", "1/2/3"])
def test_shard_parse_bad(text):
    with pytest.raises(InputError, match="--shard"):
        Shard.parse(text)


def test_shard_owns_every_nth():
    shards = [Shard(i, 3) for i in range(3)]
    assert [[p for p in range(8) if s.owns(p)] for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Shard(1, 3).suffix == ".shard-1-of-3" and Shard().suffix == ""


def test_result_path_layout_and_safe_names(tmp_path):
    path = result_path(tmp_path, "smollm2-135m", "multi_news", "snapkv", "r0.1", "full", "abc123", Shard(1, 2))
    assert path == tmp_path / "smollm2-135m" / "multi_news" / "snapkv__r0.1__full__abc123.shard-1-of-2.jsonl"
    evil = result_path(tmp_path, "../../etc", "a/b", "../x", "r0.1", "full", "fp", Shard())
    assert evil.resolve().is_relative_to(tmp_path.resolve())
    assert ".." not in evil.relative_to(tmp_path).parts


def test_load_all_rows_merges_shards_and_drops_duplicates(tmp_path):
    folder = tmp_path / "m" / "hotpotqa"
    folder.mkdir(parents=True)
    shard0 = folder / "snapkv__r0.1__full__cfgA.shard-0-of-2.jsonl"
    shard1 = folder / "snapkv__r0.1__full__cfgA.shard-1-of-2.jsonl"
    shard0.write_text("".join(json.dumps(row(i)) + "\n" for i in (0, 2, 4)))
    # shard 1 overlaps on id2 (a re-split run) and has a torn tail
    shard1.write_text("".join(json.dumps(row(i)) + "\n" for i in (1, 2, 3)) + '{"_id": "id9", "ta')
    other = tmp_path / "m" / "hotpotqa" / "h2o__r0.1__full__cfgB.jsonl"
    other.write_text(json.dumps(row(2, config_fp="cfgB")) + "\n")  # same sample, other config: kept
    manifests = tmp_path / "m" / "manifests"
    manifests.mkdir()
    (manifests / "run.jsonl").write_text(json.dumps(row(7)) + "\n")  # not results
    rows = load_all_rows(tmp_path)
    keys = sorted((r["config_fp"], r["_id"]) for r in rows)
    assert keys == [("cfgA", f"id{i}") for i in range(5)] + [("cfgB", "id2")]


def test_load_all_rows_missing_root(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_all_rows(tmp_path / "nope")
