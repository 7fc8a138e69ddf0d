"""Reading what a user brings to `python -m minidiff.convert`: JSON configs and weight files.

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
from pathlib import Path

import torch

from minidiff.loading.safetensors import SafetensorsError, load_file
from minidiff.models.tokenizer import load_clip_bpe, read_tokenizer_folder

# The weights file of a diffusers model folder and of a transformers one, in order of preference: full precision
# before the ".fp16." variant, safetensors before pickles.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
)  # fmt: skip
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")


class ConversionError(ValueError):
    """A source minidiff cannot convert; the message names the file and what to do."""


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


def find_weights(folder: Path, names: tuple[str, ...] = DIFFUSERS_WEIGHTS) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no weights file (looked for {', '.join(names)})")


def read_tokenizer(folder: Path, max_positions: int) -> tuple[dict, dict[str, str]]:
    """A hub tokenizer folder -> the tokenizer section of a minidiff config.json ({"pad_token",
    "model_max_length"}, plus "added_tokens" if any) and the files to ship with the model: tokenizer/vocab.json
    and tokenizer/merges.txt, only if they differ from CLIP's own (minidiff/models/assets). The length is capped at the
    text encoder's max_positions (transformers writes a huge placeholder when no length was set)."""
    try:
        files = read_tokenizer_folder(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{folder}: cannot read the tokenizer ({e})") from None
    if files.pad_token not in files.vocab and files.pad_token not in files.added_tokens:
        raise ConversionError(f"{folder}: the pad token {files.pad_token!r} is not in the vocabulary")
    section = {"pad_token": files.pad_token, "model_max_length": min(files.model_max_length or 77, max_positions)}
    if files.added_tokens:
        section["added_tokens"] = files.added_tokens
    if (files.vocab, files.merges) == load_clip_bpe():
        return section, {}
    vocab = json.dumps(files.vocab, ensure_ascii=False)
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in files.merges)  # the hub's merges.txt layout
    return section, {"tokenizer/vocab.json": vocab, "tokenizer/merges.txt": merges}
