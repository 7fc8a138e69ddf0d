"""Convert a pretrained checkpoint into a minidiff model folder: `python -m minidiff.convert SRC DST`.

What it reads (the layouts users bring from the hub):
- a diffusers pipeline folder: model_index.json, unet/ (config.json + weights), scheduler/scheduler_config.json;
- the flat layout of some older hub repos: model_index.json, config.json, weights and scheduler_config.json
  all at the root;
- a diffusers model folder: config.json + weights (no scheduler: diffusers' DDPM defaults are used and said).
Weights are diffusion_pytorch_model(.fp16).safetensors, read memory-mapped, or .bin, read with
torch.load(weights_only=True) so that no pickled code runs.

What it writes: DST/config.json and DST/unet.safetensors in minidiff's layout (minidiff/pretrained.py), after
the strict key check of minidiff/keymaps.py: every tensor used, every parameter filled, every shape right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minidiff.keymaps import unet2d_from_diffusers
from minidiff.pretrained import DTYPES, ModelFolderError, save_pixel_model
from minidiff.safetensors import SafetensorsError, load_file
from minidiff.unet import UNet2DConfig

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


class ConversionError(ValueError):
    """A source minidiff cannot convert; the message names the file and what to do."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read it as JSON ({e})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (memory-mapped) or a .bin/.ckpt/.pt file (weights only, no code)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorsError as e:  # the message already names the file
            raise ConversionError(str(e)) from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a file that is not a weights-only checkpoint
        raise ConversionError(f"{path}: not a loadable weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    state_dict = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path}: does not hold a dict of tensors")
    return state_dict


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def locate_unet(src: Path) -> tuple[Path, Path | None]:
    """(folder with the UNet's config.json + weights, the scheduler_config.json or None) for each layout."""
    if (src / "model_index.json").is_file():
        index = read_json(src / "model_index.json")
        if "unet" not in index:
            raise ConversionError(f"{src}/model_index.json lists no unet (components: {', '.join(index)})")
        if (src / "unet" / "config.json").is_file():  # the pipeline layout
            scheduler = src / "scheduler" / "scheduler_config.json"
            return src / "unet", scheduler if scheduler.is_file() else None
        if (src / "config.json").is_file():  # the flat layout
            scheduler = src / "scheduler_config.json"
            return src, scheduler if scheduler.is_file() else None
        raise ConversionError(f"{src}: model_index.json names a unet but there is no unet/config.json")
    if (src / "config.json").is_file():
        return src, None
    raise ConversionError(f"{src}: neither model_index.json nor config.json found: not a diffusers folder")


def convert_pixel(src: Path, dst: Path, dtype: torch.dtype | None) -> str:
    """Convert a diffusers UNet2DModel pipeline/model folder; returns a one-line summary."""
    unet_folder, scheduler_file = locate_unet(src)
    unet_json = read_json(unet_folder / "config.json")
    if unet_json.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"{unet_folder}/config.json is a {unet_json['_class_name']}: only UNet2DModel "
                              "(pixel-space DDPM) folders convert so far")
    try:
        unet_config = UNet2DConfig.from_dict(unet_json)
    except ValueError as e:
        raise ConversionError(f"{unet_folder}/config.json: {e}") from None
    weights = find_weights(unet_folder)
    state_dict = read_state_dict(weights)
    try:
        state_dict = unet2d_from_diffusers(state_dict, unet_config)
    except ValueError as e:
        raise ConversionError(f"{weights}: {e}") from None
    scheduler_config = read_json(scheduler_file) if scheduler_file else {"_class_name": "DDPMScheduler"}
    save_pixel_model(dst, state_dict, unet_config, scheduler_config, source=str(src.resolve()), dtype=dtype)
    n = sum(t.numel() for t in state_dict.values())
    note = "" if scheduler_file else " (no scheduler_config.json: using diffusers' DDPMScheduler defaults)"
    return f"converted {src} -> {dst}: UNet2DModel, {n / 1e6:.1f}M parameters, {len(state_dict)} tensors{note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a diffusers pipeline or model folder")
    parser.add_argument("dst", type=Path, help="the minidiff model folder to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="store the weights in this precision (default: as in the source)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        print(f"error: {args.src} is not a folder", file=sys.stderr)
        return 2
    try:
        print(convert_pixel(args.src, args.dst, DTYPES.get(args.dtype)))
    except (ConversionError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
