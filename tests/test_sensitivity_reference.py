"""Today's sensitivity study gives the raw rows of the study it replaced.

tests/fixtures/sensitivity_reference.jsonl was written once by the pre-split kvbench/sensitivity.py (commit
df4291b) from the inputs in tests/fixtures/sensitivity_reference.py: the --quick protocol on a small grid,
M1 and M2, and four registered methods in M2. Here the package runs the same inputs and every reference row must
come back with the same key fields and the same numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import sensitivity_reference as R  # noqa: E402

from kvbench.studies.sensitivity import SensitivityOptions, run_sensitivity  # noqa: E402
from kvbench.studies.sensitivity.plan import Document  # noqa: E402

KEY = ("doc_id", "t", "policy", "B", "pos_mode", "apply_mode", "seed")


def key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was written with one thread: the same float arithmetic
    try:
        docs = [Document(d, task, ids) for d, task, ids in R.documents()]
        methods = tuple(m.split(":", 1)[-1] for m in R.METHODS)  # method:sliding is --methods sliding today
        opts = SensitivityOptions(policies=R.POLICIES, methods=methods, out_dir=out, **R.option_values())
        run_sensitivity(opts, lambda line: None, loaded=R.Loaded(R.make_model()), documents=docs)
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (out / "kl_raw.jsonl").read_text().splitlines()]


def test_the_quick_protocol_gives_the_pre_split_rows(rows):
    reference = [json.loads(line) for line in R.FIXTURE.read_text().splitlines()]
    builtin = {key(r): r for r in reference if r["policy"] in R.POLICIES}
    assert len(builtin) == 162 and {r["apply_mode"] for r in builtin.values()} == {"M1", "M2"}
    new = {key(r): r for r in rows}
    assert len(new) == len(rows), "a measurement appears twice"
    # the built-in policies: exactly the same measurements, nothing more, nothing less
    assert {k for k, r in new.items() if r["policy"] in R.POLICIES} == set(builtin)
    for k, old in builtin.items():
        assert {f: new[k][f] for f in R.ROW_FIELDS} == old, k


def test_registered_methods_give_the_pre_split_rows(rows):
    """Registered methods are now scored through the engine's PrefillObserver instead of a recorder of their
    own, and measured on the whole grid (before: up to the fit range's hi in --quick): every reference row is
    still there with the same numbers."""
    reference = [json.loads(line) for line in R.FIXTURE.read_text().splitlines()]
    methods = {key(r): r for r in reference if r["policy"] not in R.POLICIES}
    assert len(methods) == 72 and {r["policy"] for r in methods.values()} == set(R.METHODS)
    new = {key(r): r for r in rows}
    for k, old in methods.items():
        assert {f: new[k][f] for f in R.ROW_FIELDS} == old, k
    extra = {k[3] for k, r in new.items() if r["policy"] not in R.POLICIES and k not in methods}
    assert extra == {16, 32}  # the budgets above --quick's cut, now measured too
