"""The embedded LongBench sample (kvbench/tasks/longbench-sample/): what it holds and where it comes from, when
`kvbench run` uses it, and that it and every YAML kvbench reads ship inside the package."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kvbench import data, resources
from kvbench.data import Embedded, HubUnavailable, load_task_specs, open_source, read_jsonl, select_tasks

SAMPLE = resources.tasks_path(data.SAMPLE_DIR)
V1 = [s for s in load_task_specs().values() if not s.synthetic and not s.longbench_e]


def manifest() -> list[dict]:
    return json.loads((SAMPLE / "manifest.json").read_text())


def test_three_real_records_per_task_shortest_first():
    source = Embedded()
    assert len(V1) == 21
    for task in V1:
        records = list(source.samples(task))
        assert len(records) == 3, task.name
        lengths = [r.length for r in records]
        assert lengths == sorted(lengths), task.name  # --limit 1 takes the shortest
        assert all(r.answers for r in records)
        if task.metric == "classification":
            assert all(r.all_classes for r in records)


def test_manifest_matches_every_line_and_names_its_source():
    entries = manifest()
    assert len(entries) == 63
    for task in V1:
        lines = (SAMPLE / f"{task.name}.jsonl").read_bytes().split(b"\n")[:-1]
        mine = [e for e in entries if e["task"] == task.name]
        assert [e["sha256"] for e in mine] == [hashlib.sha256(line).hexdigest() for line in lines]
        assert [e["_id"] for e in mine] == [json.loads(line)["_id"] for line in lines]
        assert all(e["source"].startswith("shared/longbench/") and e["upstream"] for e in mine)


def test_lines_are_byte_copies_of_the_shared_longbench_files(shared_longbench):
    for entry in manifest():
        source = shared_longbench / Path(entry["source"]).relative_to("shared/longbench")
        line = source.read_bytes().split(b"\n")[entry["source_line"] - 1]
        assert hashlib.sha256(line).hexdigest() == entry["sha256"], entry["task"]


def test_licence_provenance_and_size():
    licence = (SAMPLE / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2023 THU-KEG & Zhipu AI" in licence
    readme = (SAMPLE / "README.md").read_text()
    assert "Zefan-Cai/KVCache-Factory" in readme and "MilkThink-Lab/MiniLongBench" in readme
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 3_000_000


def test_quick_group_is_the_short_english_tasks():
    quick = select_tasks(["quick"])
    assert [t.name for t in quick] == ["multifieldqa_en", "2wikimqa", "multi_news", "samsum", "lcc"]
    assert all(t.language == "en" for t in quick)
    assert len({t.category for t in quick}) == 5
    firsts = [next(Embedded().samples(t, 1)).length for t in quick]
    others = [next(Embedded().samples(t, 1)).length for t in V1 if t not in quick and t.language == "en"]
    assert max(firsts) < 1300 and sorted(others)[3] > 1300  # among the shortest English first records


def test_auto_falls_back_to_the_sample_with_one_notice(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise HubUnavailable("cannot fetch THUDM/LongBench/data.zip@main (test: no network)")

    monkeypatch.setattr(data, "Hub", unreachable)
    notices: list[str] = []
    tasks = select_tasks("multi_news,passkey_en")
    sources = open_source("auto", None, tasks, tmp_path, log=notices.append)
    assert isinstance(sources["multi_news"], Embedded) and isinstance(sources["passkey_en"], data.Synthetic)
    assert len(notices) == 1 and "no network" in notices[0] and "embedded LongBench sample" in notices[0]
    with pytest.raises(HubUnavailable, match="data_dir="):
        open_source("hub", None, tasks, tmp_path)  # asked for the hub: no fallback
    assert isinstance(open_source("sample", None, tasks, tmp_path)["multi_news"], Embedded)


def test_a_cached_hub_is_used_without_network(monkeypatch, tmp_path):
    """auto prefers the hub's data once kvbench has unpacked it, whatever the network."""
    cache = tmp_path / "longbench" / "main"
    cache.mkdir(parents=True)
    (cache / "multi_news.jsonl").write_bytes((SAMPLE / "multi_news.jsonl").read_bytes())
    (cache / ".complete").write_text("0" * 40 + "\n")
    monkeypatch.setattr(data, "_hub_unreachable", lambda: pytest.fail("no network check with a complete cache"))
    source = open_source("auto", None, select_tasks("multi_news"), tmp_path, log=pytest.fail)["multi_news"]
    assert isinstance(source, data.Hub) and source.identity(select_tasks("multi_news")[0]).startswith("hub:")


def test_sample_identity_is_its_bytes():
    """The same bytes read from a --data-dir copy are the same data: one fingerprint."""
    task = select_tasks("lcc")[0]
    assert Embedded().identity(task) == data.LocalDir(SAMPLE).identity(task)
    assert list(read_jsonl(SAMPLE / "lcc.jsonl", "lcc")) == list(Embedded().samples(task))


def test_package_data_is_found_through_importlib_resources():
    package = Path(data.__file__).resolve().parent
    for path in (resources.config_path("models.yaml"), resources.config_path("methods.yaml"),
                 resources.tasks_path("longbench.yaml"), resources.tasks_path("synthetic.yaml"), SAMPLE):
        assert path.exists() and package in path.resolve().parents
    top = package.parent
    # The repository's top-level configs/ and tasks/ hold documentation and examples only.
    assert sorted(p.name for p in (top / "tasks").iterdir()) == ["README.md"]
    assert sorted(p.name for p in (top / "configs").iterdir()) == ["README.md", "presets.example.yaml"]
