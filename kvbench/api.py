"""The Python API: `evaluate` (what `kvbench run` does), `load_results` and `table`.

`evaluate` takes every option of `kvbench run` as a keyword, named as the fields of `runner.RunOptions`
(`ratios`, `budgets`, `method_args`, `max_length`, ...): its keywords are derived from that dataclass, so an
option added to the run is an argument here with nothing to edit. Values are typed (lists of numbers, Paths,
Method instances, a loaded model); errors name arguments (`ratios=`), where the CLI's name flags (`--ratio`).
The CLI calls this same function with the values it parsed."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import InputError
from kvbench.registry import did_you_mean

Row = dict[str, Any]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate(
    model: Any,
    methods: Any,
    *,
    ratios: float | Sequence[float] | None = None,
    budgets: int | Sequence[int] | None = None,
    tasks: str | Sequence[str] = "quick",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    scope: str = "full",
    results: str | os.PathLike | None = "results",
    log: Callable[[str], None] | None = _stderr,
    progress: Any = None,
    **options: Any,
) -> list[Row]:
    """Evaluate KV-cache compression methods on LongBench tasks, as `kvbench run` does; return the rows.

    model: an alias (`kvbench models`), a Hugging Face id, a local directory or a .gguf file; or a loaded
        `(model, tokenizer)` pair (its weights and tokenizer are hashed into the fingerprint; kvbench's attention
        is installed for the run and the previous one restored after).
    methods: a method, preset, `package.module:Class` or entry-point name, a `kvbench.Method` instance, or a
        list of them; "all" for every registered method.
    ratios / budgets: fractions of the prompt's KV kept (0 < r <= 1) / numbers of tokens kept; default 0.1.
    tasks: task and group names (`all`, `en`, `zh`, `e`, `synthetic`, `quick`); default `quick`.
    results: the results directory; rows already there are reused, not recomputed. None: write nothing.
    log: where progress lines go (default stderr; None for silence).
    **options: every other option of `kvbench run` by its field name in `runner.RunOptions`: data, device,
        dtype, gqa_reduce, method_args, presets, max_length, shard, wait, trust_remote_code,
        synthetic_length, seed, hub_revision, ...

    Returns one dict per (sample, method, budget) of the selected samples, in the schema of results/README.md,
    including rows an earlier run had already written to `results`."""
    return run(model, methods, ratios=ratios, budgets=budgets, tasks=tasks, data_dir=data_dir, limit=limit,
               scope=scope, results=results, log=log, progress=progress, **options).rows


def run(model: Any, methods: Any, *, log: Callable[[str], None] | None = _stderr, progress: Any = None,
        **options: Any) -> Any:
    """`evaluate`, returning the run's whole `runner.RunSummary` (rows, result files, counts): what the CLI
    prints after a run."""
    from kvbench import runner

    opts = run_options(model, methods, **options)
    loaded = opts.model if not isinstance(opts.model, str) else None
    try:
        return runner.run(opts, log=log or (lambda _message: None), progress=progress)
    finally:
        if loaded is not None:
            _restore(loaded)


def run_options(model: Any, methods: Any, **options: Any) -> Any:
    """`runner.RunOptions` from API-typed values, every value checked (an error names its argument)."""
    from kvbench import runner

    fields = {f.name: f for f in dataclasses.fields(runner.RunOptions)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"evaluate() got an unexpected keyword argument '{unknown[0]}'"
                        f"{did_you_mean(unknown[0], list(fields))}")
    hints = typing.get_type_hints(runner.RunOptions, vars(runner))
    values = {"model": _model(model, options), "methods": _methods(methods)}
    for name, value in options.items():
        convert = _CONVERTERS.get(name)
        values[name] = convert(name, value) if convert else _simple(name, value, hints[name])
    return runner.RunOptions(**values)


# ---- argument conversion: API types -> RunOptions types ----------------------------------------------------
def _bad(name: str, wanted: str, value: Any) -> InputError:
    return InputError(f"{{{name}}} must be {wanted}, got {value!r}", options=(name,))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(name: str, value: Any, kind: type) -> tuple | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value]
    ok = all(_is_number(v) and (kind is float or isinstance(v, int)) for v in items)
    if not ok or not items:
        raise _bad(name, f"a {kind.__name__} or a non-empty list of them", value)
    return tuple(kind(v) for v in items)


def _names(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise _bad(name, "a name or a list of names", value)
    return tuple(items)


def _methods(value: Any) -> tuple:
    from kvbench.methods.base import Method

    items = [value] if isinstance(value, (str, Method)) else list(value) if isinstance(value, Iterable) else None
    if items is None or not all(isinstance(v, (str, Method)) for v in items):
        raise _bad("methods", "a method name, a kvbench.Method instance, or a list of them", value)
    return tuple(items)


def _shard(name: str, value: Any) -> Any:
    from kvbench.results.store import Shard

    if isinstance(value, Shard):
        value = (value.index, value.count)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)
            and 0 <= value[0] < value[1]):
        raise _bad(name, "a pair (i, n) with 0 <= i < n", value)
    return Shard(*value)


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(name, "a mapping of parameter name -> value", value)
    return dict(value)


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "ratios": lambda n, v: _numbers(n, v, float),
    "budgets": lambda n, v: _numbers(n, v, int),
    "tasks": _names,
    "shard": _shard,
    "method_args": _mapping,
}


def _simple(name: str, value: Any, hint: Any) -> Any:
    """A value for a field of a plain type (str, int, float, bool, Path, or one of them | None); values of
    other types pass unchanged, for the run to check."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and _is_number(value):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is Path and isinstance(value, (str, os.PathLike)):
            return Path(value)
    if all(k in (bool, int, float, str, Path, type(None)) for k in kinds):
        wanted = " or ".join("None" if k is type(None) else "a path" if k is Path else k.__name__ for k in kinds)
        raise _bad(name, wanted, value)
    return value


