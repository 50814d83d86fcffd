"""Table 17-style tables from hand-written rows; every expected number is computed by hand in the comments."""

from __future__ import annotations

import csv
import io

import pytest

from kvbench.errors import InputError
from kvbench.results.report import build_table, render, render_csv, render_latex, render_markdown

PROTOCOL = "proto123abcd"

# (method, budget, task, [(sample id, score)])
# Task scores = round(100 * mean, 2); Avg = plain mean of the two task scores.
#   FullKV  full : MF-zh (0.5+0.25)/2 = 37.50  MultiNews (0.2+0.3)/2 = 25.00  Avg 31.25
#   h2o     r0.1 : MF-zh (0.4+0.0)/2  = 20.00  MultiNews (0.1+0.1)/2 = 10.00  Avg 15.00
#   snapkv  r0.1 : MF-zh (0.1+0.2)/2  = 15.00  MultiNews (0.3+0.3)/2 = 30.00  Avg 22.50
#   h2o     r0.5 : MF-zh (0.3+0.3)/2  = 30.00  MultiNews (0.25+0.35)/2 = 30.00 Avg 30.00
#   snapkv  r0.5 : MF-zh (0.6+0.4)/2  = 50.00  MultiNews (0.2+0.2)/2 = 20.00  Avg 35.00
# Best per column within a block: 10% -> MF-zh h2o, MultiNews snapkv, Avg snapkv;
#                                 50% -> MF-zh snapkv, MultiNews h2o, Avg snapkv.
# (h2o's 20.00 at 10% is bold although 50.00 at 50% is larger: best is per block only.)
SCORES = {
    ("fullkv", "full"): {"multifieldqa_zh": (0.5, 0.25), "multi_news": (0.2, 0.3)},
    ("h2o", "r0.1"): {"multifieldqa_zh": (0.4, 0.0), "multi_news": (0.1, 0.1)},
    ("snapkv", "r0.1"): {"multifieldqa_zh": (0.1, 0.2), "multi_news": (0.3, 0.3)},
    ("h2o", "r0.5"): {"multifieldqa_zh": (0.3, 0.3), "multi_news": (0.25, 0.35)},
    ("snapkv", "r0.5"): {"multifieldqa_zh": (0.6, 0.4), "multi_news": (0.2, 0.2)},
}
# Avg len: MF-zh (100 + 300)/2 = 200; MultiNews (1000 + 2000)/2 = 1,500. n: two samples per task.
LENGTHS = {"multifieldqa_zh": (100, 300), "multi_news": (1000, 2000)}


def make_rows(scores=SCORES) -> list[dict]:
    rows = []
    # Written in a scrambled order: the table must impose its own.
    for (method, budget), tasks in reversed(list(scores.items())):
        for task, values in tasks.items():
            for i, value in enumerate(values):
                rows.append({
                    "_id": f"{task}-{i}", "task": task, "model": "smollm2-135m", "method": method, "budget": budget,
                    "score": value, "length": LENGTHS[task][i], "protocol_fp": PROTOCOL, "task_fp": f"t-{task}",
                    "config_fp": f"c-{method}-{budget}-{task}",
                })
    return rows


EXPECTED_MD = [
    "| KV | Method | MF-zh | MultiNews | Avg |",
    "|---|---|---:|---:|---:|",
    "|  | Avg len | 200 | 1,500 |  |",
    "|  | n | 2 | 2 |  |",
    "| Full | FullKV | 37.50 | 25.00 | 31.25 |",
    "| 10% | H2O | **20.00** | 10.00 | 15.00 |",
    "|  | SnapKV | 15.00 | **30.00** | **22.50** |",
    "| 50% | H2O | 30.00 | **30.00** | 30.00 |",
    "|  | SnapKV | **50.00** | 20.00 | **35.00** |",
]


