"""Unit tests for kvbench.metrics: every official LongBench v1 quirk, expected values by hand.

Where a quirk comes from a third-party package (pltrdy rouge 1.0.1), the package itself, when
installed, is used as an independent oracle next to the hand-computed value.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvbench import metrics as M

try:  # pltrdy rouge, the package the official scorer calls
    from rouge import Rouge as _PltrdyRouge
except ImportError:  # pragma: no cover
    _PltrdyRouge = None

needs_pltrdy = pytest.mark.skipif(_PltrdyRouge is None, reason="pltrdy rouge not installed")


def _pltrdy(pred: str, gold: str) -> float:
    try:
        return _PltrdyRouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def test_metrics_version_constant():
    assert M.METRICS_VERSION == "longbench-v1-official-1"


# --------------------------------------------------------------------------- qa_f1


def test_normalize_answer_order_punct_then_articles():
    # lower -> "the-theater, an apple!"; punctuation out -> "thetheater an apple";
    # whole-word articles -> "thetheater   apple"; collapse -> "thetheater apple"
    assert M.normalize_answer("The-Theater, an Apple!") == "thetheater apple"


def test_qa_f1_hand_computed():
    # pred -> [cat, sat, on, mat] (4), gold -> [cat, on, mat] (3); overlap 3
    # P = 3/4, R = 1, F1 = 2 * 0.75 * 1 / 1.75 = 6/7
    assert M.qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7, abs=1e-15)


def test_qa_f1_multiset_counts():
    # pred [paris, paris] vs gold [paris]: overlap min(2,1) = 1, P = 1/2, R = 1 -> F1 = 2/3
    assert M.qa_f1("Paris Paris", "Paris") == pytest.approx(2 / 3, abs=1e-15)


def test_qa_f1_no_overlap_and_empty():
    assert M.qa_f1("London", "Paris") == 0.0
    assert M.qa_f1("", "Paris") == 0.0
    assert M.qa_f1("the a an", "Paris") == 0.0  # only articles -> no tokens


# --------------------------------------------------------------------------- Chinese


def test_jieba_segmentation_precise_mode():
    # jieba's README example for precise mode: 我/来到/北京/清华大学
    assert M.jieba_segment("我来到北京清华大学。") == ("我", "来到", "北京", "清华大学", "。")


def test_zh_normalisation_per_token():
    # the "。" token becomes empty and is dropped; ASCII is lowercased; the " " token is dropped
    assert M.zh_tokens("我来到北京清华大学。") == ["我", "来到", "北京", "清华大学"]
    assert M.zh_tokens("他说：“Hello World”") == ["他", "说", "hello", "world"]


def test_zh_punctuation_set_lacks_opening_book_title_mark():
    # the official set has "》" but not "《": "《" survives normalisation
    assert len(M.CN_PUNCTUATION) == 75
    assert "》" in M.CN_PUNCTUATION and "《" not in M.CN_PUNCTUATION
    assert M.normalize_zh_answer("《三体》") == "《三体"
    assert M.normalize_zh_answer(" ABC，d\u3000e. ") == "abcde"


def test_qa_f1_zh_hand_computed():
    # pred [我, 来到, 北京] vs gold [我, 来到, 北京, 清华大学]: overlap 3, P = 1, R = 3/4 -> 6/7
    assert M.qa_f1_zh("我来到北京", "我来到北京清华大学") == pytest.approx(6 / 7, abs=1e-15)
    assert M.qa_f1_zh("。", "北京") == 0.0


def test_jieba_is_lazy_and_silent():
    code = textwrap.dedent(
        """
        import sys
        import kvbench.metrics as M
        assert "jieba" not in sys.modules, "jieba imported at module import"
        M.qa_f1_zh("我来到北京", "北京")
        M.rouge_zh("我来到北京", "北京")
        assert "jieba" in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# --------------------------------------------------------------------------- rouge


def _expected_f(llcs: int, m: int, n: int) -> float:
    """pltrdy's F from (distinct LCS-union words, distinct reference words, distinct hyp words)."""
    r, p = llcs / m, llcs / n
    return 2.0 * ((p * r) / (p + r + 1e-8))


def test_rouge_hand_computed():
    # one sentence each; distinct words: ref {the, cat, sat, on, mat} = 5, hyp 3; LCS the cat sat = 3
    assert M.rouge("the cat sat", "the cat sat on the mat") == _expected_f(3, 5, 3)


def test_rouge_counts_distinct_words():
    # sets, not multisets: "cat cat cat" has n = 1 distinct word -> F = 2 * (1 / (2 + 1e-8))
    assert M.rouge("cat cat cat", "cat") == _expected_f(1, 1, 1)


