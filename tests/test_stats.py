"""Paired statistics (kvbench.results.stats) and the `table --ci` cells built on them. Synthetic paired data with a
known difference; sign-test values computed by hand in the comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvbench.results import stats
from kvbench.errors import InputError
from kvbench.results.report import add_ci, build_table, render_latex, render_markdown


def known_difference(n: int, effect: float, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference scores in [0, 1] and method = reference + d, where the d have sample mean exactly `effect`
    (noise centred to mean 0), so the true mean paired difference is 100 * effect points."""
    rng = np.random.default_rng(seed)
    reference = rng.uniform(0.2, 0.8, n)
    jitter = rng.normal(0, noise, n)
    return reference + effect + (jitter - jitter.mean()), reference


def test_bootstrap_covers_a_known_large_difference_and_excludes_zero():
    method, reference = known_difference(200, effect=0.05, noise=0.1, seed=1)
    result = stats.paired(method, reference)
    assert result.n == 200
    assert result.mean_diff == pytest.approx(5.0)  # points
    assert result.ci_low < 5.0 < result.ci_high
    # standard error 10 / sqrt(200) = 0.71 points: the 95% interval is about +-1.4 around 5
    assert 1.0 < result.half_width < 1.8
    assert result.ci_low > 0 and result.significant and result.direction == 1


def test_bootstrap_of_a_loss_is_negative_and_significant():
    method, reference = known_difference(200, effect=-0.05, noise=0.1, seed=2)
    result = stats.paired(method, reference)
    assert result.ci_low < -5.0 < result.ci_high < 0
    assert result.direction == -1


def test_bootstrap_with_no_effect_includes_zero():
    method, reference = known_difference(200, effect=0.0, noise=0.1, seed=3)
    result = stats.paired(method, reference)
    assert result.mean_diff == pytest.approx(0.0, abs=1e-9)
    assert result.ci_low < 0 < result.ci_high
    assert not result.significant and result.direction == 0


