"""Config dataclasses <-> config.json dicts, by the one rule every minidiff config follows.

A config.json from diffusers or transformers is read as it is: keys starting with "_" (_class_name,
_diffusers_version, _name_or_path, ...) are metadata and dropped; keys the caller knows do not matter here are
dropped silently; any other unknown key is ignored with a warning that names it. Invalid values raise
ValueError in the dataclass's own __post_init__.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable


def from_json_dict(cls, d: dict, ignore: Iterable[str] = ()):
    """An instance of config dataclass `cls` from a config.json dict (see the module docstring)."""
    names = {field.name for field in dataclasses.fields(cls)}
    ignore = set(ignore)
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names and k not in ignore)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
    return cls(**{k: v for k, v in d.items() if k in names})


def is_number(value: object) -> bool:
    """An int or float (JSON true/false arrive as bool, a subclass of int: not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def require(config: object, ok: bool, what: str) -> None:
    """The validation step of every config: ValueError("<ConfigClass>: what") unless ok."""
    if not ok:
        raise ValueError(f"{type(config).__name__}: {what}")


def to_json_dict(config: object) -> dict:
    """A config dataclass -> a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
