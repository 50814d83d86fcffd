"""What a gate check says about one (method, budget, task), or about one method and budget over its tasks.

Status order: pass < skip < warn < fail. `skip` means the check could not be made there (say why in the
summary) and never fails the gate; `warn` is reported but passes; any `fail` makes `kvbench compare` exit 1."""

from __future__ import annotations

from dataclasses import dataclass

CHECKS = ("exact", "scores", "cost")
STATUSES = ("pass", "skip", "warn", "fail")


@dataclass(frozen=True)
class Finding:
    check: str  # one of CHECKS
    scope: str  # "snapkv r0.1 hotpotqa", or "snapkv r0.1 average" for a method and budget over its tasks
    status: str  # one of STATUSES
    summary: str  # one line
    details: tuple[str, ...] = ()  # what a reader needs to act on it (changed predictions, ratios)

    def __post_init__(self) -> None:
        if self.check not in CHECKS or self.status not in STATUSES:
            raise ValueError(f"bad finding {self.check!r}/{self.status!r}")


def worst(findings: list[Finding]) -> str:
    return max((f.status for f in findings), key=STATUSES.index, default="pass")


@dataclass(frozen=True)
class GateReport:
    findings: tuple[Finding, ...]
    options: str  # the thresholds, as flags, for the reader

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures
