"""LongBench v1 per-answer metrics, reproducing the official scorer number for number.

Every function here takes one prediction and one reference answer and returns a float in [0, 1].
The behaviour (quirks included) is that of THUDM/LongBench ``LongBench/metrics.py`` (the file
``eval.py`` imports; identical to the copy in viridisGreen/LongBench that produced
``shared/longbench/reference-preds/*/result.json``) run with jieba 0.42.1, rouge 1.0.1 (pltrdy)
and fuzzywuzzy 0.18.0 *without* python-Levenshtein. The code is our own; the facts it encodes:

* qa_f1: lowercase, drop ``string.punctuation``, replace the whole words a/an/the by a space,
  collapse whitespace, split; F1 of the token multisets, 0 when nothing overlaps.
* qa_f1_zh: ``jieba.cut(s, cut_all=False)`` (precise mode, HMM on) on the raw strings; each token
  lowercased, stripped of ASCII + the official Chinese punctuation set, stripped of all whitespace;
  empty tokens dropped; multiset F1. Note the official set has the closing book-title mark ``》``
  but not the opening ``《`` (nor ``〈〉``, ``·``), so ``《`` survives normalisation.
* rouge: pltrdy ``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``, 0.0 on any
  exception. We re-implement that computation exactly instead of calling the package, for two
  reasons: (1) the package reconstructs each LCS with a recursive function, so long unpunctuated
  sentence pairs raise RecursionError (score 0) at a threshold that depends on how deep the caller's
  stack already is; calling it from pytest or a CLI would shift that threshold. We model the
  official run (``python eval.py`` at default recursion limit 1000) deterministically, see
  ``_RECON_CALLS_EN``. (2) speed: pairs that cannot change the result are skipped (provably).
  ``tests/test_metrics.py`` checks the re-implementation against the installed package.
* rouge_zh: both strings become ``" ".join(jieba.cut(s, cut_all=False))`` first, then rouge.
* classification: classes of ``all_classes`` that are substrings of the prediction, then a
  for-loop that ``list.remove``s (first occurrence!) every match that is a strict substring of the
  gold class *while iterating over the same list*, so the element right after each removed one is
  never examined; score ``1/len(survivors)`` if the gold class survived, else 0.
* retrieval(_zh): gold id = first ``Paragraph (\\d+)`` (``段落(\\d+)``) match in the answer; among all
  ``\\d+`` runs in the prediction (``\\d`` is Unicode-aware, compared as strings), the fraction equal
  to it (0.0 if the prediction has no digits). count: same fraction against the answer string.
* code_sim: strip leading ``\\n`` only, take the first line containing none of `` ` ``, ``#``,
  ``//`` (else ""), then fuzzywuzzy 0.18.0 ``fuzz.ratio(line, answer) / 100``. ``fuzz.ratio`` is
  ``check_for_none`` -> ``check_for_equivalence`` (equal strings, even two empty ones, give 100)
  -> ``check_empty_string`` (either empty gives 0) -> ``int(round(100 * SequenceMatcher(None, s1,
  s2).ratio()))`` with no string pre-processing; ``round`` is Python 3's round-half-to-even, and
  without python-Levenshtein ``SequenceMatcher`` is ``difflib``'s (autojunk on). We use difflib
  directly, so an installed python-Levenshtein cannot change our numbers.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import re
import string
import threading
from collections import Counter
from collections.abc import Sequence

METRICS_VERSION = "longbench-v1-official-1"

#: The official ``cn_punctuation`` string (75 characters, ends with an ASCII full stop).
CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
    "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = re.compile(r"\d+")
_PARAGRAPH_EN = re.compile(r"Paragraph (\d+)")
_PARAGRAPH_ZH = re.compile(r"段落(\d+)")


# --------------------------------------------------------------------------- jieba (lazy, quiet)

_jieba = None
_jieba_lock = threading.Lock()


def _get_jieba():
    """Import and initialise jieba on first use, without its "Building prefix dict" chatter."""
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)
                jieba.initialize()
                _jieba = jieba
    return _jieba


@functools.lru_cache(maxsize=8192)
def jieba_segment(text: str) -> tuple[str, ...]:
    """``jieba.cut(text, cut_all=False)`` as a tuple.

    Cached: segmentation is a pure function of the string under jieba's default dictionary (this
    module never adds words), so the cache returns exactly what a fresh call would. It saves
    re-segmenting the same prediction once per reference answer (dureader has ~2 answers each).
    """
    return tuple(_get_jieba().cut(text, cut_all=False))


# --------------------------------------------------------------------------- normalisers


def normalize_answer(s: str) -> str:
    """English QA normalisation: lower -> drop ASCII punctuation -> articles to " " -> collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _EN_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation of one string: lower -> drop ASCII+Chinese punctuation -> drop whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ZH_PUNCT)
    return "".join(s.split())


