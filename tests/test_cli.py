"""The command line: user errors are one line and exit code 2 (fast, in-process through kvbench.cli.main); and the
issue's Done-when end to end with the real SmolLM2 and the shared LongBench sample (slow, subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench import cli
from kvbench.results.store import load_all_rows

# ---- user errors: in-process (a subprocess costs ~10 s of imports on the shared 2-core machines) -----------------
BAD_RUNS = {
    "ratio-0": ["--ratio", "0"],
    "limit-negative": ["--limit", "-1"],
    "unknown-model": ["--model", "nosuch"],
    "unknown-task": ["--tasks", "nosuch"],
}


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["kvbench", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.mark.parametrize("args", BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_bad_run_options_exit_2_with_one_line(monkeypatch, capsys, tmp_path, args):
    results = tmp_path / "results"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, ["run", *args, "--results", str(results)])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), err
    assert "Traceback" not in err + out
    assert not results.exists()
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere in the working directory either


def test_error_messages_say_what_is_wrong(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert "--ratio" in run_main(monkeypatch, capsys, ["run", "--ratio", "0"])[2]
    assert "--limit" in run_main(monkeypatch, capsys, ["run", "--limit", "-1"])[2]
    assert "unknown model 'nosuch'" in run_main(monkeypatch, capsys, ["run", "--model", "nosuch"])[2]
    assert "did you mean 'multi_news'" in run_main(monkeypatch, capsys, ["run", "--tasks", "multi_new"])[2]


def test_usage_error_is_one_line_too(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, ["run", "--limit", "many"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_table_on_missing_results_is_one_line(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, ["table", "--results", str(tmp_path / "none")])
    assert code == 2 and err.strip().splitlines() == [f"kvbench: error: results directory not found: {tmp_path / 'none'}"]


# ---- end to end with the real model (slow) ------------------------------------------------------------------------
TASKS = "multifieldqa_zh,passage_retrieval_zh,multi_news"


def kvbench(args: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("KVBENCH_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "kvbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_args(data: Path, results: Path) -> list[str]:
    # --max-length 1500 instead of SmolLM2's official 7500 keeps the prefills cheap on CPU; everything else is
    # the Done-when command.
    return ["run", "--model", "smollm2-135m", "--method", "fullkv", "--data-dir", str(data), "--tasks", TASKS,
            "--limit", "2", "--max-length", "1500", "--results", str(results)]


@pytest.fixture(scope="module")
def first_run(shared_longbench, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    results = work / "results"
    proc = kvbench(run_args(shared_longbench, results), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, results, proc


@pytest.mark.slow
def test_run_writes_six_scored_rows(first_run, shared_longbench):
    _, results, proc = first_run
    assert "loading" in proc.stderr  # the first run does load the model (so its absence below means something)
    rows = load_all_rows(results)
    assert len(rows) == 6
    assert sorted((r["task"], r["_id"]) for r in rows) == sorted(
        (task, json.loads(line)["_id"])
        for task in TASKS.split(",")
        for line in (shared_longbench / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    )
    for r in rows:
        assert r["method"] == "fullkv" and r["budget"] == "full" and r["model"] == "smollm2-135m"
        assert isinstance(r["score"], float) and 0.0 <= r["score"] <= 1.0
        assert 1 <= r["generated_tokens"] <= {"multifieldqa_zh": 64, "passage_retrieval_zh": 32, "multi_news": 512}[r["task"]]
        assert r["prompt_tokens"] <= 1500 + 30  # 30 = SmolLM2's chat wrapper around an empty message
        assert r["protocol_fp"] == rows[0]["protocol_fp"]
    assert len(list((results / "smollm2-135m" / "manifests").glob("*.json"))) == 1


@pytest.mark.slow
def test_rerun_skips_everything_without_loading(first_run, shared_longbench):
    work, results, _ = first_run
    before = sorted(p.read_bytes() for p in results.rglob("*.jsonl"))
    proc = kvbench(run_args(shared_longbench, results), work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "loading" not in proc.stderr.lower()
    assert "all 6 samples" in proc.stderr and "(6 rows)" in proc.stderr
    assert sorted(p.read_bytes() for p in results.rglob("*.jsonl")) == before


@pytest.mark.slow
def test_table_markdown(first_run):
    work, results, _ = first_run
    proc = kvbench(["table", "--results", str(results)], work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| KV | Method | MF-zh | MultiNews | PR-zh | Avg |"
    # Recompute the FullKV row from the stored rows: task score = round(100 * mean, 2), Avg = mean of those.
    rows = load_all_rows(results)
    scores = {}
    for task in ("multifieldqa_zh", "multi_news", "passage_retrieval_zh"):
        values = [r["score"] for r in rows if r["task"] == task]
        scores[task] = round(100 * sum(values) / len(values), 2)
    avg = sum(scores.values()) / 3
    expected = f"| Full | FullKV | {' | '.join(f'{v:.2f}' for v in scores.values())} | {avg:.2f} |"
    assert expected in lines
    assert "Protocol fingerprint: " + rows[0]["protocol_fp"] in proc.stdout


@pytest.mark.slow
def test_table_latex(first_run):
    work, results, _ = first_run
    proc = kvbench(["table", "--results", str(results), "--format", "latex"], work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert r"\begin{tabular}" in proc.stdout and r"MF-zh & MultiNews & PR-zh & Avg \\" in proc.stdout


@pytest.mark.slow
def test_synthetic_run_needs_no_data(tmp_path):
    results = tmp_path / "results"
    proc = kvbench(["run", "--model", "smollm2-135m", "--tasks", "synthetic", "--limit", "1",
                    "--synthetic-length", "200", "--results", str(results)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load_all_rows(results)
    assert sorted(r["task"] for r in rows) == ["multineedle_en", "multineedle_zh", "passkey_en", "passkey_zh"]
    assert all(r["_id"].startswith("syn-") and 0.0 <= r["score"] <= 1.0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("args", BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_bad_run_options_in_a_real_process(tmp_path, args):
    results = tmp_path / "results"
    proc = kvbench(["run", *args, "--results", str(results)], tmp_path, timeout=600)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("kvbench: error: ")
    assert "Traceback" not in proc.stderr and not results.exists()