def _model(value: Any, options: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return adopt(value[0], value[1], max_length=options.get("max_length"))
    raise _bad("model", "a model name or path, or a loaded (model, tokenizer) pair", value)


# ---- a model the caller loaded ------------------------------------------------------------------------------
def adopt(model: Any, tokenizer: Any, max_length: int | None = None) -> Any:
    """A `(model, tokenizer)` loaded by the caller, as the run's LoadedModel. Its identity in fingerprints is
    the sha256 of every tensor of its state dict plus its tokenizer's definition: a model changed in memory
    never shares rows with the original. The caller's attention implementation is restored after the run."""
    import torch

    from kvbench import models
    from kvbench.engine import attention

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise _bad("model", "a transformers model (with a .config) in the pair (model, tokenizer)", model)
    if not hasattr(tokenizer, "encode"):
        raise _bad("model", "a tokenizer as the pair's second item", tokenizer)
    if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
        raise _bad("max_length", "a positive int", max_length)
    parameter = next(model.parameters())
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    spec = models.ModelSpec(name=name, max_length=max_length, chat="template" if tokenizer.chat_template else "none")
    models.check_supported(model.config, tokenizer, spec)
    identity = f"loaded:weights-sha256:{weights_digest(model)[:16]}:tokenizer-sha256:{tokenizer_digest(tokenizer)[:12]}"
    previous = (getattr(model.config, "_attn_implementation", None), model.training)
    model.eval()
    attention.install(model)
    loaded = models.LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=parameter.device,
                                dtype=parameter.dtype, identity=identity)
    loaded.stop_ids = models.stop_token_ids(loaded)
    loaded._previous = previous  # type: ignore[attr-defined]
    return loaded


def _restore(loaded: Any) -> None:
    implementation, training = getattr(loaded, "_previous", (None, False))
    if implementation:
        loaded.model.set_attn_implementation(implementation)
    loaded.model.train(training)


def weights_digest(model: Any) -> str:
    """sha256 over the state dict, tensor by tensor in name order: name, dtype, shape and raw bytes."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of a tokenizer's full definition (the fast tokenizer's JSON) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((text + "\n" + str(tokenizer.chat_template or "")).encode("utf-8")).hexdigest()


# ---- results ------------------------------------------------------------------------------------------------
def load_results(path: str | os.PathLike = "results") -> Any:
    """Every row under a results directory (shards merged) as a pandas DataFrame, one column per row field
    (results/README.md). Needs the optional extra `pandas`."""
    try:
        import pandas
    except ImportError:
        raise ImportError("kvbench.load_results needs pandas, an optional extra: pip install 'kvbench[pandas]'") \
            from None
    from kvbench.results.store import load_all_rows

    return pandas.DataFrame(load_all_rows(Path(path)))


def table(
    results: str | os.PathLike = "results",
    *,
    format: str = "md",
    model: str | None = None,
    tasks: str | Sequence[str] | None = None,
    metric: str = "score",
    ci: bool = False,
    resamples: int = 10_000,
    ci_seed: int = 0,
    protocol: str | None = None,
    on_skipped: Callable[[str], None] | None = None,
) -> str:
    """The comparison table of stored results, as `kvbench table` prints it (md, latex or csv). `protocol`: only
    rows of this protocol fingerprint (or a unique prefix). Lines of the result files that hold no usable row are
    named under a markdown table; for latex and csv, which have no place for them, `on_skipped` hears that note.
    Torch-free: the results readers never import the model code."""
    from kvbench.results import report, selection, store

    loaded = selection.scored(store.load_results(Path(results)))
    if model is not None:
        model = report.stored_model_name(loaded.rows, model)
    names = list(_names("tasks", tasks)) if tasks is not None else None
    rows = selection.pick(loaded, model=model, tasks=names, protocol=protocol)
    built = report.build_table(rows, names, model, metric=metric)
    if ci:
        if resamples < 1:
            raise InputError(f"{{resamples}} must be >= 1, got {resamples}", options=("resamples",))
        report.add_ci(built, resamples, ci_seed)
    built.skipped = selection.skipped_note(loaded.skipped)
    if built.skipped and on_skipped is not None and format not in ("md", "markdown"):
        on_skipped(built.skipped)
    return report.render(built, format)

