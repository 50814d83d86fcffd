"""kvbench's own data files and how they are read (safe YAML only).

The YAML kvbench needs at run time is package data inside `kvbench/` (`configs/` for models, method presets
and recipes; `tasks/` for task definitions and the embedded LongBench sample), found through
importlib.resources, so a wheel installed anywhere finds it exactly as an editable checkout does. The
top-level `configs/` and `tasks/` folders of the repository hold only a README and examples to copy."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from kvbench.errors import InputError


def package_path(*parts: str) -> Path:
    """A file or folder shipped inside the kvbench package. Installed packages are plain directories (wheels
    are unpacked, never imported from a zip), so the resource is a real path that can be opened and globbed."""
    return Path(str(files("kvbench").joinpath(*parts)))


def config_path(name: str) -> Path:
    return package_path("configs", name)


def tasks_path(name: str) -> Path:
    return package_path("tasks", name)


def recipe_dir() -> Path:
    """Paper recipes (kvbench.studies.recipes): package data from the start, so installed copies have them."""
    return Path(__file__).resolve().parent / "configs" / "recipes"


def recipe_path(name: str) -> Path:
    return recipe_dir() / f"{name}.yaml"


# libyaml's parser under the same safe constructor and resolver: the same data, parsed about 10x faster (the task
# table is parsed on every `kvbench` start). Pure Python where PyYAML was built without libyaml.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    """A YAML file whose top level is a mapping; cached until the file changes."""
    return _load_yaml_cached(str(path), path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=32)
def _load_yaml_cached(path: str, _mtime: int) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_SAFE_LOADER)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise InputError(f"{path}{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data
