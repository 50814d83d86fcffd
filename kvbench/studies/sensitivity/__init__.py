"""Context-truncation sensitivity (methods.md §6): how far the next-token distribution moves when only part of
the context is kept, whether that decays polynomially in the kept window (the claims of arXiv 2605.25085, of
which only the abstract exists), and whether registered compression methods beat the suffix-only scaling.

Modules, in the order a study runs them:
  options   what `kvbench sensitivity` takes, the protocol's defaults, the up-front checks
  policies  the built-in kept sets (sliding, sink_recent, random) and position modes
  plan      documents, grid, t range, fit range, query positions: a pure plan, the same on every rerun
  measure   cells (one per row), the full pass, M1 re-encoding, M2 prefill-then-evict on the engine's hooks
  study     orchestration: resume from kl_raw.jsonl, measure what is missing, analyse, write
  fits      power law vs exponential, holdout error, windows for a target distortion
  analysis  curves with bootstrap CIs over documents, and every number of T1-T4
  scaling   registered methods' exponent beta against the sliding window's alpha
  verdicts  claim by claim, with the numbers that decided it
  tables, figures, outputs   T1-T4 and summary.md, F1-F4, manifest.json"""

from kvbench.studies.sensitivity.options import SCALING_METHODS, SensitivityOptions
from kvbench.studies.sensitivity.study import SensitivityResult, run_sensitivity

__all__ = ["SCALING_METHODS", "SensitivityOptions", "SensitivityResult", "run_sensitivity"]
