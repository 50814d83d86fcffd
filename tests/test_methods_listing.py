"""`kvbench methods` against issue #14's first Done-when line: at least 24 registered methods (presets apart),
the names the issue lists (an alias counts when the listing shows it), and the head-adaptive methods grouped
in their own family with their query-aware / head-adaptive flags."""

from __future__ import annotations

import sys

from kvbench.methods import METHODS, build

ISSUE_14 = ["snapkv_adakv", "criticalkv", "expected_attention", "keydiff", "think", "lagkv", "observed_attention",
            "headkv", "duoattention", "kivi2", "kivi4"]


def listing(capsys, monkeypatch) -> str:
    from kvbench import cli

    monkeypatch.setattr(sys, "argv", ["kvbench", "methods"])
    cli.main()
    return capsys.readouterr().out


def test_methods_lists_issue_14(capsys, monkeypatch):
    out = listing(capsys, monkeypatch)
    lines = out.splitlines()
    registered = [line.split()[0] for line in lines if line and not line.startswith((" ", "[", "query-aware:"))
                  and " preset of " not in line]
    assert len(registered) == len(METHODS.names()) >= 24
    aliases = [name for line in lines if line.strip().startswith("also:")
               for name in line.split("also:")[1].replace(",", " ").split()]
    presets = [line.split()[0] for line in lines if " preset of " in line]
    for name in ISSUE_14:
        assert name in registered or name in aliases or name in presets, name
    assert "duoattention" in aliases and build("duoattention").base == "duo_attention"
    assert build("snapkv+kivi4").method.name == "kivi4"


def test_head_adaptive_family_and_flags(capsys, monkeypatch):
    out = listing(capsys, monkeypatch)
    chunk = out.split("[head-adaptive budgets]\n")[1].split("\n\n")[0]
    first = {line.split()[0]: line.split(maxsplit=1)[1] for line in chunk.splitlines() if not line.startswith(" ")}
    assert first == {"adakv": "query-aware, head-adaptive", "headkv": "query-aware, head-adaptive",
                     "duo_attention": "head-adaptive", "critical_adakv": "query-aware, head-adaptive"}
    assert build("adakv", {"inner": "keydiff"}).method.query_aware is False  # the inner method's
    assert build("adakv", {"inner": "keydiff"}).method.head_adaptive is True  # whatever the inner method