def test_markdown_layout_numbers_and_bold():
    text = render_markdown(build_table(make_rows()))
    lines = text.splitlines()
    assert lines[: len(EXPECTED_MD)] == EXPECTED_MD
    footer = "\n".join(lines[len(EXPECTED_MD):])
    assert f"Protocol fingerprint: {PROTOCOL}" in footer
    assert "plain mean" in footer


def test_table_structure():
    table = build_table(make_rows())
    assert table.tasks == ["multifieldqa_zh", "multi_news"]
    assert table.headers == ["MF-zh", "MultiNews"]
    assert [budget for budget, _ in table.blocks] == ["full", "r0.1", "r0.5"]
    assert [[m for m, _ in entries] for _, entries in table.blocks] == [["fullkv"], ["h2o", "snapkv"], ["h2o", "snapkv"]]
    assert table.protocol_fps == [PROTOCOL]
    assert table.notes == []


def test_avg_is_the_plain_mean_of_task_scores_not_of_samples():
    # MF-zh 3 samples (1, 1, 0) -> round(100 * 2/3, 2) = 66.67; MultiNews 1 sample (0) -> 0.00.
    # Plain mean of the task scores: (66.67 + 0) / 2 = 33.335. A mean over the 4 samples would be 50.00.
    scores = {("fullkv", "full"): {"multifieldqa_zh": (1.0, 1.0, 0.0), "multi_news": (0.0,)}}
    rows = []
    for task, values in scores[("fullkv", "full")].items():
        for i, value in enumerate(values):
            rows.append({"_id": f"{task}-{i}", "task": task, "model": "m", "method": "fullkv", "budget": "full",
                         "score": value, "length": 10, "protocol_fp": PROTOCOL, "task_fp": f"t-{task}",
                         "config_fp": f"c-{task}"})
    table = build_table(rows)
    cells = table.blocks[0][1][0][1]
    assert cells["multifieldqa_zh"].score == 66.67 and cells["multi_news"].score == 0.0
    assert table.row_average(cells) == pytest.approx((66.67 + 0.0) / 2)


def test_mixed_protocols_refused():
    rows = make_rows()
    rows[0] = {**rows[0], "protocol_fp": "otherproto00"}
    with pytest.raises(InputError, match="protocol"):
        build_table(rows)


def test_two_configurations_in_one_cell_refused():
    rows = make_rows()
    target = next(r for r in rows if r["method"] == "snapkv" and r["budget"] == "r0.1" and r["task"] == "multi_news")
    target["config_fp"] = "c-snapkv-other-window"
    with pytest.raises(InputError, match="configuration"):
        build_table(rows)


def test_two_task_fingerprints_refused():
    rows = make_rows()
    rows[0] = {**rows[0], "task_fp": "t-other-data"}
    with pytest.raises(InputError):
        build_table(rows)


def test_several_models_refused_unless_one_is_picked():
    rows = make_rows() + [{**make_rows()[0], "model": "other"}]
    with pytest.raises(InputError, match="several models"):
        build_table(rows)
    assert build_table(rows, model="smollm2-135m").headers == ["MF-zh", "MultiNews"]


def test_unequal_sample_sets_are_noted():
    rows = [r for r in make_rows() if not (r["method"] == "h2o" and r["budget"] == "r0.5" and r["_id"] == "multi_news-1")]
    table = build_table(rows)
    assert any("MultiNews" in note for note in table.notes)
    assert "Note: MultiNews" in render_markdown(table)


def test_task_selection():
    table = build_table(make_rows(), tasks=["multi_news"])
    assert table.headers == ["MultiNews"]
    with pytest.raises(InputError, match="hotpotqa"):
        build_table(make_rows(), tasks=["hotpotqa"])


