"""The regression gate (`kvbench compare`, kvbench.gate) on result sets written from small fixtures, no model:
an edited prediction fails --exact and names its sample and first differing token; a planted significant
drop fails the score check while one answer changed by noise passes it; a planted 1.5x slowdown fails the
cost check on the same device and is not compared across devices; the JUnit file parses with the expected
failures; bad options are one line and exit 2."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvbench.gate import cost, exact, scores, sets
from conftest import run_kvbench as cli

N = 20  # samples per task: enough for the bootstrap interval to separate a real drop from one flipped answer
TASKS = ("multifieldqa_en", "hotpotqa")
DEVICE = "NVIDIA H100 80GB HBM3"


def make_rows(method: str, budget: str, task: str, run_id: str = "run-base") -> list[dict]:
    rows = []
    for i in range(N):
        ids = [100 + i, 200 + i, 300 + i]
        rows.append({
            "_id": f"{task}-{i:02d}", "task": task, "model": "m", "method": method, "method_base": method,
            "budget": budget, "score": 1.0 if i % 4 else 0.0, "prediction": f"answer {i} of {task}",
            "generated_token_ids": ids,
            "generated_tokens": len(ids), "prefilled_tokens": 1000 + 10 * i, "prefill_seconds": 0.5 + 0.01 * i,
            "decode_seconds": 0.03 * len(ids), "cache_bytes": 4096 * (1 + i), "peak_memory_bytes": 10_000_000 + i,
            "length": 1000, "protocol_fp": "proto", "task_fp": f"t-{task}", "config_fp": f"c-{task}-{method}-{budget}",
            "run_id": run_id,
        })
    return rows


def write_set(root: Path, rows: list[dict], devices: dict[str, str]) -> Path:
    """Rows in the results layout, one manifest per run id (its device name)."""
    for row in rows:
        path = root / row["model"] / row["task"] / f"{row['method']}__{row['budget']}__full__{row['config_fp']}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    for run_id, device in devices.items():
        manifest = root / "m" / "manifests" / f"{run_id}.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"run_id": run_id, "device_name": device}))
    return root


def base_rows() -> list[dict]:
    return [r for task in TASKS for m, b in (("fullkv", "full"), ("snapkv", "r0.1")) for r in make_rows(m, b, task)]


def edited(rows: list[dict], change) -> list[dict]:
    """A copy of rows with change(row) applied (change returns the new row or None to keep it)."""
    return [change(dict(r)) or r for r in rows]


def flagged(out: str, status: str) -> list[str]:
    """The cells of the text report's lines of that status, in order."""
    return [line[len(status) + 4:].split(":")[0] for line in out.splitlines() if line.startswith(f"  {status} ")]


@pytest.fixture
def base(tmp_path) -> Path:
    return write_set(tmp_path / "base", base_rows(), {"run-base": DEVICE})


def new_set(tmp_path: Path, change, device: str = DEVICE) -> Path:
    rows = [{**r, "run_id": "run-new"} for r in edited(base_rows(), change)]
    return write_set(tmp_path / "new", rows, {"run-new": device})


def test_an_identical_rerun_passes_every_check(base, tmp_path, capsys):
    new = new_set(tmp_path, lambda r: None)
    code, out, err = cli(["compare", str(base), str(new), "--exact"], capsys)
    assert code == 0 and err == "", err
    assert "== exact (predictions reproduced): PASS (4 checked)" in out
    assert "== scores (paired bootstrap 95% CI): PASS (6 checked)" in out  # 4 cells and 2 averages
    assert "== cost (speed and memory): PASS (4 checked)" in out
    assert "Gate (--exact --fail-below 1 --max-slowdown 1.2 --max-memory 1.05): passed." in out


def test_one_edited_prediction_fails_exact_naming_the_sample(base, tmp_path, capsys):
    def change(row):
        if row["method"] == "snapkv" and row["_id"] == "hotpotqa-07":
            return {**row, "prediction": "answer 7 of hotpotqa, and more", "generated_token_ids": [107, 207, 999, 5]}

    new = new_set(tmp_path, change)
    code, out, err = cli(["compare", str(base), str(new), "--exact"], capsys)
    assert code == 1
    assert err.startswith("kvbench: compare: exact snapkv r0.1 hotpotqa: 1 of 20 predictions changed")
    assert ('hotpotqa-07: token 2: 307 -> 999; old "answer 7 of hotpotqa" new "answer 7 of hotpotqa, and more"'
            in out)
    assert "FAIL  snapkv r0.1 hotpotqa: 1 of 20 predictions changed" in out
    assert flagged(out, "FAIL") == ["snapkv r0.1 hotpotqa"]  # the other cells reproduced; the score moved by noise
    # without --exact the change is listed as a warning and the gate passes
    code, out, _ = cli(["compare", str(base), str(new)], capsys)
    assert code == 0 and "WARN  snapkv r0.1 hotpotqa: 1 of 20 predictions changed" in out