def test_bootstrap_is_seeded():
    method, reference = known_difference(50, effect=0.02, noise=0.2, seed=4)
    a, b = stats.paired(method, reference, seed=7), stats.paired(method, reference, seed=7)
    c = stats.paired(method, reference, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.n_resamples == 10_000 and a.seed == 7


def test_half_width_is_the_longer_arm_and_decides_significance():
    # a: percentile interval [-0.2, 9] about Δ = 4: h = max(4 + 0.2, 9 - 4) = 5; 4 +- 5 includes 0.
    # b: [0.5, 9] about 4: h = max(3.5, 5) = 5; 4 +- 5 includes 0, so not significant (conservative) even
    #    though [0.5, 9] itself excludes 0.
    # c: [-9, -2] about -6: h = max(3, 4) = 4; -6 +- 4 = [-10, -2] excludes 0: a significant loss.
    a = stats.Paired(n=8, mean_diff=4.0, ci_low=-0.2, ci_high=9.0, wins=3, losses=1, ties=4, sign_p=0.625)
    b = stats.Paired(n=8, mean_diff=4.0, ci_low=0.5, ci_high=9.0, wins=3, losses=1, ties=4, sign_p=0.625)
    c = stats.Paired(n=8, mean_diff=-6.0, ci_low=-9.0, ci_high=-2.0, wins=0, losses=5, ties=3, sign_p=0.0625)
    assert (a.half_width, b.half_width, c.half_width) == (5.0, 5.0, 4.0)
    assert (a.direction, b.direction, c.direction) == (0, 0, -1)


def test_identical_scores_give_a_zero_width_interval():
    result = stats.paired([0.5, 0.25, 1.0], [0.5, 0.25, 1.0], n_resamples=200)
    assert (result.mean_diff, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert (result.wins, result.losses, result.ties, result.sign_p) == (0, 0, 3, 1.0)


def test_sign_test_against_hand_computed_binomial_values():
    # m = 10, 8 wins 2 losses: P[X <= 2] = (C(10,0) + C(10,1) + C(10,2)) / 2^10 = (1 + 10 + 45) / 1024 = 56/1024
    # two-sided: 112/1024 = 0.109375
    assert stats.sign_test(8, 2) == pytest.approx(112 / 1024)
    assert stats.sign_test(2, 8) == pytest.approx(112 / 1024)
    # 9 wins 1 loss: 2 * (1 + 10) / 1024 = 22/1024 = 0.021484375
    assert stats.sign_test(9, 1) == pytest.approx(0.021484375)
    # 5 - 5: P[X <= 5] > 1/2, capped at 1
    assert stats.sign_test(5, 5) == 1.0
    assert stats.sign_test(0, 0) == 1.0
    # 6 wins 0 losses: 2 / 64 = 0.03125
    assert stats.sign_test(6, 0) == pytest.approx(0.03125)
    # large m stays finite and exact enough: 600 - 400 is far beyond chance
    assert 0 < stats.sign_test(600, 400) < 1e-9


def test_paired_drops_ties_for_the_sign_test():
    # diffs (points): +10, +10, +10, 0, 0, -10 -> 3 wins, 1 loss, 2 ties; m = 4: 2 * (1 + 4) / 16 = 0.625
    result = stats.paired([0.6, 0.6, 0.6, 0.5, 0.5, 0.4], [0.5] * 6, n_resamples=500)
    assert (result.wins, result.losses, result.ties) == (3, 1, 2)
    assert result.sign_p == pytest.approx(0.625)
    assert result.mean_diff == pytest.approx(20 / 6)


def test_paired_average_is_stratified_over_tasks():
    # task A: every pair +0.10 -> 10 points exactly; task B: every pair -0.04 -> -4 points exactly.
    # Resampling within a task cannot move a constant difference: the Avg difference is (10 - 4) / 2 = 3
    # with a zero-width interval (pooling the tasks would have given a wide one).
    a = ([0.6] * 5, [0.5] * 5)
    b = ([0.2] * 9, [0.24] * 9)
    result = stats.paired_average([a, b], n_resamples=300)
    assert result.mean_diff == pytest.approx(3.0)
    assert result.ci_low == pytest.approx(3.0) and result.ci_high == pytest.approx(3.0)
    assert (result.n, result.wins, result.losses) == (14, 5, 9)


def test_paired_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        stats.paired([0.1, 0.2], [0.1])
    with pytest.raises(ValueError):
        stats.paired([], [])


# ---- table --ci -------------------------------------------------------------------------------------------
PROTOCOL = "protoCI"
# multifieldqa_zh (MF-zh), 8 samples. FullKV scores R; snapkv = R + 0.5 on every sample (a large, certain
# gain: +50 points, zero-width interval, 8 wins -> sign p = 2/256 = 0.0078); h2o = R except sample 0 (+0.1)
# and sample 1 (-0.1): Δ = 0, CI includes 0, no mark.
R = [0.1, 0.2, 0.3, 0.4, 0.25, 0.35, 0.15, 0.05]


def ci_rows(extra_h2o_sample: bool = False) -> list[dict]:
    scores = {
        ("fullkv", "full"): R,
        ("snapkv", "r0.1"): [r + 0.5 for r in R],
        ("h2o", "r0.1"): [R[0] + 0.1, R[1] - 0.1, *R[2:]],
    }
    rows = []
    for (method, budget), values in scores.items():
        for i, value in enumerate(values):
            rows.append({"_id": f"s{i}", "task": "multifieldqa_zh", "model": "m", "method": method, "budget": budget,
                         "score": value, "length": 100, "protocol_fp": PROTOCOL, "task_fp": "t",
                         "config_fp": f"c-{method}-{budget}"})
    if extra_h2o_sample:  # a sample FullKV never scored: left out of the pairing, n shown in the cell
        rows.append({**rows[-1], "_id": "s99", "score": 1.0})
    return rows


def test_markdown_ci_cells_and_legend():
    table = add_ci(build_table(ci_rows()), n_resamples=500)
    text = render_markdown(table)
    lines = text.splitlines()
    # FullKV mean of R = 1.8 / 8 = 22.50; snapkv 72.50 (+50.00 ±0.0)↑†; h2o 22.50 (+0.00 ±x)
    assert "| Full | FullKV | 22.50 | 22.50 |" in lines
    snap = next(line for line in lines if "SnapKV" in line)
    assert "72.50 (+50.00 ±0.0)↑†" in snap
    h2o = next(line for line in lines if "| H2O" in line or "|  | H2O" in line)
    assert "22.50 (+0.00 ±" in h2o and "↑" not in h2o and "↓" not in h2o and "†" not in h2o
    legend = next(line for line in lines if line.startswith("Cells: score (Δ ±h)"))
    assert "n per task: MF-zh 8" in legend and "10,000" not in legend and "500 resamples" in legend
    assert "↑/↓ = Δ ± h excludes 0" in legend and "sign test" in legend
    assert lines.index(legend) > lines.index(snap)  # under the table
    assert table.ci[("r0.1", "snapkv")]["multifieldqa_zh"].sign_p == pytest.approx(2 / 256)


def test_ci_pairs_only_the_common_samples_and_states_n():
    table = add_ci(build_table(ci_rows(extra_h2o_sample=True)), n_resamples=200)
    pair = table.ci[("r0.1", "h2o")]["multifieldqa_zh"]
    assert pair.n == 8  # s99 has no FullKV score
    text = render_markdown(table)
    h2o = next(line for line in text.splitlines() if "H2O" in line)
    assert "n=" not in h2o  # 8 pairs = FullKV's n: nothing to flag
    # the H2O cell itself still averages its own 9 samples: (1.8 + 1.0) / 9 = 31.11
    assert "31.11 (+0.00" in h2o


def test_latex_ci_cells_escape_the_symbols():
    text = render_latex(add_ci(build_table(ci_rows()), n_resamples=200))
    assert r"72.50 (+50.00 $\pm$0.0)$\uparrow$$^\dagger$" in text
    assert "±" not in text and "↑" not in text and "Δ" not in text
    assert r"\caption{Cells: score ($\Delta$ $\pm$h)" in text


def test_ci_needs_fullkv_and_the_score_metric():
    rows = [r for r in ci_rows() if r["method"] != "fullkv"]
    with pytest.raises(InputError, match="FullKV"):
        add_ci(build_table(rows))
    rows = [{**r, "evidence_retention_mean": 0.5} for r in ci_rows()]
    with pytest.raises(InputError, match="score"):
        add_ci(build_table(rows, metric="retention"))


def test_without_ci_nothing_changes():
    plain = render_markdown(build_table(ci_rows()))
    assert "±" not in plain and "Cells:" not in plain


def test_cli_table_ci(tmp_path):
    from typer.testing import CliRunner

    from kvbench.cli import app

    results = tmp_path / "results"
    results.mkdir()
    (results / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ci_rows()))
    out = CliRunner().invoke(app, ["table", "--results", str(results), "--ci", "--resamples", "300"])
    assert out.exit_code == 0, out.output
    assert "72.50 (+50.00 ±0.0)↑†" in out.output and "300 resamples, seed 0" in out.output
