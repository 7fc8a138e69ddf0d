"""Config dataclasses: checked from their annotations, and read from / written to config.json dicts.

A config field is a plain dataclass field, or a `setting(default, ...)` that also says which values it takes:
choices, and bounds (min/max inclusive, above/below exclusive; for a list they hold for every entry, and max_len
caps its length). validate(config), run first in every config's __post_init__, checks each field against its
annotation (bool, int, float (finite), str, None, tuple[int, ...], tuple[int, int], a config class, and unions of
them) and its setting, so an absurd size (layers_per_block=10**6) is refused before anything is allocated. JSON
lists become tuples where the annotation says tuple. A check across fields is a `require` line after it.

A config.json from diffusers or transformers is read as it is: keys starting with "_" (_class_name,
_diffusers_version, _name_or_path, ...) are metadata and dropped; keys the caller knows do not matter here are
dropped silently; any other unknown key is ignored with a warning that names it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import reprlib
import types
import typing
import warnings
from collections.abc import Collection, Iterable

from minidiff.logging import MinidiffWarning

# Upper bounds shared by the model configs: several times the largest real checkpoint, yet finite, so that a typo
# asking for terabytes is refused before anything is allocated.
WIDTH = 8192  # channels and hidden sizes: SD's widest UNet block 1280, CLIP ViT-bigG 1664 (its MLP 8192 = 4 * WIDTH)
SIDE = 4096  # sample_size / image_size, latent or pixel: SD 64/96 latents, ddpm-celebahq 256 px, SDXL's VAE 1024 px
LEVELS = 12  # resolutions of a UNet or VAE (block_out_channels): SD 4, ddpm-celebahq 6; 12 halve a SIDE to 2
DEPTH = 16  # ResnetBlocks per level (layers_per_block): SD, its VAE and the DDPMs 1 or 2, DeepFloyd IF 3
CLASSES = 100_000  # class labels: MNIST 10, ImageNet 1000, ImageNet-21k 21,843


def setting(default, *, choices: Collection | None = None, min: float | None = None, max: float | None = None,
            above: float | None = None, below: float | None = None, max_len: int | None = None):
    """A config field: its default and what validate() lets through: one of `choices`, min <= x <= max,
    above < x < below (for a list: every entry), at most max_len entries."""
    limits = dict(choices=choices, min=min, max=max, above=above, below=below, max_len=max_len)
    return dataclasses.field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


def validate(config: object) -> None:
    """Check every field of a config dataclass against its annotation and setting (see the module docstring),
    turning lists into tuples where the annotation says tuple. Raises ValueError("<Config>: <field>=<value> ...")."""
    for field, kind in _annotated_fields(type(config)):
        given = getattr(config, field.name)
        value = tuple(given) if isinstance(given, list) and _says_tuple(kind) else given
        if problem := _problem(field.name, value, kind, field.metadata):
            raise ValueError(f"{type(config).__name__}: {field.name}={_short.repr(given)} {problem}")
        setattr(config, field.name, value)


def require(config: object, ok: bool, what: str) -> None:
    """A check across fields, after validate(): ValueError("<Config>: what") unless ok."""
    if not ok:
        raise ValueError(f"{type(config).__name__}: {what}")


@functools.cache
def _annotated_fields(cls: type) -> list[tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)  # evaluates string annotations (from __future__ import annotations)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls)]


def _alternatives(kind) -> tuple:
    """int | tuple[int, int] | None -> (int, tuple[int, int], NoneType); any other annotation -> (kind,)."""
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _says_tuple(kind) -> bool:
    return any(typing.get_origin(k) is tuple for k in _alternatives(kind))


def _is(value: object, kind) -> bool:
    """Whether `value` has type `kind` (one alternative of an annotation). JSON's true/false are not numbers."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (tuple, list):  # never empty; a list[...] also takes a tuple; tuple[int, int] is two ints
        if not isinstance(value, tuple if origin is tuple else list | tuple) or not value:
            return False
        if origin is tuple and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_is, value, args))
        return all(_is(entry, args[0]) for entry in value)
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:  # ints are numbers too (and math.isfinite would overflow on a huge one)
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    return isinstance(value, kind)


