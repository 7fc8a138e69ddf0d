"""One diffusers or transformers model folder (config.json + weights) -> one minidiff component, in memory.

Every folder layout is made of these: a diffusers pipeline has one per subfolder (unet/, vae/, text_encoder/),
google/ddpm-* repos keep theirs at the root, and a transformers CLIP repo is one. config.json names the class:
diffusers writes it as "_class_name", transformers as the first of "architectures".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff.config import to_json_dict
from minidiff.convert.keymaps.clip import clip_from_transformers
from minidiff.convert.keymaps.sd_unet import unet_condition_from_diffusers
from minidiff.convert.keymaps.unet import unet2d_from_diffusers
from minidiff.convert.keymaps.vae import vae_from_diffusers
from minidiff.convert.sources import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    find_weights,
    read_json,
    read_state_dict,
    with_source,
)
from minidiff.models import clip
from minidiff.models.unet import UNet2DConfig
from minidiff.models.unet_condition import UNet2DConditionConfig
from minidiff.models.vae import AutoencoderKLConfig

# transformers class -> how to read its config.json
CONFIG_READERS = {
    "CLIPModel": clip.CLIPConfig.from_dict,
    "CLIPTextModel": clip.CLIPTextConfig.from_dict,
    "CLIPTextModelWithProjection": clip.CLIPTextConfig.from_dict,
    "CLIPVisionModel": clip.CLIPVisionConfig.from_dict,
    "CLIPVisionModelWithProjection": clip.CLIPVisionConfig.from_dict,
}


def _clip_key_map(class_name: str):
    return lambda state_dict, config: clip_from_transformers(state_dict, getattr(clip, class_name), config)


# The class config.json names -> (how to read that config, the key map to minidiff's layout, the weights files)
READERS = {
    "UNet2DModel": (UNet2DConfig.from_dict, unet2d_from_diffusers, DIFFUSERS_WEIGHTS),
    "UNet2DConditionModel": (UNet2DConditionConfig.from_dict, unet_condition_from_diffusers, DIFFUSERS_WEIGHTS),
    "AutoencoderKL": (AutoencoderKLConfig.from_dict, vae_from_diffusers, DIFFUSERS_WEIGHTS),
    **{name: (read, _clip_key_map(name), TRANSFORMERS_WEIGHTS) for name, read in CONFIG_READERS.items()},
}


@dataclass
class Component:
    """A model folder read and converted: its class, its minidiff config and its weights in minidiff's layout."""

    class_name: str
    config: object  # the config dataclass of the class
    state_dict: dict[str, torch.Tensor]  # checked strictly against the model `config` builds
    weights: Path  # the file they came from

    @property
    def section(self) -> dict:
        """The component's section of a minidiff config.json."""
        return {"class": self.class_name, "config": to_json_dict(self.config)}


def transformers_clip_class(config_json: dict) -> str | None:
    """The CLIP class a transformers config.json names (its first architecture), or None if it is not one."""
    architectures = config_json.get("architectures") or [None]
    return architectures[0] if architectures[0] in CONFIG_READERS else None


def folder_class(config_json: dict) -> str | None:
    """The class a diffusers ("_class_name") or transformers ("architectures") config.json names."""
    return config_json.get("_class_name") or (config_json.get("architectures") or [None])[0]


def read_component(folder: Path, class_name: str, variant: str | None = None) -> Component:
    """Read `folder` (config.json + weights) as a `class_name` (a key of READERS) and convert its weights
    strictly; `variant` picks e.g. the ".fp16." weights file (see find_weights)."""
    read_config, key_map, weights_names = READERS[class_name]
    config = with_source(f"{folder}/config.json", read_config, read_json(folder / "config.json"))
    weights = find_weights(folder, weights_names, variant)
    state_dict = with_source(str(weights), key_map, read_state_dict(weights), config)
    return Component(class_name, config, state_dict, weights)
