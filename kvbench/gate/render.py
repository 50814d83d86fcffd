"""The gate's report as text, markdown (a GitHub step summary) and JUnit XML (one test case per check and
cell, which GitHub, GitLab and Jenkins display; a warning is a passing case with its message in system-out,
a skip a skipped case)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from kvbench.gate.findings import CHECKS, GateReport, worst

TITLES = {"exact": "exact (predictions reproduced)", "scores": "scores (paired bootstrap 95% CI)",
          "cost": "cost (speed and memory)"}
MD_DETAIL_CHARS = 400  # a detail line longer than this is cut in markdown (step summaries are size-limited)


def _verdict(report: GateReport, check: str) -> str:
    findings = report.of(check)
    status = worst(findings)
    counts = {s: sum(f.status == s for f in findings) for s in ("fail", "warn", "skip")}
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return status.upper() + (f" ({', '.join(parts)} of {len(findings)})" if parts else f" ({len(findings)} checked)")


def overall(report: GateReport) -> str:
    if report.passed:
        return f"Gate ({report.options}): passed."
    first = report.failures[0]
    return (f"Gate ({report.options}): FAILED: {len(report.failures)} check(s); first: "
            f"{first.check} {first.scope}: {first.summary}.")


def text(report: GateReport) -> str:
    out = []
    for check in CHECKS:
        out.append(f"== {TITLES[check]}: {_verdict(report, check)}")
        for f in report.of(check):
            out.append(f"  {f.status.upper():4s}  {f.scope}: {f.summary}")
            if f.status in ("fail", "warn"):
                out += [f"        {d}" for d in f.details]
        out.append("")
    return "\n".join([*out, overall(report)]) + "\n"


def _md_cell(value: str) -> str:
    value = value if len(value) <= MD_DETAIL_CHARS else value[:MD_DETAIL_CHARS] + " …(cut)"
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(report: GateReport) -> str:
    out = []
    for check in CHECKS:
        out += [f"### {TITLES[check]}: {_verdict(report, check)}", "", "| Status | Cell | Result |",
                "|---|---|---|"]
        out += [f"| {f.status} | {f.scope} | {_md_cell(f.summary)} |" for f in report.of(check)]
        flagged = [f for f in report.of(check) if f.status in ("fail", "warn") and f.details]
        for f in flagged:
            out += ["", f"{f.status.upper()} {f.scope}:", ""] + [f"- {_md_cell(d)}" for d in f.details]
        out.append("")
    return "\n".join([*out, f"**{overall(report)}**"]) + "\n"


def junit(report: GateReport) -> str:
    root = ET.Element("testsuites", name="kvbench compare", tests=str(len(report.findings)),
                      failures=str(len(report.failures)))
    for check in CHECKS:
        findings = report.of(check)
        suite = ET.SubElement(root, "testsuite", name=check, tests=str(len(findings)),
                              failures=str(sum(f.status == "fail" for f in findings)),
                              skipped=str(sum(f.status == "skip" for f in findings)))
        for f in findings:
            case = ET.SubElement(suite, "testcase", classname=f"kvbench.compare.{check}", name=f.scope)
            body = "\n".join([f.summary, *f.details])
            if f.status == "fail":
                ET.SubElement(case, "failure", message=f.summary, type=check).text = body
            elif f.status == "skip":
                ET.SubElement(case, "skipped", message=f.summary)
            else:
                ET.SubElement(case, "system-out").text = f"{f.status.upper()}: {body}"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