# setting()'s bounds: how each reads in a message, and the test a value must pass
_LOWER = {"min": ("<=", operator.ge), "above": ("<", operator.gt)}
_UPPER = {"max": ("<=", operator.le), "below": ("<", operator.lt)}


def _problem(name: str, value: object, kind, limits: dict) -> str | None:
    """What is wrong with `value` for a field annotated `kind` with setting `limits`, or None."""
    if not any(_is(value, k) for k in _alternatives(kind)):
        return f"is not {_words(kind)}"
    listed = isinstance(value, list | tuple)
    if listed and len(value) > limits.get("max_len", len(value)):
        return f"has {len(value)} entries; at most {limits['max_len']} are allowed"
    for entry in value if listed else (value,):
        which = f"has {_short.repr(entry)}, which " if listed else ""
        if "choices" in limits and entry not in limits["choices"]:
            shown = ", ".join("null" if c is None else repr(c) for c in limits["choices"])
            if len(limits["choices"]) == 1:
                return f"{which}is not supported: minidiff implements {shown} only"
            return f"{which}is not one of {shown}"
        number = isinstance(entry, int | float) and not isinstance(entry, bool)
        if number and not all(test(entry, limits[k]) for k, (_, test) in (_LOWER | _UPPER).items() if k in limits):
            low = "".join(f"{limits[k]} {sign} " for k, (sign, _) in _LOWER.items() if k in limits)
            high = "".join(f" {sign} {limits[k]}" for k, (sign, _) in _UPPER.items() if k in limits)
            return f"{which}is out of range: need {low}{'each entry' if listed else name}{high}"
    return None


_WORDS = {bool: "true or false", int: "an int", float: "a finite number", str: "a string", type(None): "null"}


def _words(kind, plural: bool = False) -> str:
    """An annotation in words, for messages: int | tuple[int, int] | None -> "an int, a list of 2 ints or null"."""
    if len(options := _alternatives(kind)) > 1:
        names = [_words(k) for k in options]
        return f"{', '.join(names[:-1])} or {names[-1]}"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (tuple, list):
        entries = _words(args[0], plural=True)
        fixed = origin is tuple and args[-1] is not Ellipsis
        return f"a list of {len(args)} {entries}" if fixed else f"a non-empty list of {entries}"
    if kind not in _WORDS:  # a class: a UNet2DConfig, a numpy.ndarray
        return f"a {'' if kind.__module__.startswith('minidiff') else kind.__module__ + '.'}{kind.__name__}"
    return _WORDS[kind].split(" ", 1)[1] + "s" if plural else _WORDS[kind]


_short = reprlib.Repr()  # values in messages: a list of 10**6 entries is not printed whole
_short.maxlist = _short.maxtuple = 16
_short.maxstring = _short.maxother = 120


def from_json_dict(cls, d: dict, ignore: Iterable[str] = ()):
    """An instance of config dataclass `cls` from a config.json dict (see the module docstring)."""
    names = {field.name for field in dataclasses.fields(cls)}
    ignore = set(ignore)
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names and k not in ignore)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", MinidiffWarning, stacklevel=3)
    return cls(**{k: v for k, v in d.items() if k in names})


def config_from(cls, config: object = None, kwargs: dict | None = None):
    """The config a model is built from: a `cls` instance, a config.json dict (read by cls.from_dict), or
    diffusers-style keyword arguments, `UNet2DModel(sample_size=28, ...)`, where a name that is not a field of
    `cls` is a TypeError; neither gives the defaults."""
    if kwargs:
        if config is not None:
            raise TypeError(f"pass a {cls.__name__} or keyword arguments, not both")
        names = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(kwargs) - names):
            raise TypeError(f"unexpected keyword arguments {unknown}: not fields of {cls.__name__}")
        config = kwargs
    if isinstance(config, dict):
        return cls.from_dict(config) if hasattr(cls, "from_dict") else cls(**config)
    return cls() if config is None else config


def to_json_dict(config: object) -> dict:
    """A config dataclass -> a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