def test_latex():
    text = render_latex(build_table(make_rows()))
    assert r"\begin{tabular}{llrrr}" in text
    assert text.count(r"\toprule") == 1 and r"\bottomrule" in text
    lines = text.splitlines()
    # A rule under the header and before every block (Full, 10%, 50%); none inside a block.
    rules = [lines[i + 1].split(" & ")[:2] for i, line in enumerate(lines) if line == r"\midrule"]
    assert rules == [["", "Avg len"], ["Full", "FullKV"], [r"10\%", "H2O"], [r"50\%", "H2O"]]
    assert r"KV & Method & MF-zh & MultiNews & Avg \\" in text
    assert r"10\% & H2O & \textbf{20.00} & 10.00 & 15.00 \\" in text
    assert r"50\% & H2O & 30.00 & \textbf{30.00} & 30.00 \\" in text
    assert r"& SnapKV & \textbf{50.00} & 20.00 & \textbf{35.00} \\" in text
    assert "10%" not in text.replace(r"10\%", "")  # every % escaped
    assert PROTOCOL in text


def test_latex_escapes_method_labels():
    rows = [r for r in make_rows() if r["budget"] == "full"]
    rows = [{**r, "method": "my_preset#2&more"} for r in rows]
    text = render_latex(build_table(rows))
    assert r"& my\_preset\#2\&more & 37.50 & 25.00 & 31.25 \\" in text


def test_csv_has_the_same_numbers():
    table = build_table(make_rows())
    parsed = list(csv.reader(io.StringIO(render_csv(table))))
    assert parsed[0] == ["KV", "Method", "MF-zh", "MultiNews", "Avg"]
    assert parsed[1] == ["", "Avg len", "200", "1500", ""]  # a number, not "1,500"
    assert parsed[2] == ["", "n", "2", "2", ""]
    assert parsed[3:] == [
        ["Full", "FullKV", "37.50", "25.00", "31.25"],
        ["10%", "H2O", "20.00", "10.00", "15.00"],
        ["10%", "SnapKV", "15.00", "30.00", "22.50"],
        ["50%", "H2O", "30.00", "30.00", "30.00"],
        ["50%", "SnapKV", "50.00", "20.00", "35.00"],
    ]
    assert "**" not in render_csv(table)


def test_n_row_counts_the_samples_of_each_column():
    # H2O at 10% lacks multi_news-1, and a third sample exists only for SnapKV at 50% on MF-zh: the n row counts
    # the distinct samples a column holds (MF-zh 3, MultiNews 2), the note flags the unequal sets.
    rows = [r for r in make_rows() if not (r["method"] == "h2o" and r["budget"] == "r0.1" and r["_id"] == "multi_news-1")]
    extra = {**next(r for r in rows if r["method"] == "snapkv" and r["budget"] == "r0.5"), "_id": "multifieldqa_zh-2"}
    extra["task"], extra["config_fp"] = "multifieldqa_zh", "c-snapkv-r0.5-multifieldqa_zh"
    table = build_table([*rows, extra])
    assert table.samples == {"multifieldqa_zh": 3, "multi_news": 2}
    text = render_markdown(table)
    assert "|  | n | 3 | 2 |  |" in text.splitlines()
    assert "MF-zh: methods were scored on different sample sets" in text
    assert "MultiNews: methods were scored on different sample sets" in text


def test_csv_missing_cells_are_empty():
    rows = [r for r in make_rows() if not (r["method"] == "h2o" and r["budget"] == "r0.1" and r["task"] == "multi_news")]
    parsed = list(csv.reader(io.StringIO(render_csv(build_table(rows)))))
    assert ["10%", "H2O", "20.00", "", ""] in parsed  # no "–": a spreadsheet reads an empty cell as missing
    assert "–" in render_markdown(build_table(rows))


def test_render_dispatch():
    table = build_table(make_rows())
    assert render(table, "md") == render_markdown(table)
    assert render(table, "latex") == render_latex(table)
    with pytest.raises(InputError, match="format="):
        render(table, "html")


def test_no_rows():
    with pytest.raises(InputError):
        build_table([])