def zh_tokens(s: str) -> list[str]:
    """jieba tokens of ``s``, each normalised with :func:`normalize_zh_answer`, empties dropped."""
    out = []
    for tok in jieba_segment(s):
        norm = normalize_zh_answer(tok)
        if norm:
            out.append(norm)
    return out


# --------------------------------------------------------------------------- F1


def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Multiset token F1; 0.0 when no token is shared (so empty inputs score 0)."""
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = 1.0 * same / len(pred_tokens)
    recall = 1.0 * same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1(pred: str, gold: str) -> float:
    return token_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def qa_f1_zh(pred: str, gold: str) -> float:
    return token_f1(zh_tokens(pred), zh_tokens(gold))


# --------------------------------------------------------------------------- ROUGE-L (pltrdy 1.0.1)

# How many nested calls of pltrdy's recursive LCS reconstruction (``_recon``, counting the final
# base-case call) the official run survives. Calibrated with CPython 3.11.7, recursion limit 1000,
# ``eval.py`` run as a script: for rouge, 9 frames sit below the first ``_recon`` call (<module>,
# scorer, rouge_score, Rouge.get_scores, _get_avg_scores, the metric lambda,
# rouge_l_summary_level, _union_lcs, _recon_lcs), leaving 991; rouge_zh adds rouge_zh_score, 990.
# Measured: a one-word reference against "a w1 ... w(k-1)" scores > 0 up to k = 990 (en) / 989 (zh),
# i.e. k+1 calls, and 0 (RecursionError) from k = 991 / 990 on.
_RECON_CALLS_EN = 991
_RECON_CALLS_ZH = 990


class _RougeError(Exception):
    """Raised where the official package raises (the official scorer then returns 0.0)."""


def _rouge_sentences(text: str) -> list[list[str]]:
    """pltrdy's tokenisation: split on ".", keep non-empty pieces, whitespace-normalise, split on " ".

    A whitespace-only piece becomes the sentence "" whose only token is the empty string.
    """
    return [piece.split() or [""] for piece in text.split(".") if piece]


def _lcs_recon(x: Sequence[str], y: Sequence[str]) -> tuple[list[str], int]:
    """LCS tokens as pltrdy's ``_recon_lcs(x, y)`` reconstructs them, and its recursion depth.

    The table is the usual LCS DP; the walk starts at (len(x), len(y)) and at each cell takes the
    diagonal on equal tokens, else goes up only if ``T[i-1][j] > T[i][j-1]`` (ties go left). The
    depth is the number of ``_recon`` calls, base case included (= steps + 1).
    """
    rows = [[0] * (len(y) + 1)]
    for xi in x:
        prev = rows[-1]
        cur = [0]
        left = 0
        for j, yj in enumerate(y):
            if xi == yj:
                left = prev[j] + 1
            else:
                up = prev[j + 1]
                if up > left:
                    left = up
            cur.append(left)
        rows.append(cur)
    i, j = len(x), len(y)
    tokens = []
    calls = 1
    while i and j:
        calls += 1
        if x[i - 1] == y[j - 1]:
            tokens.append(x[i - 1])
            i -= 1
            j -= 1
        elif rows[i - 1][j] > rows[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return tokens, calls


def _recursion_fails(x: Sequence[str], y: Sequence[str], max_calls: int) -> bool:
    """Would the official ``_recon`` on this sentence pair need more than ``max_calls`` calls?

    The walk takes at least min(a, b) and at most a + b - 1 steps (a, b = sentence lengths), so the
    exact walk is only needed between those bounds.
    """
    a, b = len(x), len(y)
    if a + b <= max_calls:
        return False
    if min(a, b) + 1 > max_calls:
        return True
    return _lcs_recon(x, y)[1] > max_calls


def _rouge_l_f(hyp: str, ref: str, max_calls: int) -> float:
    """pltrdy 1.0.1 ``rouge_l_summary_level`` F, via ``get_scores(avg=True)``; raises _RougeError."""
    hyp_sents = _rouge_sentences(hyp)
    ref_sents = _rouge_sentences(ref)
    if not hyp_sents or not ref_sents:
        raise _RougeError("empty hypothesis or reference")  # package: ValueError
    for x in ref_sents:
        for y in hyp_sents:
            if _recursion_fails(x, y, max_calls):
                raise _RougeError("recursion limit")  # package: RecursionError
    ref_vocab = set(itertools.chain.from_iterable(ref_sents))
    hyp_vocab = set(itertools.chain.from_iterable(hyp_sents))
    m = len(ref_vocab)  # distinct words: pltrdy's Ngrams are sets (exclusive=True)
    n = len(hyp_vocab)
    # The summed per-reference-sentence increments of the union telescope to |union|, the set of
    # distinct tokens on any pair's reconstructed LCS. A pair whose shared tokens are all in the
    # union already cannot add to it, so its DP is skipped; once the union holds every shared token
    # nothing can change and we stop.
    reachable = ref_vocab & hyp_vocab
    union: set[str] = set()
    hyp_sets = [set(y) for y in hyp_sents]
    for x in ref_sents:
        if len(union) == len(reachable):
            break
        x_set = set(x)
        for y, y_set in zip(hyp_sents, hyp_sets):
            shared = x_set & y_set
            if shared and not shared <= union:
                union.update(_lcs_recon(x, y)[0])
    llcs = len(union)
    r_lcs = llcs / m
    p_lcs = llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def rouge(pred: str, gold: str) -> float:
    """ROUGE-L F of pltrdy rouge 1.0.1 (``get_scores([pred], [gold], avg=True)``); 0.0 where it raises."""
    try:
        return _rouge_l_f(pred, gold, _RECON_CALLS_EN)
    except _RougeError:
        return 0.0


def rouge_zh(pred: str, gold: str) -> float:
    """rouge on jieba tokens joined by single spaces."""
    pred = " ".join(jieba_segment(pred))
    gold = " ".join(jieba_segment(gold))
    try:
        return _rouge_l_f(pred, gold, _RECON_CALLS_ZH)
    except _RougeError:
        return 0.0


# --------------------------------------------------------------------------- classification


def classification(pred: str, gold: str, all_classes: Sequence[str] | None) -> float:
    """Official classification score, including its remove-while-iterating loop.

    Example: classes ["A", "AB", "ABC"] all in the prediction, gold "ABC": the loop looks at "A"
    (strict substring of gold, removed -> ["AB", "ABC"]), then at index 1 finds "ABC" (kept);
    "AB" was skipped, so 2 survive and the score is 1/2, not 1.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes, got null")
    matches = [c for c in all_classes if c in pred]
    # Emulate ``for term in matches: ... matches.remove(term)``: a list iterator is an index that
    # advances by one per step and stops once it reaches the current length.
    pos = 0
    while pos < len(matches):
        term = matches[pos]
        pos += 1
        if term in gold and term != gold:
            matches.remove(term)  # removes the first equal element, as list.remove does
    if gold in matches:
        return 1.0 / len(matches)
    return 0.0