def test_first_difference_without_token_ids_falls_back_to_characters():
    assert exact.first_difference({"prediction": "abcd"}, {"prediction": "abXd"}) == \
        "character 2 (no token ids stored)"
    assert exact.first_difference({"generated_token_ids": [1, 2]}, {"generated_token_ids": [1, 2, 3]}) == \
        "token 2: (end) -> 3"
    assert exact.first_difference({"token_ids": [5]}, {"generated_token_ids": [6]}) == "token 0: 5 -> 6"


def test_a_planted_significant_drop_fails_the_score_check(base, tmp_path, capsys):
    # 12 of the 15 correct hotpotqa answers of snapkv become wrong: -60 points, far outside noise
    wrong = {f"hotpotqa-{i:02d}" for i in range(N) if i % 4}
    wrong = set(sorted(wrong)[:12])

    def change(row):
        if row["method"] == "snapkv" and row["_id"] in wrong:
            return {**row, "score": 0.0, "prediction": "wrong", "generated_token_ids": [1]}

    new = new_set(tmp_path, change)
    code, out, err = cli(["compare", str(base), str(new)], capsys)
    assert code == 1
    assert err.startswith("kvbench: compare: scores snapkv r0.1 hotpotqa: -60.00 points, 95% CI [")
    assert "a significant drop of more than 1 points" in err
    # the exact check only warns without --exact; the average over snapkv's two tasks drops by 30
    assert flagged(out, "FAIL") == ["snapkv r0.1 hotpotqa", "snapkv r0.1 average"]


def test_one_answer_changed_by_noise_passes_the_score_check(base, tmp_path, capsys):
    def change(row):
        if row["method"] == "snapkv" and row["_id"] == "hotpotqa-01":
            return {**row, "score": 0.0, "prediction": "noise", "generated_token_ids": [1]}

    new = new_set(tmp_path, change)
    code, out, err = cli(["compare", str(base), str(new)], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "snapkv r0.1 hotpotqa: -5.00 points" in ln)
    assert line.startswith("  WARN") and "+0.00]" in line  # the interval reaches 0: not significant


def slower(factor: float):
    def change(row):
        if row["method"] == "snapkv":
            return {**row, "prefill_seconds": row["prefill_seconds"] * factor,
                    "decode_seconds": row["decode_seconds"] * factor}
    return change


def test_a_planted_slowdown_fails_the_cost_check_on_the_same_device(base, tmp_path, capsys):
    new = new_set(tmp_path, slower(1.5))
    code, out, err = cli(["compare", str(base), str(new)], capsys)
    assert code == 1
    assert err.startswith("kvbench: compare: cost snapkv r0.1 multifieldqa_en: prefill s/token x1.50 (limit 1.2); "
                          "decode s/token x1.50 (limit 1.2) on 20 samples on NVIDIA H100")
    assert "(and 1 more)" in err  # hotpotqa too; fullkv kept its speed
    assert "decode s/token: 0.03 -> 0.045 (x1.500) > 1.2: FAIL" in out
    # the same slowdown within the tolerance passes; --no-timings reports it without failing
    assert cli(["compare", str(base), str(new), "--max-slowdown", "1.6"], capsys)[0] == 0
    code, out, _ = cli(["compare", str(base), str(new), "--no-timings"], capsys)
    assert code == 0 and "(timings not gated)" in out


