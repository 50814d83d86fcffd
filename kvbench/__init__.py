"""kvbench: faithful LongBench evaluation of KV-cache compression methods.

The public API is what `__all__` lists: `evaluate`, `load_results` and `table` (kvbench.api), the `Method` base
class with `register_method` for methods of one's own (docs/plugins.md), `Budget`, `SelectContext` and
`Selection` (what a method's `select` receives and may return), and the error types. Names are imported on
first use, so `import kvbench` (and every CLI command) stays fast until one of them is needed."""

__version__ = "0.1.0"

_PUBLIC = {
    "evaluate": "kvbench.api",
    "load_results": "kvbench.api",
    "table": "kvbench.api",
    "Method": "kvbench.methods.base",
    "Budget": "kvbench.methods.base",
    "SelectContext": "kvbench.methods.base",
    "Selection": "kvbench.methods.base",
    "register_method": "kvbench.methods",
    "KvbenchError": "kvbench.errors",
    "InputError": "kvbench.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):  # PEP 562: the public names, imported on first use
    if name in _PUBLIC:
        from importlib import import_module

        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvbench' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
