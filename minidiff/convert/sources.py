"""Reading what a user brings to `python -m minidiff.convert` or from_pretrained: JSON configs and weight files,
and what every converter returns: the minidiff model folder it makes, in memory (Converted).

Nothing here runs code from a file. A .safetensors file is parsed and memory-mapped by minidiff/loading/safetensors.py;
a pickle (.bin, .ckpt, .pt) is read with torch.load(weights_only=True), which rebuilds tensors and plain
containers (dict, list, str, numbers) and refuses anything else, so a checkpoint that needs a class of its own
to load is an error, never a call into that class.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minidiff.loading.model_folder import ModelFolder, Vocabulary
from minidiff.loading.safetensors import SafetensorsError, load_file
from minidiff.models.tokenizer import load_clip_bpe, read_tokenizer_folder

# The weights file of a diffusers model folder and of a transformers one, safetensors before pickles.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ConversionError(ValueError):
    """A source minidiff cannot convert; the message names the file and what to do."""


@dataclass
class Converted:
    """A source converted in memory: the minidiff model folder it makes (written by `python -m minidiff.convert`,
    built straight into modules by from_pretrained) and what the command line reports about it."""

    folder: ModelFolder
    summary: str  # what it is, e.g. "UNet2DModel, 35.7M parameters, 276 tensors"
    notes: list[str] = field(default_factory=list)  # one line each: what was read or assumed


def with_source(where: str, convert, *args):
    """Run a key map or config reader; its ValueError becomes a ConversionError that names `where`."""
    try:
        return convert(*args)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read it as JSON ({e})") from None


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive; the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise ConversionError(
                f"{path}: a TorchScript archive (as OpenAI's clip package ships its models): loading it would run "
                "its code; convert a state dict of the same weights instead (e.g. open_clip's "
                "open_clip_model.safetensors)") from None
        if "mmap can only be used" not in str(e):  # a pre-1.6 (non-zip) pickle cannot be memory-mapped: read it
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, other entries) of a .safetensors file (memory-mapped) or a .bin/.ckpt/.pt pickle (weights only).

    A PyTorch Lightning .ckpt keeps its tensors under "state_dict" next to entries such as global_step and epoch;
    those come back as the second value."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path), {}
        except SafetensorsError as e:  # the message already names the file
            raise ConversionError(str(e)) from None
    try:
        loaded = _torch_load(path)
    except ConversionError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise ConversionError(f"{path}: not a weights-only PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        raise ConversionError(
            f"{path}: loading it would run code ({found[1]}): minidiff reads .ckpt/.bin/.pt files weights-only "
            "and never runs code from a checkpoint; convert the model's .safetensors file instead") from None
    except Exception as e:  # torch raises many types for a file that is not a PyTorch checkpoint at all
        raise ConversionError(f"{path}: not a loadable weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    others = {}
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        others = {k: v for k, v in loaded.items() if k != "state_dict"}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path}: does not hold a dict of tensors")
    return loaded, others


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see read_checkpoint)."""
    return read_checkpoint(path)[0]


def with_variant(name: str, variant: str) -> str:
    """diffusers' and transformers' variant file names: model.safetensors -> model.fp16.safetensors."""
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def find_weights(folder: Path, names: tuple[str, ...] = DIFFUSERS_WEIGHTS, variant: str | None = None) -> Path:
    """The weights file of a model folder: the first of `names` there. With a variant (e.g. "fp16"), only the
    files of that variant, as variant= picks them in diffusers and transformers; without one, the ".fp16." files
    that hub repos also carry are taken when the full-precision ones are missing."""
    if variant is None:
        names = (*names, *(with_variant(name, "fp16") for name in names))
    else:
        names = tuple(with_variant(name, variant) for name in names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no weights file (looked for {', '.join(names)})")


def read_tokenizer(folder: Path, max_positions: int) -> tuple[dict, Vocabulary | None]:
    """A hub tokenizer folder -> the tokenizer section of a minidiff config.json ({"pad_token",
    "model_max_length"}, plus "added_tokens" if any) and its vocabulary, None if it is CLIP's own
    (minidiff/models/assets), which a model folder does not copy. The length is capped at the text encoder's
    max_positions (transformers writes a huge placeholder when no length was set)."""
    try:
        files = read_tokenizer_folder(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{folder}: cannot read the tokenizer ({e})") from None
    if files.pad_token not in files.vocab and files.pad_token not in files.added_tokens:
        raise ConversionError(f"{folder}: the pad token {files.pad_token!r} is not in the vocabulary")
    section = {"pad_token": files.pad_token, "model_max_length": min(files.model_max_length or 77, max_positions)}
    if files.added_tokens:
        section["added_tokens"] = files.added_tokens
    vocabulary = files.vocab, files.merges
    return section, None if vocabulary == load_clip_bpe() else vocabulary
