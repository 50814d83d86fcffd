"""What `kvbench sensitivity` takes (SensitivityOptions), the protocol's defaults (full and --quick), and the
checks that refuse bad input before anything is loaded or written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import InputError
from kvbench.studies.sensitivity.policies import APPLY_MODES, POLICIES, POS_MODES
from kvbench.studies.sensitivity.verdicts import EPSILONS

# methods.md §6.4 window/budget grid
SPEC_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
QUICK_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # [ours] powers of two up to 512
SPEC_FIT_RANGE = (8, 256)
QUICK = {"docs": 8, "positions": 2, "seeds": 1}
FULL = {"docs": 64, "positions": 8, "seeds": 5}
# The registered methods of the method-scaling table (issue #20); `--methods` takes any registered name or preset.
SCALING_METHODS = ("snapkv", "h2o_prefill", "tova", "knorm", "chunkkv", "streamingllm_prefill")


@dataclass
class SensitivityOptions:
    """What `kvbench sensitivity` takes. None means "the default for this mode" (--quick or full)."""

    model: str = "smollm2-135m"
    data_dir: Path | None = None
    tasks: str = "multi_news"
    docs: int | None = None  # documents (full 64, quick 8)
    positions: int | None = None  # query positions t per document (full 8, quick 2)
    windows: Sequence[int] | None = None  # window/budget grid (full: spec grid up to an automatic w_max)
    policies: Sequence[str] = POLICIES  # built-in kept-set rules: sliding, sink_recent, random
    methods: Sequence[str] = ()  # registered kvbench methods or presets, measured in M2 only
    seeds: int | None = None  # random-retention repeats R (full 5, quick 1)
    other_max_budget: int | None = None  # largest B for sink_recent and random (quick: the fit range's hi)
    sliding_pos_modes: Sequence[str] | None = None  # position modes of the sliding window (quick: contiguous)
    quick: bool = False
    out_dir: Path | None = None  # default results/sensitivity/<model>
    device: str = "auto"
    dtype: str = "auto"
    max_doc_tokens: int | None = None  # read at most this many tokens per document (default t_max + 1)
    fit_range: tuple[int, int] | None = None  # (w_lo, w_hi), full [8, 256], quick [8, 128]
    sink: int = 4
    t_range: tuple[int, int] | None = None  # default [4 w_max, 5 w_max], clipped to the model's positions
    apply_modes: Sequence[str] = APPLY_MODES
    pos_modes: Sequence[str] = POS_MODES
    bos_prepend: bool = False
    epsilons: Sequence[float] = EPSILONS
    bootstrap: int = 1000
    seed: int = 0
    batch_tokens: int = 8192  # cap on tokens per batched forward (memory bound)
    threads: int | None = None  # torch CPU threads; None: auto (1 while other processes saturate the CPUs)


def method_label(name: str) -> str:
    """A registered method's `policy` in the rows: its name, or method:NAME where the name is also a built-in
    policy (the registry's sliding and sink_recent are measured apart from the built-in rules)."""
    name = name.strip().lower()
    name = name.split(":", 1)[1] if name.startswith("method:") else name
    return f"method:{name}" if name in POLICIES else name


def check_policies(policies: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in policies if p.strip()))
    if not chosen:
        raise InputError(f"--policies is empty; valid policies: {', '.join(POLICIES)}")
    for p in chosen:
        if p not in POLICIES:
            hint = "; registered methods go in --methods" if ":" in p or _is_method(p) else ""
            raise InputError(f"--policies: unknown policy '{p}'; valid policies: {', '.join(POLICIES)}{hint}")
    return chosen


def _is_method(name: str) -> bool:
    from kvbench.methods import all_names

    return name.split(":", 1)[-1] in all_names()


def build_methods(names: Sequence[str]) -> dict[str, object]:
    """label -> Method for every --methods name (registered method or preset; unknown names are refused with
    the registry's did-you-mean). The name `scaling` stands for SCALING_METHODS."""
    from kvbench.methods import build

    out: dict[str, object] = {}
    expanded = [m for name in names for m in (SCALING_METHODS if name.strip().lower() == "scaling" else (name,))]
    for name in expanded:
        if not name.strip():
            continue
        label = method_label(name)
        out[label] = build(label.split(":", 1)[1] if label.startswith("method:") else label).method
    return out


def check_modes(opts: SensitivityOptions) -> None:
    for m in opts.apply_modes:
        if m not in APPLY_MODES:
            raise InputError(f"apply mode must be M1 or M2, got '{m}'")
    for m in opts.pos_modes:
        if m not in POS_MODES:
            raise InputError(f"position mode must be contiguous or original, got '{m}'")
    if opts.methods and "M2" not in opts.apply_modes:
        raise InputError("--methods: registered methods are measured in M2 (prefill-then-evict) only")
    if opts.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {opts.bootstrap}")


def check_out_dir(path: Path) -> None:
    """Refuse an --out that cannot hold the study (a file, a path under a file, a read-only or virtual file
    system such as /proc), creating nothing: the probe is a temporary directory removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"--out {path}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".kvbench-probe-"))
    except OSError as exc:
        raise InputError(f"--out {path} is not writable ({exc.strerror or type(exc).__name__} in {ancestor})") from None