def test_rouge_summary_level_union_over_sentences():
    # hyp splits on "." into [c] and [a b]; LCS with ref [a b c] is {c} and {a, b}: union 3 of 3.
    # (A plain LCS of "c a b" vs "a b c" would only be 2.)
    assert M.rouge("c. a b", "a b c") == _expected_f(3, 3, 3)


@pytest.mark.parametrize("pred", ["", ".", "...", " . "])
def test_rouge_empty_prediction_is_zero(pred):
    # "" and "." pieces are dropped -> no sentence -> the package raises -> 0.0.
    # " . " has pieces " " and " " -> two "" sentences, not empty: scores 0 without raising.
    assert M.rouge(pred, "a b c") == 0.0


def test_rouge_whitespace_only_sentence_quirk():
    # pred "   " -> one sentence "" with the token "";  ref "x.  " -> sentences [x] and [""].
    # LCS([""], [""]) = {""}: llcs 1, m = |{x, ""}| = 2, n = 1 -> F = 2/3 (nearly)
    assert M.rouge("   ", "x.  ") == _expected_f(1, 2, 1)


def _long(k: int) -> str:
    return "a " + " ".join(f"w{i}" for i in range(1, k))


def test_rouge_recursion_limit_boundary():
    # ref [a], hyp [a w1 .. w(k-1)]: pltrdy's _recon walks k-1 steps left then one diagonal,
    # k + 1 calls. The official run survives 991 calls for rouge (990 for rouge_zh): see
    # test_recursion_budget_matches_pltrdy_under_official_stack for the measurement.
    assert M.rouge(_long(990), "a") == _expected_f(1, 1, 990)
    assert M.rouge(_long(991), "a") == 0.0
    assert M.rouge_zh(_long(989), "a") == _expected_f(1, 1, 989)
    assert M.rouge_zh(_long(990), "a") == 0.0


def test_rouge_very_long_text_is_zero():
    # 5000 words without a full stop against a 3000-word reference: RecursionError officially
    words = " ".join(f"w{i}" for i in range(5000))
    assert M.rouge(words, words[:20000]) == 0.0


def test_rouge_zh_joins_jieba_tokens():
    # 我来到北京 -> "我 来到 北京"; gold 北京 -> "北京": LCS {北京}, m = 1, n = 3
    assert M.rouge_zh("我来到北京", "北京") == _expected_f(1, 1, 3)


@needs_pltrdy
def test_rouge_matches_pltrdy_package_on_edge_cases():
    cases = [
        ("the cat sat", "the cat sat on the mat"),
        ("c. a b", "a b c"),
        ("   ", "x.  "),
        (" . ", "a. . b"),
        ("b a. c a. a b c d", "a b c. d a. b"),
        ("x y z. z y x. y", "y x. z. x y z x"),
        ("One. Two three! four?\nfive.", "two\tthree. one five four"),
        ("Hello world", ""),
    ]
    for pred, gold in cases:
        assert M.rouge(pred, gold) == _pltrdy(pred, gold), (pred, gold)


@needs_pltrdy
def test_rouge_matches_pltrdy_package_random():
    import random

    rng = random.Random(1234)
    pieces = ["a", "b", "c", "d", ".", " ", "  ", "\n", ". ", "e"]
    for _ in range(1500):
        pred = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        gold = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        assert M.rouge(pred, gold) == _pltrdy(pred, gold), (pred, gold)


