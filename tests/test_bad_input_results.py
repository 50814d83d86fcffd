"""Bad input to the commands that read results (table, plot, compare): a table of cases run through the real entry
point (kvbench.cli.main, in-process): the exit code, the one line that says what is wrong and how to fix it,
no traceback, and nothing written. Then the lines that table and plot skip: counted and named, never silent.
(Bad input to run, data, presets and fetch lives in tests/test_bad_input.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_kvbench


PROTOCOL = {"model_identity": "gguf-sha256:abc", "max_length": 8000, "chat": "template", "dtype": "float32",
            "prompt_rules": "v1", "metrics": "v1", "engine": "engine-v1"}


def row(i: int, task: str = "hotpotqa", method: str = "snapkv", budget: str = "r0.1", **extra) -> dict:
    return {"_id": f"s{i}", "task": task, "model": "m", "method": method, "method_base": method, "budget": budget,
            "scope": "full", "params": {"window": 32}, "score": i / 4, "length": 1000, "protocol_fp": "protoA",
            "task_fp": f"t-{task}", "config_fp": f"c-{method}-{budget}-{task}", "cache_bytes": 1000 * (i + 1),
            **extra}


def write(root: Path, rows: list[dict], name: str = "rows", lines: list[str] = ()) -> Path:
    """Rows (then raw `lines`) into root/m/<task>/<method>__<budget>__full__<name>.jsonl; returns the file."""
    first = rows[0]
    path = root / "m" / first["task"] / f"{first['method']}__{first['budget']}__full__{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in lines))
    return path


def manifest(root: Path, fp: str, **protocol) -> None:
    path = root / "m" / "manifests" / f"run-{fp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol_fp": fp, "protocol": {**PROTOCOL, **protocol}}))


def good(root: Path) -> dict[str, Path]:
    return {"file": write(root, [row(i) for i in range(4)]), "fullkv": write(root, [row(i, method="fullkv",
            budget="full") for i in range(4)])}


def score_not_a_number(root: Path) -> dict[str, Path]:
    return {"file": write(root, [row(0), row(1), row(2, score="high"), row(3)])}


def score_nan(root: Path) -> dict[str, Path]:
    return {"file": write(root, [row(0)], lines=['{"_id": "s1", "task": "hotpotqa", "model": "m", "method": "snapkv", '
                                                 '"budget": "r0.1", "score": NaN, "protocol_fp": "protoA"}'])}


def two_protocols(root: Path) -> dict[str, Path]:
    a = write(root, [row(i) for i in range(2)], name="a")
    b = write(root, [row(i, protocol_fp="protoB", config_fp="c2") for i in range(2)], name="b")
    manifest(root, "protoA")
    manifest(root, "protoB", dtype="bfloat16")
    return {"a": a, "b": b}


def two_protocols_no_manifest(root: Path) -> dict[str, Path]:
    return {"a": write(root, [row(0)], name="a"),
            "b": write(root, [row(0, protocol_fp="protoB", config_fp="c2")], name="b")}


def two_configs(root: Path) -> dict[str, Path]:
    a = write(root, [row(i) for i in range(2)], name="a")
    b = write(root, [row(i, config_fp="c-other", params={"window": 16}) for i in range(2, 4)], name="b")
    return {"a": a, "b": b}


def two_task_fps(root: Path) -> dict[str, Path]:
    a = write(root, [row(i) for i in range(2)], name="a")
    b = write(root, [row(i, method="h2o", task_fp="t-other", config_fp="c-h2o") for i in range(2)], name="b")
    return {"a": a, "b": b}


@dataclass(frozen=True)
class Case:
    setup: Callable[[Path], dict[str, Path]]
    argv: Callable[[Path, dict[str, Path], Path], list[str]]  # (results root, its files, a path to write) -> args
    message: Callable[[Path, dict[str, Path]], list[str]]  # the texts the one line must hold


def only_corrupt(root: Path) -> dict[str, Path]:
    path = root / "m" / "hotpotqa" / "snapkv__r0.1__full__x.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("not json\n")
    return {"file": path}


BAD = {
    "table: no row, a corrupt line": Case(
        only_corrupt, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"no result rows under {r}; skipped 1 line that holds no usable row: {f['file']}:1 (not JSON)"]),
    "table --results FILE": Case(
        good, lambda r, f, out: ["table", "--results", str(f["file"]), "--out", str(out)],
        lambda r, f: [f"--results {f['file']} is not a directory"]),
    "plot --results FILE": Case(
        good, lambda r, f, out: ["plot", "--results", str(f["file"]), "--out", str(out)],
        lambda r, f: [f"--results {f['file']} is not a directory"]),
    "compare FILE DIR": Case(
        good, lambda r, f, out: ["compare", str(f["file"]), str(r)], lambda r, f: [f"BASE {f['file']} is not a directory"]),
    "compare DIR FILE": Case(
        good, lambda r, f, out: ["compare", str(r), str(f["file"])], lambda r, f: [f"NEW {f['file']} is not a directory"]),
    "table: score not a number": Case(
        score_not_a_number, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"{f['file']}:3: score must be a number, got \"high\""]),
    "table: score NaN": Case(
        score_nan, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"{f['file']}:2: score must be a number, got nan"]),
    "plot: score not a number": Case(
        score_not_a_number, lambda r, f, out: ["plot", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"{f['file']}:3: score must be a number"]),
    "compare: score not a number": Case(
        score_not_a_number, lambda r, f, out: ["compare", str(r), str(r)], lambda r, f: [f"{f['file']}:3: score"]),
    "table: two protocols": Case(
        two_protocols, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: ["2 protocol fingerprints", f"protoA in {f['a']}", f"protoB in {f['b']}",
                      "they differ in dtype (float32 vs bfloat16)", "--protocol FP", "--model/--tasks"]),
    "plot: two protocols": Case(
        two_protocols, lambda r, f, out: ["plot", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"protoA in {f['a']}", "dtype (float32 vs bfloat16)", "--protocol FP"]),
    "table: two protocols, no manifest": Case(
        two_protocols_no_manifest, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: [f"protoB in {f['b']}", "no manifest records the fields of protoA, protoB", "--protocol FP"]),
    "table --protocol unknown": Case(
        two_protocols, lambda r, f, out: ["table", "--results", str(r), "--protocol", "zz", "--out", str(out)],
        lambda r, f: ["--protocol zz: no protocol fingerprint", "protoA, protoB"]),
    "table --protocol ambiguous": Case(
        two_protocols, lambda r, f, out: ["table", "--results", str(r), "--protocol", "proto", "--out", str(out)],
        lambda r, f: ["--protocol proto: more than one"]),
    "table: two configurations in a cell": Case(
        two_configs, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: ["snapkv at r0.1 on hotpotqa", "params.window 16 vs 32", f"in {f['a']}", f"in {f['b']}",
                      "preset names"]),
    "table: two task fingerprints": Case(
        two_task_fps, lambda r, f, out: ["table", "--results", str(r), "--out", str(out)],
        lambda r, f: ["task hotpotqa", "t-hotpotqa in", "t-other in", str(f["b"])]),
}


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    files = case.setup(results)
    before = tree(tmp_path)
    code, out, err = run_kvbench(case.argv(results, files, tmp_path / "out"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), err
    for text in case.message(results, files):
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    assert out == ""
    assert tree(tmp_path) == before  # nothing written: no table, no plots folder, no lock or holder file


def corrupt(root: Path) -> dict[str, Path]:
    files = good(root)
    path = write(root, [row(i, task="multi_news") for i in range(3)], lines=[
        "not json at all", json.dumps({**row(9, task="multi_news"), "score": None}), '{"_id": "s8", "ta'])
    # the last line has no newline: a write in progress (or a crash) left it incomplete
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    files["corrupt"] = path
    kl = root / "sensitivity" / "m" / "kl_raw.jsonl"  # a sensitivity study's rows (no _id): not a result file
    kl.parent.mkdir(parents=True)
    kl.write_text(json.dumps({"model": "m", "policy": "sliding", "B": 8, "kl_fwd": 0.1}) + "\n")
    return files


def test_table_names_the_lines_it_skips_under_the_table(tmp_path, monkeypatch, capsys):
    files = corrupt(tmp_path / "results")
    code, out, err = run_kvbench(["table", "--results", str(tmp_path / "results")], capsys)
    assert code == 0 and err == "", err
    bad = files["corrupt"]
    assert out.splitlines()[-1] == (f"Skipped 3 lines that hold no usable row: {bad}:4 (not JSON), "
                                    f"{bad}:5 (no score), {bad}:6 (incomplete last line: a write in progress, or "
                                    "cut by a crash).")
    assert "|  | n | 4 | 3 |  |" in out  # hotpotqa 4 samples, multi_news the 3 whole rows


def test_table_csv_and_latex_say_it_on_stderr(tmp_path, monkeypatch, capsys):
    files = corrupt(tmp_path / "results")
    for fmt in ("csv", "latex"):
        code, out, err = run_kvbench(["table", "--results", str(tmp_path / "results"), "--format", fmt], capsys)
        assert code == 0
        assert "Skipped" not in out  # the table itself stays clean for a paper or a spreadsheet
        assert err.startswith("kvbench: table: Skipped 3 lines") and err.count("\n") == 1
        assert f"{files['corrupt']}:4 (not JSON)" in err


def test_plot_names_the_lines_it_skips(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    files = corrupt(tmp_path / "results")
    code, out, err = run_kvbench(["plot", "--results", str(tmp_path / "results"),
                                 "--out", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    assert f"kvbench: plot: Skipped 3 lines that hold no usable row: {files['corrupt']}:4 (not JSON)" in err


def test_protocol_picks_one_set(tmp_path, monkeypatch, capsys):
    files = two_protocols(tmp_path / "results")
    code, out, err = run_kvbench(["table", "--results", str(tmp_path / "results"), "--protocol", "protoB"], capsys)
    assert code == 0, err
    assert "Protocol fingerprint: protoB." in out
    code, out, err = run_kvbench(["table", "--results", str(tmp_path / "results"), "--protocol", "protoA"], capsys)
    assert code == 0 and "Protocol fingerprint: protoA." in out
    assert files  # both sets stay where they are: --protocol only selects