def test_timings_are_not_compared_across_devices(base, tmp_path, capsys):
    new = new_set(tmp_path, slower(1.5), device="NVIDIA A10G")
    code, out, err = cli(["compare", str(base), str(new)], capsys)
    assert code == 0, err
    assert (f"cache bytes x1.00 on 20 samples timings not compared (devices: BASE {DEVICE}, NEW NVIDIA A10G)"
            in out)
    # and --exact refuses a cross-device pair instead of failing it for a flipped token
    code, out, err = cli(["compare", str(base), str(new), "--exact"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (f"kvbench: error: --exact needs BASE and NEW made on one device (BASE: {DEVICE}; "
                           "NEW: NVIDIA A10G); make the baseline on this device or drop --exact")


def test_more_cache_bytes_fail_the_cost_check_on_any_device(base, tmp_path):
    old = sets.load(base).cells[("snapkv", "r0.1", "hotpotqa")]
    grown = sets.Cell({i: {**r, "cache_bytes": r["cache_bytes"] * 1.1, "_device": "other"}
                       for i, r in old.rows.items()})
    finding = cost.check("snapkv r0.1 hotpotqa", old, grown, cost.Tolerance())
    assert finding.status == "fail" and finding.summary.startswith("cache bytes x1.10 (limit 1.05)")


def test_junit_parses_with_the_expected_failures(base, tmp_path, capsys):
    def change(row):
        if row["method"] == "snapkv" and row["_id"] == "multifieldqa_en-03":
            return {**row, "prediction": "changed", "generated_token_ids": [103, 1]}
        return slower(1.5)(row) if row["task"] == "hotpotqa" else None

    new = new_set(tmp_path, change)
    junit = tmp_path / "reports" / "junit.xml"
    code, _, _ = cli(["compare", str(base), str(new), "--exact", "--junit", str(junit), "--format", "md"], capsys)
    assert code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "2"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["exact", "scores", "cost"]
    failed = {(name, case.get("name")) for name, suite in suites.items() for case in suite.findall("testcase")
              if case.find("failure") is not None}
    assert failed == {("exact", "snapkv r0.1 multifieldqa_en"), ("cost", "snapkv r0.1 hotpotqa")}
    message = suites["exact"].find("testcase[@name='snapkv r0.1 multifieldqa_en']/failure")
    assert "multifieldqa_en-03: token 1: 203 -> 1" in message.text
    assert len(suites["scores"].findall("testcase")) == 6 and suites["scores"].get("failures") == "0"


def test_missing_cells_and_samples_fail(base, tmp_path, capsys):
    rows = [r for r in base_rows() if not (r["task"] == "hotpotqa" and r["method"] == "snapkv")]
    rows = [{**r, "run_id": "run-new"} for r in rows if r["_id"] != "multifieldqa_en-19"]
    new = write_set(tmp_path / "new", rows, {"run-new": DEVICE})
    code, out, err = cli(["compare", str(base), str(new), "--exact"], capsys)
    assert code == 1
    assert "FAIL  snapkv r0.1 hotpotqa: in BASE but missing from NEW: cannot be checked" in out
    assert "FAIL  fullkv full multifieldqa_en: 1 BASE samples missing from NEW" in out


@pytest.mark.parametrize("args, message", [
    (["--max-slowdown", "0.9"], "--max-slowdown must be a ratio >= 1"),
    (["--max-memory", "0"], "--max-memory must be a ratio >= 1"),
    (["--fail-below=-1"], "--fail-below must be a number of points >= 0"),
])
def test_bad_options_are_one_line_and_exit_2(base, args, message, capsys, tmp_path):
    junit = tmp_path / "junit.xml"
    code, out, err = cli(["compare", str(base), str(base), "--junit", str(junit), *args], capsys)
    assert code == 2 and out == "" and not junit.exists()
    assert err.startswith(f"kvbench: error: {message}") and len(err.strip().splitlines()) == 1


def test_a_copied_baseline_gates_itself(base, tmp_path, capsys):
    """A copied set (same run ids and manifests, as a committed baseline against its own copy) passes --exact."""
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert cli(["compare", str(base), str(copy), "--exact"], capsys)[0] == 0


def test_too_few_samples_only_warn_however_far_they_drop(base):
    """One sample gives the degenerate interval [d, d]; below scores.MIN_SAMPLES the check cannot fail."""
    old = sets.load(base).cells[("snapkv", "r0.1", "hotpotqa")]
    one = {i: r for i, r in old.rows.items() if r["score"] == 1.0 and i == "hotpotqa-01"}
    dropped = {i: {**r, "score": 0.0} for i, r in one.items()}
    finding = scores.check("snapkv r0.1 hotpotqa", sets.Cell(one), sets.Cell(dropped), 1.0)
    assert finding.status == "warn" and "95% CI [-100.00, -100.00] on 1 paired samples" in finding.summary
    assert "an interval decides nothing" in finding.summary
