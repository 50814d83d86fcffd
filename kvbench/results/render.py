"""Tables as text: markdown, LaTeX, CSV and aligned plain text, from a header and rows of cell strings.

The one renderer of `kvbench table`, `score` and `compare`: they decide what the cells say (numbers already
formatted); this module decides only the syntax. The first `left` columns are labels (left-aligned), the
rest are numbers (right-aligned). `bold` marks cells to emphasise (an empty cell is never marked up)."""

from __future__ import annotations

import csv as csv_module
import io
from collections.abc import Sequence

Rows = Sequence[Sequence[str]]
Marks = Sequence[Sequence[bool]] | None

_LATEX = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("–", "--"),
          ("±", r"$\pm$"), ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$"), ("†", r"$^\dagger$"), ("Δ", r"$\Delta$"),
          ("≥", r"$\geq$"))


def _marked(rows: Rows, bold: Marks) -> list[list[tuple[str, bool]]]:
    if bold is None:
        return [[(cell, False) for cell in row] for row in rows]
    return [[(cell, mark and cell != "") for cell, mark in zip(row, marks)] for row, marks in zip(rows, bold)]


def markdown(header: Sequence[str], rows: Rows, left: int, bold: Marks = None) -> list[str]:
    """A GitHub-flavoured markdown table, one string per line (no trailing newline)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    out = [line(header), "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    for row in _marked(rows, bold):
        out.append(line([f"**{cell}**" if mark else cell for cell, mark in row]))
    return out


def latex_escape(text: str) -> str:
    for plain, escaped in _LATEX:
        text = text.replace(plain, escaped)
    return text


def latex(header: Sequence[str], rows: Rows, left: int, bold: Marks = None, rules_before: Sequence[int] = (),
          caption: str | None = None) -> str:
    """A booktabs `table` float; `rules_before`: row indices that start a block (a \\midrule above them)."""
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           rf"\begin{{tabular}}{{{'l' * left + 'r' * (len(header) - left)}}}", r"\toprule",
           " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for index, row in enumerate(_marked(rows, bold)):
        if index in rules_before:
            out.append(r"\midrule")
        out.append(" & ".join(rf"\textbf{{{latex_escape(c)}}}" if m else latex_escape(c) for c, m in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption is not None:
        out.append(rf"\caption{{{latex_escape(caption)}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def csv(header: Sequence[str], rows: Rows) -> str:
    """RFC 4180 CSV with '\\n' line ends. Cells are written as given: numbers without thousands separators
    and empty cells for missing values are the caller's to choose (see the callers' csv cell formats)."""
    buffer = io.StringIO()
    writer = csv_module.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def text(header: Sequence[str], rows: Rows, left: int) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, labels left and numbers right; one string per line."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in table]
