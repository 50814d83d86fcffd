"""Tests for kvbench.scoring: official eval.py arithmetic, file handling, and parity with result.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvbench import scoring as S
from kvbench.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "longbench" / "reference-preds" / "llama2-7b-chat-4k"

TREC_CLASSES = ["Location", "Human", "Entity"]


def _row(pred="x", answers=("x",), all_classes=None, **extra):
    return {"pred": pred, "answers": list(answers), "all_classes": all_classes, **extra}


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- task table


def test_task_metric_table():
    assert len(S.TASK_METRIC) == 21
    assert set(S.TASK_METRIC) == set(S.CATEGORY)
    # spot checks against the protocol doc's scoring table
    assert S.TASK_METRIC["triviaqa"] == "qa_f1"
    assert S.TASK_METRIC["samsum"] == "rouge"
    assert S.TASK_METRIC["dureader"] == "rouge_zh"
    assert S.TASK_METRIC["lsht"] == "classification"
    assert S.TASK_METRIC["passage_count"] == "count"
    assert S.TASK_METRIC["repobench-p"] == "code_sim"
    assert S.FIRST_LINE_TASKS == {"trec", "triviaqa", "samsum", "lsht"}
    assert len(S.LONGBENCH_E_TASKS) == 13
    assert sorted(set(S.CATEGORY.values())) == sorted(
        ["Single-Doc QA", "Multi-Doc QA", "Summarization", "Few-shot", "Synthetic", "Code"]
    )


def test_e_variants_resolve_to_base_task():
    assert S.base_task("qasper_e") == "qasper"
    assert S.metric_for_task("repobench-p_e") == "code_sim"
    with pytest.raises(InputError):
        S.base_task("narrativeqa_e")  # not part of LongBench-E
    with pytest.raises(InputError):
        S.base_task("nq")


# --------------------------------------------------------------------------- score_sample


def test_first_line_rule_on_the_four_tasks():
    pred = "\n\nLocation\nHuman"
    assert S.score_sample("trec", pred, ["Location"], TREC_CLASSES) == 1.0  # first line only
    assert S.score_sample("lsht", pred, ["Location"], TREC_CLASSES) == 1.0
    assert S.score_sample("trec_e", pred, ["Location"], TREC_CLASSES) == 1.0
    # triviaqa: "\nParis\nLondon is big" -> "Paris" -> F1 1
    assert S.score_sample("triviaqa", "\nParis\nLondon is big", ["Paris"], None) == 1.0
    # samsum: first line "a b" vs "a b": F = 2 * (1 / (2 + 1e-8))
    assert S.score_sample("samsum", "\na b\nc d", ["a b"], None) == 2.0 * (1.0 / (2.0 + 1e-8))


def test_first_line_rule_not_applied_elsewhere():
    # narrativeqa keeps all lines: tokens [paris, london, is, big] vs [paris]: P 1/4, R 1 -> 0.4
    assert S.score_sample("narrativeqa", "\nParis\nLondon is big", ["Paris"], None) == pytest.approx(0.4)
    # passage_count: integers 3 and 4 over both lines -> 1/2
    assert S.score_sample("passage_count", "\n3\n4", ["3"], None) == 0.5
    # lcc: leading newlines dropped by code_sim itself, leading spaces kept (2*5/12 -> 83)
    assert S.score_sample("lcc", "\n  x = 1", ["x = 1"], None) == 0.83


def test_score_with_metric_by_name():
    # same first-line cut when asked: "\nParis\nLondon" -> "Paris" -> F1 1; without it 2/3
    # (tokens [paris, london] vs [paris]: P 1/2, R 1)
    assert S.score_with_metric("qa_f1", True, "\nParis\nLondon", ["Paris"], None) == 1.0
    assert S.score_with_metric("qa_f1", False, "\nParis\nLondon", ["Paris"], None) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="unknown metric"):
        S.score_with_metric("bleu", False, "x", ["x"], None)


def test_max_over_answers_and_empty_answers():
    assert S.score_sample("hotpotqa", "Paris", ["London", "Paris"], None) == 1.0
    assert S.score_sample("hotpotqa", "Paris", [], None) == 0.0


# --------------------------------------------------------------------------- aggregation


def test_task_score_basic():
    assert S.task_score([1.0, 0.5, 0.0]) == 50.0  # 100 * 1.5 / 3
    with pytest.raises(ValueError):
        S.task_score([])


def test_task_score_multiplies_before_dividing():
    # total 0.83595: 100 * 0.83595 / 3 = 27.86499999999999843... -> 27.86 (official order);
    # 100 * (0.83595 / 3) would be 27.86500000000000198... -> 27.87
    assert S.task_score([0.83595, 0.0, 0.0]) == 27.86


def test_length_buckets_boundaries():
    # 3999 -> 0-4k; 4000 and 7999 -> 4-8k; 8000 -> 8k+
    b = S.length_buckets([1.0, 0.0, 0.5, 1.0], [3999, 4000, 7999, 8000])
    assert b == {"0-4k": 100.0, "4-8k": 25.0, "8k+": 100.0}


def test_length_buckets_empty_bucket_is_nan():
    b = S.length_buckets([1.0], [100])
    assert b["0-4k"] == 100.0
    assert math.isnan(b["4-8k"]) and math.isnan(b["8k+"])


def test_length_buckets_use_numpy_rounding():
    # official: round(100 * np.mean([5e-05]), 2) is numpy's round: 0.005 * 100 = 0.5 -> rint -> 0
    # -> 0.0, whereas Python's round(0.005, 2) gives 0.01 (0.005 is stored slightly above)
    assert S.length_buckets([5e-05], [1])["0-4k"] == 0.0


def test_averages():
    scores = {"narrativeqa": 10.0, "qasper": 20.0, "lcc": 60.0}
    assert S.average(scores) == 30.0  # (10 + 20 + 60) / 3
    # Single-Doc QA mean 15, Code 60 -> 37.5
    assert S.category_average(scores) == 37.5
    assert S.category_average({"qasper_e": 20.0, "qasper": 10.0}) == 15.0


# --------------------------------------------------------------------------- prediction dirs


def test_score_dir_basic_and_outputs(tmp_path):
    _write(tmp_path / "hotpotqa.jsonl", [_row("Paris", ["Paris"]), _row("no", ["Paris"])])
    _write(
        tmp_path / "trec_e.jsonl",
        [
            _row("Location", ["Location"], TREC_CLASSES, length=100),
            _row("Human", ["Location"], TREC_CLASSES, length=5000),
        ],
    )
    (tmp_path / "result.json").write_text("{}")  # not a .jsonl: ignored
    report = S.score_prediction_dir(tmp_path)
    assert report.scores == {"hotpotqa": 50.0, "trec_e": 50.0}
    assert report.n_samples == {"hotpotqa": 2, "trec_e": 2}
    assert report.buckets["trec_e"]["0-4k"] == 100.0
    assert report.buckets["trec_e"]["4-8k"] == 0.0
    assert math.isnan(report.buckets["trec_e"]["8k+"])
    js = S.report_to_json(report)
    assert js["hotpotqa"] == 50.0 and js["trec_e"] == 50.0
    assert set(js) == {"hotpotqa", "trec_e", "trec_e_buckets"}
    assert js["trec_e_buckets"]["0-4k"] == 100.0
    table = S.render_score_table(report)
    assert "| hotpotqa | Multi-Doc QA | qa_f1 | 2 | 50.00 |" in table
    assert "0-4k" in table and "average (2 tasks)" in table


def test_all_classes_taken_from_last_row(tmp_path):
    # official eval.py overwrites all_classes per row and uses the last value for every row
    _write(
        tmp_path / "trec.jsonl",
        [_row("Human", ["Human"], ["Location"]), _row("Location", ["Location"], TREC_CLASSES)],
    )
    # row 1 is scored with TREC_CLASSES (from row 2): "Human" matches -> 1.0; mean 100
    assert S.score_prediction_dir(tmp_path).scores["trec"] == 100.0


def test_shards_are_merged(tmp_path):
    _write(tmp_path / "hotpotqa.shard-0-of-2.jsonl", [_row("Paris", ["Paris"])])
    _write(tmp_path / "hotpotqa.shard-1-of-2.jsonl", [_row("no", ["Paris"]), _row("no", ["Paris"])])
    report = S.score_prediction_dir(tmp_path)
    assert report.scores == {"hotpotqa": round(100 * 1.0 / 3, 2)}  # 33.33
    assert report.n_samples["hotpotqa"] == 3
    assert report.files["hotpotqa"] == ["hotpotqa.shard-0-of-2.jsonl", "hotpotqa.shard-1-of-2.jsonl"]


def test_shard_errors(tmp_path):
    _write(tmp_path / "lcc.shard-0-of-3.jsonl", [_row()])
    _write(tmp_path / "lcc.shard-1-of-3.jsonl", [_row()])
    with pytest.raises(InputError, match="incomplete"):
        S.score_prediction_dir(tmp_path)
    _write(tmp_path / "lcc.shard-2-of-3.jsonl", [_row()])
    _write(tmp_path / "lcc.jsonl", [_row()])
    with pytest.raises(InputError, match="both lcc.jsonl and shard files"):
        S.score_prediction_dir(tmp_path)


def _error(tmp_path) -> str:
    with pytest.raises(InputError) as info:
        S.score_prediction_dir(tmp_path)
    return str(info.value)


def test_error_missing_field_names_file_and_line(tmp_path):
    bad = {"pred": "x", "all_classes": None}
    _write(tmp_path / "lcc.jsonl", [_row(), "", bad])  # the blank line 2 is skipped but counted
    assert _error(tmp_path) == f"{tmp_path / 'lcc.jsonl'}:3: missing field 'answers'"


def test_error_relative_path_message(tmp_path, monkeypatch):
    (tmp_path / "predictions").mkdir()
    _write(tmp_path / "predictions" / "lcc.jsonl", [_row()] * 16 + [{"pred": "x", "all_classes": None}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as info:
        S.score_prediction_dir("predictions")
    assert str(info.value) == "predictions/lcc.jsonl:17: missing field 'answers'"


def test_error_broken_json(tmp_path):
    _write(tmp_path / "qasper.jsonl", [_row(), '{"pred": "x", "answers": ['])
    msg = _error(tmp_path)
    assert msg.startswith(f"{tmp_path / 'qasper.jsonl'}:2: broken JSON")
    assert "\n" not in msg


def test_error_unknown_task(tmp_path):
    _write(tmp_path / "nq.jsonl", [_row()])
    assert _error(tmp_path).startswith(f"{tmp_path / 'nq.jsonl'}: unknown LongBench task 'nq'")


def test_error_e_file_needs_length(tmp_path):
    _write(tmp_path / "qasper_e.jsonl", [_row()])
    assert _error(tmp_path) == f"{tmp_path / 'qasper_e.jsonl'}:1: missing field 'length'"


def test_error_wrong_types_and_bad_answer(tmp_path):
    _write(tmp_path / "qasper.jsonl", [_row(pred=None)])
    assert _error(tmp_path) == f"{tmp_path / 'qasper.jsonl'}:1: field 'pred' must be a string"
    (tmp_path / "qasper.jsonl").unlink()
    _write(tmp_path / "passage_retrieval_en.jsonl", [_row("Paragraph 1", ["Paragraph 1"]), _row("1", ["one"])])
    assert _error(tmp_path).startswith(f"{tmp_path / 'passage_retrieval_en.jsonl'}:2: answer 'one'")


def test_error_empty_file_and_not_a_dir(tmp_path):
    _write(tmp_path / "qasper.jsonl", [])
    assert _error(tmp_path) == f"{tmp_path / 'qasper.jsonl'}: no predictions"
    with pytest.raises(InputError, match="not a directory"):
        S.score_prediction_dir(tmp_path / "missing")


# --------------------------------------------------------------------------- parity


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference predictions not present")
def test_parity_with_official_result_json():
    expected = json.loads((REFERENCE / "result.json").read_text())
    report = S.score_prediction_dir(REFERENCE)
    assert set(report.scores) == set(expected) and len(expected) == 21
    mismatches = {t: (report.scores[t], v) for t, v in expected.items() if abs(report.scores[t] - v) > 0.01 + 1e-9}
    assert mismatches == {}
    assert report.n_samples["lcc"] == 500 and report.n_samples["multifieldqa_en"] == 150