@needs_pltrdy
def test_recursion_budget_matches_pltrdy_under_official_stack(tmp_path):
    """Measure the real package under the official call shape (script -> scorer -> metric)."""
    script = tmp_path / "official_shape.py"
    script.write_text(
        textwrap.dedent(
            """
            from rouge import Rouge

            def rouge_score(pred, gold):
                try:
                    return Rouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]
                except BaseException:
                    return 0.0

            def rouge_zh_score(pred, gold):  # one frame more, as officially
                return rouge_score(pred, gold)

            def scorer(metric, pred, gold):
                return metric(pred, gold)

            # module level, like eval.py's main block: one frame more here would shift the result
            longest = []
            for metric in (rouge_score, rouge_zh_score):
                ok = 0
                for k in range(980, 1000):
                    if scorer(metric, "a " + " ".join("w%d" % i for i in range(1, k)), "a") > 0:
                        ok = k
                longest.append(ok)
            print(*longest)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # k words survive iff k + 1 _recon calls fit the budget
    assert proc.stdout.split() == [str(M._RECON_CALLS_EN - 1), str(M._RECON_CALLS_ZH - 1)]


# --------------------------------------------------------------------------- classification


def test_classification_remove_while_iterating_keeps_a_substring():
    # matches [A, B, AB, ABC] (all in "ABC"); loop: pos0 A (strict substring of gold) removed ->
    # [B, AB, ABC]; pos1 AB removed -> [B, ABC]; pos2 >= len, stop. "B" was skipped and survives,
    # so the score is 1/2 (a correct filter would leave [ABC] and give 1).
    assert M.classification("ABC", "ABC", ["A", "B", "AB", "ABC"]) == 0.5


def test_classification_adjacent_substrings():
    # [A, AB, ABC]: A removed -> [AB, ABC]; pos1 is ABC (kept); AB skipped -> 1/2
    assert M.classification("ABC", "ABC", ["A", "AB", "ABC"]) == 0.5
    # [A, AB] for gold AB: A removed -> [AB]; stop -> 1
    assert M.classification("AB", "AB", ["A", "AB", "ABC"]) == 1.0


def test_classification_non_substring_matches_share_credit():
    # "Location" and "Human" both appear, neither is a substring of the gold: 1/2
    classes = ["Location", "Human", "Entity"]
    assert M.classification("Location or Human", "Location", classes) == 0.5
    assert M.classification("Entity", "Location", classes) == 0.0
    assert M.classification("nothing", "Location", classes) == 0.0


def test_classification_needs_classes():
    with pytest.raises(ValueError):
        M.classification("x", "x", None)


# --------------------------------------------------------------------------- retrieval / count


def test_retrieval_fraction_of_integers():
    # integers in pred: 3, 12, 3 -> 2 of 3 equal the gold id 3
    assert M.retrieval("Paragraph 3, not Paragraph 12; 3", "Paragraph 3") == pytest.approx(2 / 3)
    assert M.retrieval("I don't know", "Paragraph 3") == 0.0
    assert M.retrieval("Paragraph 30", "Paragraph 3") == 0.0  # whole digit runs compared


def test_retrieval_zh_and_gold_pattern():
    assert M.retrieval_zh("段落5", "段落5") == 1.0
    assert M.retrieval_zh("答案是段落5和段落7", "段落5") == 0.5
    with pytest.raises(ValueError):
        M.retrieval("Paragraph 3", "no id here")


def test_retrieval_unicode_digits_counted_but_unequal():
    # \d matches the full-width "３", which is one integer that is not "3": 0 of 1
    assert M.retrieval("Paragraph ３", "Paragraph 3") == 0.0


def test_count_fraction():
    # integers 12 and 30 -> 1 of 2 equals 12
    assert M.count("There are 12 unique paragraphs among 30", "12") == 0.5
    assert M.count("twelve", "12") == 0.0


# --------------------------------------------------------------------------- code_sim


def test_code_sim_line_choice():
    pred = "\n\n# comment\n```python\nx = 1 // 2\n    return x\nnext"
    # skips "# comment", "```python", "x = 1 // 2"; keeps leading spaces of "    return x"
    assert M.first_code_line(pred) == "    return x"
    assert M.code_sim(pred, "    return x") == 1.0
    assert M.first_code_line("# a\n// b\n`c`") == ""


def test_code_sim_rounds_half_to_even_integer_percent():
    # difflib: "abcdefgh" vs "aXXXXXXX" share 1 char of 16 -> ratio 2/16 = 0.125 -> 12.5
    # -> round() half-to-even -> 12 -> 0.12; "abcXXXXX": 6/16 = 0.375 -> 37.5 -> 38 -> 0.38
    assert M.code_sim("abcdefgh", "aXXXXXXX") == 0.12
    assert M.code_sim("abcdefgh", "abcXXXXX") == 0.38


def test_code_sim_no_stripping():
    # "x = 1 " (6) vs "x = 1" (5): 5 matching chars, 2*5/11 = 0.909 -> 91
    assert M.code_sim("x = 1 ", "x = 1") == 0.91
    # a leading space is kept too: "  x = 1" (7) vs "x = 1" (5): 2*5/12 = 0.833 -> 83
    assert M.code_sim("  x = 1", "x = 1") == 0.83


def test_code_sim_empty_strings_follow_fuzz_ratio():
    assert M.code_sim("# only a comment", "x = 1") == 0.0  # "" vs non-empty -> 0
    assert M.code_sim("x = 1", "") == 0.0
    # equality is tested before emptiness in fuzz.ratio: "" vs "" -> 100
    assert M.code_sim("# only a comment", "") == 1.0
    assert M.fuzz_ratio_percent("", "") == 100
