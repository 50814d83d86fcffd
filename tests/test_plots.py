"""`kvbench plot` writes its PNG figures from hand-written rows (and a hand-written kl_raw.jsonl); the
`--metric retention|overlap` tables from the same rows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from kvbench.results import plots  # noqa: E402
from kvbench.errors import InputError  # noqa: E402
from kvbench.results.report import build_table, render_markdown  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"

# (method, budget) -> per task (score, cache_bytes, retention, overlap) for samples s0, s1
CONFIGS = {
    ("fullkv", "full"): (0.50, 1000, 1.0, None),
    ("snapkv", "r0.1"): (0.40, 100, 0.6, 0.3),
    ("snapkv", "r0.3"): (0.45, 300, 0.8, 0.4),
    ("chunkkv", "r0.1"): (0.42, 100, 0.7, 0.6),
    ("chunkkv", "r0.3"): (0.48, 300, 0.9, 0.7),
}
TASKS = ("passage_retrieval_zh", "multifieldqa_zh")


def make_rows() -> list[dict]:
    rows = []
    for (method, budget), (score, size, retention, overlap) in CONFIGS.items():
        for task in TASKS:
            evidence = task == "passage_retrieval_zh"
            for i in range(2):
                rows.append({
                    "_id": f"{task}-{i}", "task": task, "model": "smollm2-135m", "method": method, "budget": budget,
                    "score": score + 0.1 * i, "length": 1000, "cache_bytes": size + i, "protocol_fp": "p",
                    "task_fp": f"t-{task}", "config_fp": f"c-{method}-{budget}-{task}",
                    "evidence_tokens": 50 if evidence else None,
                    "evidence_retention_mean": retention if evidence else None,
                    "evidence_retention_min": retention / 2 if evidence else None,
                    "layer_overlap": overlap,
                })
    return rows


def write_results(root, rows, kl: bool = False):
    (root / "m" / "t").mkdir(parents=True)
    (root / "m" / "t" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if kl:
        sens = root / "sensitivity"
        sens.mkdir()
        lines = [{"model": "smollm2-135m", "doc_id": f"d{d}", "t": 500, "policy": policy, "B": b, "pos_mode": "contiguous",
                  "apply_mode": "M1", "seed": 0, "kl_fwd": scale / b, "kl_rev": 0.0, "tv": 0.0, "n_kept": b}
                 for policy, scale in (("sliding", 1.0), ("random", 100.0)) for b in (4, 16, 64) for d in range(2)]
        (sens / "kl_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG


def test_plots_written(tmp_path):
    results, out = tmp_path / "results", tmp_path / "plots"
    write_results(results, make_rows(), kl=True)
    written = plots.plot_results(results, out)
    assert sorted(p.name for p in written) == ["kl_vs_budget.png", "score_vs_cache.png", "score_vs_ratio.png"]
    for path in written:
        assert_png(path)


def test_kl_curves_average_over_documents():
    rows = [{"model": "m", "policy": "sliding", "B": 8, "pos_mode": "original", "kl_fwd": v} for v in (0.1, 0.3)]
    rows.append({"model": "m", "policy": "sliding", "B": 8, "pos_mode": "original", "apply_mode": "M2", "kl_fwd": 9.0})
    curves = plots.kl_curves(rows)
    assert curves["m"]["sliding (original)"] == [(8.0, pytest.approx(0.2))]
    assert curves["m"]["sliding (original) [M2]"] == [(8.0, 9.0)]


def test_several_models_get_prefixed_files(tmp_path):
    rows = make_rows() + [{**r, "model": "other/model", "config_fp": r["config_fp"] + "-o"} for r in make_rows()]
    write_results(tmp_path / "results", rows)
    names = sorted(p.name for p in plots.plot_results(tmp_path / "results", tmp_path / "plots"))
    assert names == ["other-model_score_vs_cache.png", "other-model_score_vs_ratio.png",
                     "smollm2-135m_score_vs_cache.png", "smollm2-135m_score_vs_ratio.png"]


def test_plot_errors(tmp_path):
    with pytest.raises(InputError):
        plots.plot_results(tmp_path / "missing", tmp_path / "plots")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no result rows"):
        plots.plot_results(tmp_path / "empty", tmp_path / "plots")


def test_cli_plot(tmp_path):
    from typer.testing import CliRunner

    from kvbench.cli import app

    write_results(tmp_path / "results", make_rows())
    out = CliRunner().invoke(app, ["plot", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "figs")])
    assert out.exit_code == 0, out.output
    assert_png(tmp_path / "figs" / "score_vs_ratio.png")


def test_retention_and_overlap_tables():
    # Retention x100 on PR-zh only (MF-zh has no known evidence: left out and named in the footer):
    #   FullKV 100.00, SnapKV 10% 60.00, ChunkKV 10% 70.00 (bold, best of its block)
    text = render_markdown(build_table(make_rows(), metric="retention"))
    lines = text.splitlines()
    assert lines[0] == "| KV | Method | PR-zh | Avg |"
    assert "| Full | FullKV | 100.00 | 100.00 |" in lines
    assert "| 10% | SnapKV | 60.00 | 60.00 |" in lines
    assert "|  | ChunkKV | **70.00** | **70.00** |" in lines
    assert "left out: MF-zh" in text and "Evidence retention" in text
    assert "Samples with evidence in the prompt (the rest lost it to middle truncation): PR-zh 2." in text
    # Overlap x100: FullKV has none (no block); no bold (higher is not better); Avg over both tasks.
    text = render_markdown(build_table(make_rows(), metric="overlap"))
    assert "FullKV" not in text.split("\n\n")[0]
    assert "| 10% | SnapKV | 30.00 | 30.00 | 30.00 |" in text.splitlines()
    assert "**" not in text
    with pytest.raises(InputError, match="metric="):
        build_table(make_rows(), metric="nope")
    no_fields = [{k: v for k, v in r.items() if not k.startswith(("evidence", "layer"))} for r in make_rows()]
    with pytest.raises(InputError, match="no row has a value"):
        build_table(no_fields, metric="retention")


@pytest.mark.parametrize("low, high", [(1.2e-3, 6e-3), (0.08, 0.4), (0.5, 40.0), (1.1, 1.4), (0.15, 45.0), (0.012, 9.5), (0.01, 500.0), (3.0, 2048.0)])
def test_log_axis_labels_do_not_overlap(low, high):
    """score_vs_cache's x axis (and the KL figure's axes) in a panel of the real size: at least two labels,
    none overlapping another (matplotlib's default labelled every minor tick of a narrow log axis in
    scientific notation, and they collided)."""
    plt = plots._pyplot()
    fig, axes = plots._grid(plt, 5)
    ax = axes[0]
    xs = [low, (low * high) ** 0.5, high]
    ax.plot(xs, [1, 2, 3], marker="o")
    plots.log_ticks(ax.xaxis, xs)
    fig.tight_layout()
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels(which="both")
              if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    plt.close(fig)
    assert len(boxes) >= 2, [t.get_text() for t in labels]
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, f"labels overlap on [{low}, {high}]: {[t.get_text() for t in labels]}"
