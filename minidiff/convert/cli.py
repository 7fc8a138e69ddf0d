"""Convert a pretrained checkpoint into a minidiff model folder: `python -m minidiff.convert SRC DST`.

What it reads, by what SRC is:
- a diffusers pipeline folder (model_index.json + one subfolder per component):
  - Stable Diffusion 1.x/2.x (unet/, vae/, text_encoder/, tokenizer/, scheduler/): minidiff/convert/sd.py;
  - a pixel-space DDPM (unet/ with a UNet2DModel, scheduler/), or the flat layout of some older hub repos
    (model_index.json, config.json, weights and scheduler_config.json all at the root): minidiff/convert/pixel.py;
- a diffusers UNet2DModel folder: config.json + weights (no scheduler: diffusers' DDPM defaults, said so);
- a transformers CLIP folder (config.json naming a CLIP class): minidiff/convert/clip.py;
- a file: an original single-file Stable Diffusion checkpoint (.safetensors or .ckpt; minidiff/convert/sd.py),
  or with --clip-config an open_clip / OpenAI CLIP state dict (minidiff/convert/clip.py).
Weights are read memory-mapped from .safetensors, or from .bin/.ckpt/.pt with torch.load(weights_only=True), so
that no pickled code runs (minidiff/convert/sources.py).

Each reader converts in memory (the same readers serve from_pretrained: minidiff/convert/pretrained.py); this
command writes the result: DST/config.json and one DST/<component>.safetensors per component in minidiff's layout
(minidiff/loading/model_folder.py), after the strict key checks of the key maps: every tensor used or dropped by name,
every parameter filled, every shape right. Any failure exits with status 2 and one line, and leaves no DST.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minidiff.convert.clip import CLIP_CONFIGS, read_clip_folder, read_open_clip
from minidiff.convert.components import transformers_clip_class
from minidiff.convert.pixel import read_pixel
from minidiff.convert.sd import is_sd_pipeline, read_sd_pipeline, read_single_file
from minidiff.convert.sources import ConversionError, Converted, read_json
from minidiff.loading.model_folder import DTYPES, ModelFolderError, save_model_folder, vocabulary_files


def read_source(args: argparse.Namespace) -> Converted:
    """Dispatch on what SRC is, after checking that the options fit it; the converted model, in memory."""
    src = args.src
    given = {"--prediction-type": args.prediction_type is not None, "--image-size": args.image_size is not None,
             "--[no-]upcast-attention": args.upcast_attention is not None, "--ema": args.ema}
    single_file = [option for option, is_given in given.items() if is_given]  # options for SD single files only
    if src.is_file():
        if args.clip_config:
            if single_file:
                raise ConversionError(f"{', '.join(single_file)}: for Stable Diffusion checkpoints, not CLIP ones")
            return read_open_clip(src, args.clip_config)
        return read_single_file(src, args.prediction_type, args.image_size, args.upcast_attention, args.ema)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such file or folder")
    if single_file or args.clip_config:
        options = single_file + (["--clip-config"] if args.clip_config else [])
        raise ConversionError(f"{', '.join(options)}: only for a single checkpoint file; {src} is a folder, whose "
                              "configs say all that")
    if (src / "model_index.json").is_file() and is_sd_pipeline(read_json(src / "model_index.json")):
        return read_sd_pipeline(src)
    if (src / "config.json").is_file() and transformers_clip_class(read_json(src / "config.json")):
        return read_clip_folder(src)
    return read_pixel(src)


def convert(args: argparse.Namespace) -> str:
    """Convert SRC and write DST; returns the summary line(s) for the user."""
    dst, dtype = args.dst, DTYPES.get(args.dtype)
    if dst.exists():  # said before the work, and again by save_model_folder just before the rename
        raise ModelFolderError(f"{dst} already exists: choose a new output folder or remove it first")
    converted = read_source(args)
    folder = converted.folder
    save_model_folder(dst, folder.config, folder.components, dtype, vocabulary_files(folder.vocabulary))
    return f"converted {args.src} -> {dst}: {converted.summary}" + "".join(f"\n  {n}" for n in converted.notes)


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

