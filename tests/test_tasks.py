"""tasks/longbench.yaml against the official LongBench config files and the protocol's per-task rules."""

from __future__ import annotations

import json

import pytest

from kvbench.data import load_task_specs, select_tasks
from kvbench.errors import InputError

# From /work/shared/docs/longbench-protocol.md ("Tasks", "Prompt" item 3, "Scoring").
V1_TASKS = {
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
    "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
}
CHINESE = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
LONGBENCH_E = {
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
}
METRIC = {
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], "qa_f1"),
    "multifieldqa_zh": "qa_f1_zh",
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge"),
    **dict.fromkeys(["dureader", "vcsum"], "rouge_zh"),
    **dict.fromkeys(["trec", "lsht"], "classification"),
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "passage_count": "count",
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim"),
}


@pytest.fixture(scope="module")
def specs():
    return load_task_specs()


@pytest.fixture(scope="module")
def v1(specs):
    return {n: s for n, s in specs.items() if not s.synthetic and not s.longbench_e}


def test_the_21_v1_tasks(v1):
    assert set(v1) == V1_TASKS
    assert len(V1_TASKS) == 21


def test_prompts_match_official_dataset2prompt_byte_for_byte(v1, shared_longbench):
    raw = (shared_longbench / "config" / "dataset2prompt.json").read_bytes()
    official = json.loads(raw)
    assert set(official) == set(v1)
    for name, template in official.items():
        assert v1[name].prompt.encode("utf-8") == template.encode("utf-8"), name
    # The templates' known oddities survive (typo and the space before "Answer" in qasper).
    assert "asconcisely" in v1["narrativeqa"].prompt
    assert "\n\n Answer the question based on the above article" in v1["qasper"].prompt


def test_max_new_tokens_match_official_dataset2maxlen(v1, shared_longbench):
    official = json.loads((shared_longbench / "config" / "dataset2maxlen.json").read_text())
    assert set(official) == set(v1)
    assert {name: v1[name].max_new_tokens for name in official} == official


def test_chat_rule_false_exactly_for_fewshot_and_code(v1):
    assert {name for name, s in v1.items() if not s.chat} == NO_CHAT


def test_first_line_exactly_for_four_fewshot_tasks(v1):
    assert {name for name, s in v1.items() if s.first_line} == FIRST_LINE


def test_stop_at_newline_only_samsum(specs):
    assert {name for name, s in specs.items() if s.stop_at_newline} == {"samsum", "samsum_e"}


def test_metrics_and_languages(v1):
    assert {name: s.metric for name, s in v1.items()} == METRIC
    assert {name for name, s in v1.items() if s.language == "zh"} == CHINESE
    assert {name for name, s in v1.items() if s.language != "zh"} == V1_TASKS - CHINESE
    assert all(s.language == "en" for name, s in v1.items() if name not in CHINESE)


def test_longbench_e_variants_copy_their_base(specs):
    variants = {n: s for n, s in specs.items() if s.longbench_e}
    assert set(variants) == {f"{n}_e" for n in LONGBENCH_E}
    assert len(variants) == 13
    for name, spec in variants.items():
        base = specs[name[: -len("_e")]]
        assert spec.base == base.name
        assert spec.fingerprint_fields() == base.fingerprint_fields()
        # A table holding a task and its LongBench-E variant needs two different column headers.
        assert spec.short == base.short + "-E"
        assert (spec.language, spec.category) == (base.language, base.category)
        assert not spec.synthetic


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("all", V1_TASKS),
        ("en", V1_TASKS - CHINESE),
        ("zh", CHINESE),
        ("e", {f"{n}_e" for n in LONGBENCH_E}),
    ],
)
def test_select_task_groups(specs, expr, expected):
    chosen = select_tasks(expr, specs)
    assert len(chosen) == len(expected)  # no duplicates
    assert {s.name for s in chosen} == expected


def test_group_sizes(specs):
    assert [len(select_tasks(g, specs)) for g in ("all", "en", "zh", "e")] == [21, 16, 5, 13]


def test_select_synthetic_group(specs):
    chosen = select_tasks("synthetic", specs)
    assert chosen and all(s.synthetic for s in chosen)
    assert {s.name for s in chosen} == {n for n, s in specs.items() if s.synthetic}
    assert {"passkey_en", "passkey_zh"} <= {s.name for s in chosen}


def test_select_comma_list_keeps_order_and_drops_duplicates(specs):
    chosen = select_tasks("multi_news, zh ,multifieldqa_zh,,multi_news", specs)
    names = [s.name for s in chosen]
    assert names[0] == "multi_news"
    assert sorted(names[1:]) == sorted(CHINESE)
    assert len(names) == 6


def test_unknown_task_suggests_the_closest(specs):
    with pytest.raises(InputError, match="did you mean 'hotpotqa'"):
        select_tasks("hotpotq", specs)
    with pytest.raises(InputError, match="unknown task 'nosuch'"):
        select_tasks("multi_news,nosuch", specs)


def test_empty_selection_is_an_error(specs):
    with pytest.raises(InputError):
        select_tasks(" , ", specs)
