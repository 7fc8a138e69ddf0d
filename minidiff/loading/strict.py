"""Strict loading: a state dict fits a module exactly, or one error lists every key that does not.

Every conversion and every load goes through check_state_dict: each source tensor used or dropped by name,
each target parameter filled, each shape the same. rename_keys applies a key map and refuses two source keys
that land on one target key.
"""

from collections.abc import Callable, Mapping

import torch
from torch import nn


def check_state_dict(target_module: nn.Module, converted: Mapping[str, torch.Tensor], show: int = 10) -> None:
    """Raise one ValueError unless `converted` has exactly the keys of target_module.state_dict(), each with
    the same shape. The message lists missing keys, unexpected keys and shape mismatches (at most `show` of
    each, with counts)."""
    expected = target_module.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for what, keys in [
        ("missing (model parameters the checkpoint does not fill)", missing),
        ("unexpected (checkpoint tensors the model has no place for)", unexpected),
        ("shape mismatches", mismatched),
    ]:
        if keys:
            problems.append(f"{len(keys)} {what}: {key_listing(keys, show)}")
    raise ValueError(
        f"checkpoint does not fit {type(target_module).__name__} (is the config the checkpoint's own?):\n"
        + "\n".join(problems)
    )


def rename_keys(state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Apply rename to every key; two source keys landing on one target key is an error."""
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    clashes = []
    for key, tensor in state_dict.items():
        new_key = rename(key)
        if new_key in out:
            clashes.append(f"{sources[new_key]} and {key} -> {new_key}")
        out[new_key], sources[new_key] = tensor, key
    if clashes:
        raise ValueError(f"{len(clashes)} target keys are given twice in the checkpoint: " + key_listing(clashes))
    return out


def key_listing(items: list[str], show: int = 10) -> str:
    more = f"\n    ... and {len(items) - show} more" if len(items) > show else ""
    return "".join(f"\n    {item}" for item in items[:show]) + more
