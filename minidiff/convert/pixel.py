"""Pixel-space DDPMs -> a minidiff "pixel" folder (unet + scheduler), from the three layouts users bring:

- a diffusers pipeline folder: model_index.json, unet/ (a UNet2DModel), scheduler/;
- the flat layout of older hub repos (google/ddpm-*): model_index.json, config.json, weights and
  scheduler_config.json all at the root;
- a lone diffusers UNet2DModel folder (config.json + weights), with diffusers' DDPMScheduler defaults.
"""

from __future__ import annotations

from pathlib import Path

from minidiff.convert.components import read_component
from minidiff.convert.sources import ConversionError, Converted, read_json
from minidiff.loading.model_folder import ModelFolder


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


def read_pixel(src: Path, variant: str | None = None) -> Converted:
    """A diffusers UNet2DModel pipeline or model folder, converted in memory."""
    unet_folder, scheduler_file = locate_unet(src)
    unet_json = read_json(unet_folder / "config.json")
    if unet_json.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"{unet_folder}/config.json is a {unet_json['_class_name']}: only UNet2DModel "
                              "folders convert on their own; for Stable Diffusion convert the whole pipeline folder "
                              "(model_index.json with unet, vae, text_encoder, tokenizer, scheduler)")
    unet = read_component(unet_folder, "UNet2DModel", variant)
    scheduler_config = read_json(scheduler_file) if scheduler_file else {"_class_name": "DDPMScheduler"}
    config = {"kind": "pixel", "source": str(src.resolve()), "unet": unet.section, "scheduler": scheduler_config}
    n = sum(t.numel() for t in unet.state_dict.values())
    note = "" if scheduler_file else " (no scheduler_config.json: using diffusers' DDPMScheduler defaults)"
    summary = f"UNet2DModel, {n / 1e6:.1f}M parameters, {len(unet.state_dict)} tensors{note}"
    return Converted(ModelFolder(config, {"unet": unet.state_dict}, None, str(src)), summary)