# --------------------------------------------------------------------------- retrieval / count


def _fraction_equal(pred: str, target: str) -> float:
    numbers = _DIGITS.findall(pred)
    if not numbers:
        return 0.0
    return float(sum(1 for num in numbers if num == target) / len(numbers))


def _gold_paragraph(gold: str, pattern: re.Pattern[str]) -> str:
    found = pattern.findall(gold)
    if not found:
        raise ValueError(f"answer {gold!r} does not match {pattern.pattern!r}")
    return found[0]


def retrieval(pred: str, gold: str) -> float:
    return _fraction_equal(pred, _gold_paragraph(gold, _PARAGRAPH_EN))


def retrieval_zh(pred: str, gold: str) -> float:
    return _fraction_equal(pred, _gold_paragraph(gold, _PARAGRAPH_ZH))


def count(pred: str, gold: str) -> float:
    return _fraction_equal(pred, str(gold))


# --------------------------------------------------------------------------- code similarity


def first_code_line(pred: str) -> str:
    """First line (after leading newlines) with no backtick, ``#`` or ``//``; "" if there is none."""
    for line in pred.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def fuzz_ratio_percent(a: str, b: str) -> int:
    """fuzzywuzzy 0.18.0 ``fuzz.ratio`` without python-Levenshtein, as an integer percent."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(pred: str, gold: str) -> float:
    return fuzz_ratio_percent(first_code_line(pred), gold) / 100
