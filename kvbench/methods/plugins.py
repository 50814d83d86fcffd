"""Methods from outside kvbench: a `Method` subclass named as `package.module:Class`, or published by an
installed package under the entry-point group `kvbench.methods` (`name = "package.module:Class"`).
(`register_method`, the third way, lives with the registry in kvbench.methods.)

A method's code enters its config fingerprint: its `version` class attribute (runner.config_fields) and, for
every class of its lineage defined outside kvbench, a hash of the defining module's source (`source_version`).
A changed plugin thus writes new result files and never mixes with rows of its old code."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import marshal
import sys
from importlib import metadata

from kvbench.errors import InputError
from kvbench.methods.base import Method

ENTRY_POINT_GROUP = "kvbench.methods"


def is_reference(name: str) -> bool:
    """`package.module:Class`: a method named by where it is defined."""
    return ":" in name


def load_reference(reference: str) -> type[Method]:
    """Import `package.module:Class` (the module must be importable: installed, or on PYTHONPATH)."""
    module_name, _, attr = reference.strip().partition(":")
    if not module_name or not attr:
        raise InputError(f"{{methods}} '{reference}': a method from a module is written package.module:Class",
                         options=("methods",))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{{methods}} '{reference}': cannot import {module_name} ({exc}); is it installed or "
                         "on PYTHONPATH?", options=("methods",)) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{{methods}} '{reference}': {module_name} has no '{attr}'", options=("methods",))
        obj = getattr(obj, part)
    return checked_class(obj, reference)


def checked_class(obj: object, where: str) -> type[Method]:
    """A usable method class: a Method subclass whose own annotated attributes are dataclass fields (a field
    that is not one would escape both --method-arg and the fingerprint)."""
    if not (inspect.isclass(obj) and issubclass(obj, Method)):
        raise InputError(f"{where}: {obj!r} is not a subclass of kvbench.Method")
    fields = {f.name for f in dataclasses.fields(obj)}
    own = [k for k, v in inspect.get_annotations(obj).items() if "ClassVar" not in str(v) and k not in fields]
    if own:
        raise InputError(f"{where}: {obj.__qualname__} declares {', '.join(own)} but is not a @dataclass; decorate "
                         "it with @dataclasses.dataclass so its hyper-parameters are fields")
    return obj


def entry_points() -> dict[str, metadata.EntryPoint]:
    """Installed `kvbench.methods` entry points by (lower-cased) name."""
    return {ep.name.strip().lower(): ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_entry_point(name: str) -> type[Method] | None:
    """The class an installed package publishes under `name`, or None when no package does."""
    ep = entry_points().get(name.strip().lower())
    if ep is None:
        return None
    dist = getattr(ep.dist, "name", None) or "an installed package"
    where = f"entry point '{ep.name}' ({ep.value}) of {dist}"
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not crash kvbench with its own traceback
        raise InputError(f"{where}: cannot load it ({type(exc).__name__}: {exc})") from None
    return checked_class(obj, where)


def in_tree(cls: type) -> bool:
    return cls.__module__ == "kvbench" or cls.__module__.startswith("kvbench.")


def source_digest(module_name: str) -> str:
    """sha256 (12 hex) of a module's source; for code without a source file (a REPL), of its compiled code."""
    module = sys.modules.get(module_name)
    try:
        text = inspect.getsource(module)  # type: ignore[arg-type]
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    except (OSError, TypeError):
        pass
    digest = hashlib.sha256()
    for name, value in sorted(vars(module).items()) if module is not None else ():
        for fn in _functions(value):
            digest.update(name.encode() + marshal.dumps(fn.__code__))
    return digest.hexdigest()[:12]


def _functions(value: object):
    if inspect.isfunction(value):
        yield value
    elif inspect.isclass(value):
        for member in vars(value).values():
            if inspect.isfunction(member):
                yield member


def source_version(cls: type[Method]) -> str:
    """`src:<hash>` of each module outside kvbench that defines a class of the method's lineage, joined by '+';
    empty for a built-in method (whose `version` alone tracks its code)."""
    modules = sorted({k.__module__ for k in cls.__mro__ if issubclass(k, Method) and not in_tree(k)})
    return "+".join(f"src:{source_digest(m)}" for m in modules)
