"""Sample sources: the official jsonl reader and its errors, a local directory, the hub archive (with an
injected download), and the deterministic synthetic generator."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from kvbench.data import Hub, LocalDir, Synthetic, load_task_specs, make_synthetic, read_jsonl
from kvbench.errors import InputError
from kvbench.resources import load_yaml, tasks_path

SPECS = load_task_specs()


def row(i: int, **override) -> dict:
    base = {"input": f"q{i}", "context": f"ctx {i}", "answers": [f"a{i}"], "length": 10 + i, "dataset": "hotpotqa",
            "language": "en", "all_classes": None, "_id": f"id{i}"}
    base.update(override)
    return base


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- read_jsonl ------------------------------------------------------------------------------------------------
def test_read_jsonl_reads_official_fields_in_order(tmp_path):
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [json.dumps(row(0)), "", json.dumps(row(1, all_classes=["x", "y"]))])
    samples = list(read_jsonl(path, "hotpotqa"))
    assert [s.id for s in samples] == ["id0", "id1"]
    first = samples[0]
    assert (first.task, first.input, first.context, first.answers, first.length, first.all_classes, first.language) == (
        "hotpotqa", "q0", "ctx 0", ("a0",), 10, None, "en")
    assert samples[1].all_classes == ("x", "y")
    assert [s.id for s in read_jsonl(path, "hotpotqa", limit=1)] == ["id0"]
    assert list(read_jsonl(path, "hotpotqa", limit=0)) == []


def test_broken_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps(row(0)), json.dumps(row(1)), '{"input": "x", "cont'])
    with pytest.raises(InputError) as info:
        list(read_jsonl(path, "t"))
    assert f"{path}:3" in str(info.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = row(1)
    del bad["answers"]
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps(row(0)), json.dumps(bad)])
    with pytest.raises(InputError) as info:
        list(read_jsonl(path, "t"))
    assert f"{path}:2" in str(info.value) and "answers" in str(info.value)


@pytest.mark.parametrize(
    "override, word",
    [({"answers": "not a list"}, "answers"), ({"all_classes": "x"}, "all_classes"), ({"length": "long"}, "length")],
)
def test_bad_field_types(tmp_path, override, word):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps(row(0, **override))])
    with pytest.raises(InputError, match=re.escape(f"{path}:1") + f".*{word}"):
        list(read_jsonl(path, "t"))


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ["[1, 2]"])
    with pytest.raises(InputError, match=re.escape(f"{path}:1")):
        list(read_jsonl(path, "t"))


# ---- LocalDir ----------------------------------------------------------------------------------------------------
def test_local_dir_missing(tmp_path):
    with pytest.raises(InputError, match="not found"):
        LocalDir(tmp_path / "nope")


def test_local_dir_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(InputError, match="no .jsonl"):
        LocalDir(tmp_path)


def test_local_dir_is_a_file(tmp_path):
    file = tmp_path / "x.jsonl"
    file.write_text("")
    with pytest.raises(InputError):
        LocalDir(file)


def test_local_dir_reads_and_reports_missing_task(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [json.dumps(row(0))])
    source = LocalDir(tmp_path)
    assert source.available(SPECS["hotpotqa"]) and not source.available(SPECS["musique"])
    assert [s.id for s in source.samples(SPECS["hotpotqa"])] == ["id0"]
    with pytest.raises(InputError, match="musique"):
        source.samples(SPECS["musique"])
    assert source.identity(SPECS["hotpotqa"]).startswith("file-sha256:")


def test_local_dir_identity_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [json.dumps(row(0))])
    before = LocalDir(tmp_path).identity(SPECS["hotpotqa"])
    write_jsonl(path, [json.dumps(row(0, answers=["changed"]))])
    assert LocalDir(tmp_path).identity(SPECS["hotpotqa"]) != before


def test_shared_longbench_reads(shared_longbench):
    source = LocalDir(shared_longbench)
    samples = list(source.samples(SPECS["passage_retrieval_zh"], limit=3))
    assert len(samples) == 3 and all(re.fullmatch(r"段落\d+", s.answers[0]) for s in samples)
    assert all(len(s.id) == 48 for s in samples)


# ---- Hub with an injected download -------------------------------------------------------------------------------
def make_zip(path: Path, tasks: dict[str, list[dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/", "")
        for task, rows in tasks.items():
            zf.writestr(f"data/{task}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        zf.writestr("data/.hidden.jsonl", "garbage")
        zf.writestr("README.md", "not data")
    return path


def test_hub_unpacks_and_records_the_resolved_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    archive = make_zip(tmp_path / "hf" / "snapshots" / commit / "data.zip",
                       {"hotpotqa": [row(0), row(1)], "trec": [row(2, all_classes=["A", "B"])]})
    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    hub = Hub(tmp_path / "cache", revision="main", download=download)
    assert calls == [{"repo_id": "THUDM/LongBench", "filename": "data.zip", "repo_type": "dataset", "revision": "main"}]
    assert hub.resolved == commit
    assert [s.id for s in hub.samples(SPECS["hotpotqa"])] == ["id0", "id1"]
    assert next(hub.samples(SPECS["trec"])).all_classes == ("A", "B")
    assert sorted(p.name for p in hub.root.iterdir() if not p.name.startswith(".")) == ["hotpotqa.jsonl", "trec.jsonl"]
    assert hub.identity(SPECS["hotpotqa"]).startswith(f"hub:THUDM/LongBench@{commit[:12]}:")

    # Second open: already unpacked, no download.
    again = Hub(tmp_path / "cache", revision="main", download=lambda **kw: pytest.fail("downloaded twice"))
    assert again.resolved == commit


def test_hub_outside_a_snapshot_records_the_revision(tmp_path):
    archive = make_zip(tmp_path / "plain" / "data.zip", {"hotpotqa": [row(0)]})
    hub = Hub(tmp_path / "cache", revision="v1.0", download=lambda **kw: str(archive))
    assert hub.resolved == "v1.0"


def test_hub_never_writes_outside_its_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escape.jsonl", json.dumps(row(0)) + "\n")
        zf.writestr("/abs/hotpotqa.jsonl", json.dumps(row(1)) + "\n")
    hub = Hub(tmp_path / "cache", download=lambda **kw: str(archive))
    assert sorted(p.name for p in hub.root.glob("*.jsonl")) == ["escape.jsonl", "hotpotqa.jsonl"]
    assert not (tmp_path / "escape.jsonl").exists() and not (tmp_path.parent / "escape.jsonl").exists()


def test_hub_bad_zip(tmp_path):
    bad = tmp_path / "data.zip"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(InputError, match="not a zip"):
        Hub(tmp_path / "cache", download=lambda **kw: str(bad))


def test_hub_download_failure_is_an_input_error(tmp_path):
    def offline(**kwargs):
        raise ConnectionError("no network")

    with pytest.raises(InputError, match="data_dir="):
        Hub(tmp_path / "cache", download=offline)


# ---- Synthetic --------------------------------------------------------------------------------------------------
SYNTHETIC = [n for n, s in SPECS.items() if s.synthetic]
SYN_CONFIG = load_yaml(tasks_path("synthetic.yaml"))["tasks"]


def needle_regex(template: str) -> re.Pattern:
    """The needle template with {key} and {value} turned into groups (value: the generator's 5-digit ints)."""
    pattern = re.escape(template).replace(re.escape("{key}"), "(?P<key>.+?)")
    first = pattern.replace(re.escape("{value}"), "(?P<value>\\d{5})", 1)
    return re.compile(first.replace(re.escape("{value}"), "(?P=value)"))


@pytest.mark.parametrize("task", SYNTHETIC)
def test_synthetic_is_deterministic(task):
    spec = SPECS[task]
    entry = SYN_CONFIG[task]
    a = make_synthetic(spec, entry, 3, 300, 7)
    assert make_synthetic(spec, entry, 3, 300, 7) == a
    assert make_synthetic(spec, entry, 4, 300, 7) != a
    assert make_synthetic(spec, entry, 3, 300, 8) != a
    assert list(Synthetic(300, seed=7).samples(spec, limit=5))[3] == a
    assert len({s.id for s in Synthetic(300, seed=7).samples(spec)}) == 20


@pytest.mark.parametrize("task", SYNTHETIC)
def test_synthetic_needles_sit_at_their_evidence_spans(task):
    spec = SPECS[task]
    entry = SYN_CONFIG[task]
    for index in range(5):
        s = make_synthetic(spec, entry, index, 400, 0)
        spans = s.meta("evidence_char_spans")
        assert len(spans) == int(entry.get("needles", 1))
        assert list(spans) == sorted(spans)
        keys, values = [], []
        for start, end in spans:
            match = needle_regex(entry["needle"]).fullmatch(s.context[start:end])
            assert match, s.context[start:end]
            values.append(match.group("value"))
            keys.append(match.groupdict().get("key"))
        assert s.answers == (", ".join(values),)
        for value in values:  # each value occurs only inside its needle (the filler has no digits)
            assert s.context.count(value) == entry["needle"].count("{value}")
        if len(spans) > 1:
            sep = ", " if spec.language == "en" else "、"
            assert sep.join(keys) in s.input  # the question asks for the keys in context order
        # Length in LongBench units: words (en) or characters (zh), about the requested length.
        units = len(s.context.split()) if spec.language == "en" else len(s.context)
        assert s.length == units and units >= 400


def test_synthetic_rejects_tiny_lengths():
    with pytest.raises(InputError):
        Synthetic(10)
