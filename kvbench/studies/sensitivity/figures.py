"""The study's figures, drawn through kvbench.results.plots (matplotlib, the `plot` extra, Agg backend):
F1 D(w) of the sliding window with both fits, F2 the policies at equal budget, F3 the position-preserving
ablation, F4 the registered methods' D(B) against the sliding window with their power laws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvbench.results import plots
from kvbench.studies.sensitivity.policies import POLICIES, PRIMARY_POS_MODE
from kvbench.studies.sensitivity.verdicts import fmt


def available() -> bool:
    """Whether matplotlib can be imported (checked before a study computes anything)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _log_axes(ax: Any, xlabel: str, title: str, ylabel: str | None = None) -> None:
    """Log-log axes, labels and a small legend: the frame every sensitivity figure shares."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plots.pyplot().close(fig)


def figure_f1(path: Path, model: str, a: dict[str, Any]) -> None:
    plt = plots.pyplot()
    s = a.get("sliding")
    key = f"M1/sliding/{(s or {}).get('pos_mode', PRIMARY_POS_MODE)}"
    e = a["curves"].get(key)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if e and s:
        x, m = np.array(e["B"], float), np.array(e["mean"], float)
        lo, hi = a["fit_range"]
        ax.axvspan(lo, hi, color="0.92", label=f"fit range [{lo}, {hi}]")
        if "ci_lo" in e:
            ax.fill_between(x, e["ci_lo"], e["ci_hi"], color="C0", alpha=0.25, label="95% CI (docs)")
        hold = x > hi
        ax.plot(x[~hold], m[~hold], "o", color="C0", label="mean KL (fit / other)")
        if hold.any():
            ax.plot(x[hold], m[hold], "s", mfc="none", color="C3", ms=8, label="holdout")
        xx = np.geomspace(x.min(), x.max(), 200)
        if s.get("alpha") is not None:
            ax.plot(xx, s["C"] * xx ** (-s["alpha"]), "-", color="C1",
                    label=f"power law alpha={s['alpha']:.3f} (err {fmt(s['err_pow'], '.2f')} dec)")
        if s.get("lambda") is not None:
            with np.errstate(over="ignore", under="ignore"):
                yy = s["C_exp"] * np.exp(-s["lambda"] * xx)
            ax.plot(xx, np.clip(yy, 1e-12, None), "--", color="C2",
                    label=f"exponential lambda={s['lambda']:.3g} (err {fmt(s['err_exp'], '.2f')} dec)")
        ax.set_ylim(max(1e-6, np.nanmin(m) / 20), np.nanmax(m) * 3)
    _log_axes(ax, "kept window w (tokens)", f"F1 truncation sensitivity, {model}", "mean KL(P_full || Q_w) (nats)")
    _save(fig, path)


def figure_f2(path: Path, model: str, a: dict[str, Any]) -> None:
    """The built-in policies at equal budget (registered methods are F4's)."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = {"sliding": "C0", "sink_recent": "C1", "random": "C3"}
    for key, e in sorted(a["curves"].items()):
        apply, policy, mode = key.split("/")
        if policy not in POLICIES or (apply == "M1" and mode != PRIMARY_POS_MODE) or (apply == "M2" and mode != "original"):
            continue
        color = colors[policy]
        x = np.array(e["B"], float)
        style = "-o" if apply == "M1" else ":^"
        ax.plot(x, e["mean"], style, color=color, ms=4, label=f"{policy} ({apply}{', ' + mode if apply == 'M1' else ''})")
        if "ci_lo" in e and apply == "M1":
            ax.fill_between(x, e["ci_lo"], e["ci_hi"], color=color, alpha=0.15)
    _log_axes(ax, "budget B (kept tokens, x_t included)", f"F2 policies at equal budget, {model}", "mean KL (nats)")
    _save(fig, path)


def figure_f3(path: Path, model: str, a: dict[str, Any]) -> None:
    plt = plots.pyplot()
    policies = [p for p in POLICIES if f"M1/{p}/contiguous" in a["curves"] or f"M1/{p}/original" in a["curves"]]
    fig, axes = plt.subplots(1, max(1, len(policies)), figsize=(4.2 * max(1, len(policies)), 3.8), squeeze=False)
    for ax, policy in zip(axes[0], policies):
        for mode, style in (("contiguous", "-o"), ("original", "--s")):
            e = a["curves"].get(f"M1/{policy}/{mode}")
            if e:
                ax.plot(e["B"], e["mean"], style, ms=4, mfc="none" if mode == "original" else None, label=mode)
        _log_axes(ax, "B", policy)
    axes[0][0].set_ylabel("mean KL (nats)")
    fig.suptitle(f"F3 position-preserving ablation, {model}")
    _save(fig, path)


def figure_f4(path: Path, model: str, a: dict[str, Any]) -> None:
    """Mean KL vs budget of every registered method (M2) and of the sliding window (M1, and M2 dotted), each with
    its fitted power law over the fit range."""
    plt = plots.pyplot()
    ms = a.get("method_scaling") or {}
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    lo, hi = ms.get("fit_range", a["fit_range"])
    ax.axvspan(lo, hi, color="0.93", label=f"fit range [{lo}, {hi}]")
    ref = ms.get("reference") or {}
    curves = [(ref.get("key"), f"sliding M1 (alpha {fmt(ref.get('alpha'))})", ref.get("alpha"), ref.get("C"), "k", "-o")]
    m2 = ms.get("m2_sliding")
    if m2:
        curves.append((m2["key"], f"sliding M2 ({fmt(m2.get('exponent'))})", m2.get("exponent"), m2.get("C"), "0.5", ":o"))
    for i, m in enumerate(ms.get("methods", [])):
        curves.append((f"M2/{m['label']}/original", f"{m['label']} (beta {fmt(m.get('beta'))})", m.get("beta"), m.get("C"),
                       f"C{i % 10}", "-^"))
    for key, label, rate, c, color, style in curves:
        e = a["curves"].get(key) if key else None
        if not e:
            continue
        x, m = np.array(e["B"], float), np.array(e["mean"], float)
        ok = (x > 0) & (m > 0)
        ax.plot(x[ok], m[ok], style, color=color, ms=3, lw=1, label=label)
        if rate is not None and c is not None:
            xx = np.geomspace(lo, hi, 50)
            ax.plot(xx, c * xx ** (-rate), "--", color=color, lw=0.8)
    _log_axes(ax, "budget B (kept tokens, x_t included)", f"F4 registered methods vs suffix-only scaling, {model}",
              "mean KL (nats)")
    _save(fig, path)
