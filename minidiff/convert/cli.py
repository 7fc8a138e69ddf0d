"""Convert a pretrained checkpoint into a minidiff model folder: `python -m minidiff.convert SRC DST`.

What it reads, by what SRC is:
- a diffusers pipeline folder (model_index.json + one subfolder per component):
  - Stable Diffusion 1.x/2.x (unet/, vae/, text_encoder/, tokenizer/, scheduler/): minidiff/convert/sd.py;
  - a pixel-space DDPM (unet/ with a UNet2DModel, scheduler/), or the flat layout of some older hub repos
    (model_index.json, config.json, weights and scheduler_config.json all at the root);
- a diffusers UNet2DModel folder: config.json + weights (no scheduler: diffusers' DDPM defaults, said so);
- a transformers CLIP folder (config.json naming a CLIP class): minidiff/convert/clip.py;
- a file: an original single-file Stable Diffusion checkpoint (.safetensors or .ckpt; minidiff/convert/sd.py),
  or with --clip-config an open_clip / OpenAI CLIP state dict (minidiff/convert/clip.py).
Weights are read memory-mapped from .safetensors, or from .bin/.ckpt/.pt with torch.load(weights_only=True), so
that no pickled code runs (minidiff/convert/sources.py).

What it writes: DST/config.json and one DST/<component>.safetensors per component in minidiff's layout
(minidiff/loading/model_folder.py), after the strict key checks of the key maps: every tensor used or dropped by name,
every parameter filled, every shape right. Any failure exits with status 2 and one line, and leaves no DST.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minidiff.convert.clip import CLIP_CONFIGS, convert_clip_folder, convert_open_clip, transformers_clip_class
from minidiff.convert.keymaps.unet import unet2d_from_diffusers
from minidiff.convert.sd import convert_sd_pipeline, convert_single_file, is_sd_pipeline
from minidiff.convert.sources import ConversionError, find_weights, read_json, read_state_dict
from minidiff.loading.model_folder import DTYPES, ModelFolderError, save_pixel_model
from minidiff.models.unet import UNet2DConfig


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
                              "folders convert on their own; for Stable Diffusion convert the whole pipeline folder "
                              "(model_index.json with unet, vae, text_encoder, tokenizer, scheduler)")
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


def convert(args: argparse.Namespace) -> str:
    """Dispatch on what SRC is; returns the summary line(s) for the user."""
    src, dst, dtype = args.src, args.dst, DTYPES.get(args.dtype)
    if dst.exists():  # said before the work, and again by save_model_folder just before the rename
        raise ModelFolderError(f"{dst} already exists: choose a new output folder or remove it first")
    given = {"--prediction-type": args.prediction_type is not None, "--image-size": args.image_size is not None,
             "--[no-]upcast-attention": args.upcast_attention is not None, "--ema": args.ema}
    single_file = [option for option, is_given in given.items() if is_given]  # options for SD single files only
    if src.is_file():
        if args.clip_config:
            if single_file:
                raise ConversionError(f"{', '.join(single_file)}: for Stable Diffusion checkpoints, not CLIP ones")
            return convert_open_clip(src, dst, args.clip_config, dtype)
        return convert_single_file(src, dst, dtype, args.prediction_type, args.image_size, args.upcast_attention,
                                   args.ema)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such file or folder")
    if single_file or args.clip_config:
        options = single_file + (["--clip-config"] if args.clip_config else [])
        raise ConversionError(f"{', '.join(options)}: only for a single checkpoint file; {src} is a folder, whose "
                              "configs say all that")
    if (src / "model_index.json").is_file() and is_sd_pipeline(read_json(src / "model_index.json")):
        return convert_sd_pipeline(src, dst, dtype)
    if (src / "config.json").is_file() and transformers_clip_class(read_json(src / "config.json")):
        return convert_clip_folder(src, dst, dtype)
    return convert_pixel(src, dst, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a diffusers or transformers folder, or a checkpoint file")
    parser.add_argument("dst", type=Path, help="the minidiff model folder to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="store the weights in this precision (default: as in the source)")
    sd = parser.add_argument_group("original single-file Stable Diffusion checkpoints (the weights do not say these)")
    sd.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                    help="default: v_prediction for SD 2.x (768-v), else epsilon")
    sd.add_argument("--image-size", type=int, help="training resolution in pixels; default: 768 for SD 2.x, else 512")
    sd.add_argument("--upcast-attention", action=argparse.BooleanOptionalAction, default=None,
                    help="attention scores in float32; default: on for SD 2.x (768-v)")
    sd.add_argument("--ema", action="store_true", help="take the UNet's EMA weights (model_ema.*) from the file")
    parser.add_argument("--clip-config", choices=sorted(CLIP_CONFIGS),
                        help="SRC is an open_clip / OpenAI CLIP state dict of this architecture")
    args = parser.parse_args(argv)
    try:
        print(convert(args))
    except (ConversionError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

