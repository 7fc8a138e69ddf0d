"""from_pretrained: minidiff models, schedulers, tokenizers and pipelines from whatever the user has, with no
convert step and nothing written to disk.

path_or_id may be
- a minidiff model folder (python -m minidiff.convert, train.py, save_pretrained);
- a diffusers pipeline folder, a model folder (alone, or a pipeline's subfolder=), the flat layout of the
  google/ddpm-* repos, or a transformers CLIP folder: converted in memory by the same strict readers as
  python -m minidiff.convert (minidiff/convert/components.py, pixel.py, sd.py, clip.py);
- an original single-file Stable Diffusion checkpoint (.safetensors, .ckpt), whose component subfolder= names;
- a hub id such as "google/ddpm-cifar10-32", if it is in the local Hugging Face cache (loading/hf_cache.py).
Nothing is downloaded. As in transformers, a CLIP tower class loads from a bigger CLIP model's weights
(CLIPTextModel from openai/clip-vit-large-patch14: its text tower).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from minidiff.config import to_json_dict
from minidiff.convert.components import READERS, Component, folder_class, read_component, transformers_clip_class
from minidiff.convert.keymaps.clip import TOWER_SOURCES, clip_tower
from minidiff.convert.pixel import read_pixel
from minidiff.convert.sd import is_sd_pipeline, read_sd_pipeline, read_single_file
from minidiff.convert.sources import ConversionError, read_json, read_tokenizer, with_source
from minidiff.loading.hf_cache import resolve
from minidiff.loading.model_folder import (
    MODEL_CLASSES,
    ModelFolder,
    ModelFolderError,
    build_module,
    component_names,
    folder_tokenizer,
    open_model_folder,
    pipeline_components,
    read_config,
    save_model,
)
from minidiff.models.clip import CLIPTextConfig
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.schedulers import Scheduler

__all__ = ["load_model", "load_pipeline", "load_scheduler", "load_tokenizer", "pipeline_kind", "save_model"]
CLIP_POSITIONS = 77  # the text length of every CLIP text encoder, when no config says it


def is_minidiff_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and "kind" in read_json(path / "config.json")


def whole_folder(root: Path) -> ModelFolder:
    """A minidiff folder or a single-file SD checkpoint (converted in memory) as a ModelFolder."""
    return read_single_file(root).folder if root.is_file() else open_model_folder(root)


def fits(found: str, wanted: str) -> bool:
    """Whether a `found` model's weights hold a `wanted` one: the same class, or a CLIP tower of it."""
    return found == wanted or MODEL_CLASSES[found][0] in TOWER_SOURCES.get(MODEL_CLASSES[wanted][0], ())


def pick_component(folder: ModelFolder, subfolder: str | None, class_name: str) -> str:
    """The component of a model folder to load as `class_name`: `subfolder` if given, else the one that fits."""
    found = {name: folder.config[name]["class"] for name in component_names(folder.config)}
    listing = ", ".join(f"{name} ({cls})" for name, cls in found.items())
    if subfolder is not None:
        if subfolder not in found:
            raise ModelFolderError(f"{folder.location} has no {subfolder} component (it has {listing})")
        return subfolder
    matches = [name for name, cls in found.items() if fits(cls, class_name)]
    if not matches:
        raise ModelFolderError(f"{folder.location} holds no {class_name} (it holds {listing})")
    if len(matches) > 1:
        raise ModelFolderError(f"{folder.location} holds several: pass subfolder= one of {', '.join(matches)}")
    return matches[0]


def read_model_folder(root: Path, subfolder: str | None, variant: str | None) -> Component:
    """A diffusers or transformers model folder (root, or root/subfolder), converted in memory."""
    source = root / subfolder if subfolder else root
    if subfolder and not source.is_dir():
        raise ConversionError(f"{root} has no {subfolder}/ folder")
    if not (source / "config.json").is_file():
        if (source / "model_index.json").is_file():
            index = read_json(source / "model_index.json")
            parts = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
            raise ConversionError(f"{source} is a diffusers pipeline folder: pass subfolder= the component to load "
                                  f"({', '.join(parts)})")
        raise ConversionError(f"{source}: no config.json: not a minidiff, diffusers or transformers model folder")
    class_name = folder_class(read_json(source / "config.json"))
    if class_name not in READERS:
        raise ConversionError(f"{source}/config.json names {class_name!r}, a model minidiff does not implement (it "
                              f"reads {', '.join(READERS)})")
    return read_component(source, class_name, variant)


def load_model(model_class_name: str, path_or_id: str | os.PathLike, subfolder: str | None = None,
               torch_dtype: torch.dtype | None = None, revision: str | None = None, variant: str | None = None
               ) -> nn.Module:
    """A model of class `model_class_name` (a key of MODEL_CLASSES) from any source above, in eval() mode with
    requires_grad on, as diffusers' from_pretrained. subfolder: the component ("unet", "vae", "text_encoder", ...)
    of a pipeline folder, a minidiff folder or a single file; torch_dtype: cast the floating-point weights;
    revision: of a hub id (branch, tag or commit); variant: the diffusers / transformers weights file variant
    ("fp16": diffusion_pytorch_model.fp16.safetensors). A source that holds another class is an error."""
    if model_class_name not in MODEL_CLASSES:
        raise ModelFolderError(f"{model_class_name} is not a minidiff model class ({', '.join(MODEL_CLASSES)})")
    root = resolve(path_or_id, revision)
    if root.is_file() or is_minidiff_folder(root):
        folder = whole_folder(root)
        name = pick_component(folder, subfolder, model_class_name)
        section, state_dict, where = folder.config[name], folder.components[name], folder.weights_name(name)
    else:
        component = read_model_folder(root, subfolder, variant)
        section, state_dict, where = component.section, component.state_dict, str(component.weights)
    found = section["class"]
    if not fits(found, model_class_name):
        raise ModelFolderError(f"{where} holds a {found}, not a {model_class_name}: load it as a {found}")
    if found != model_class_name:  # a CLIP tower out of a bigger model, as transformers loads it
        target_class, read_tower_config = MODEL_CLASSES[model_class_name]
        config = read_tower_config(section["config"])
        state_dict = with_source(where, clip_tower, state_dict, MODEL_CLASSES[found][0], target_class, config)
        section = {"class": model_class_name, "config": to_json_dict(config)}
    return build_module(section, state_dict, where, torch_dtype)


def scheduler_config(root: Path, subfolder: str | None) -> dict:
    """The scheduler config a source holds: a minidiff folder's "scheduler" section, a single file's (from the
    model it is detected to be), or scheduler_config.json in root/subfolder, else in root or root/scheduler."""
    if root.is_file() or is_minidiff_folder(root):
        folder = whole_folder(root)
        if "scheduler" not in folder.config:
            raise ModelFolderError(f"{root} holds a {folder.config['kind']!r} model, which has no scheduler")
        return folder.config["scheduler"]
    folders = [root / subfolder] if subfolder else [root, root / "scheduler"]
    for folder in folders:
        if (folder / "scheduler_config.json").is_file():
            return read_json(folder / "scheduler_config.json")
    raise ConversionError(f"no scheduler_config.json in {' or '.join(map(str, folders))}")


def load_scheduler(scheduler_class: type[Scheduler], path_or_id: str | os.PathLike, subfolder: str | None = None,
                   revision: str | None = None, **overrides) -> Scheduler:
    """A `scheduler_class` (e.g. minidiff.schedulers.DDIMScheduler) with the source's scheduler config, as
    diffusers' DDIMScheduler.from_pretrained(id, subfolder="scheduler"); `overrides` set its own fields."""
    return scheduler_class.from_config(scheduler_config(resolve(path_or_id, revision), subfolder), **overrides)


def text_positions(folder: Path) -> int:
    """The text encoder's length beside a tokenizer folder: a transformers CLIP folder's own config.json, or a
    diffusers pipeline's text_encoder/config.json."""
    for config_file in (folder / "config.json", folder.parent / "text_encoder" / "config.json"):
        if config_file.is_file():
            config_json = read_json(config_file)
            if transformers_clip_class(config_json) in ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection"):
                config = with_source(str(config_file), CLIPTextConfig.from_dict, config_json)
                return config.max_position_embeddings
    return CLIP_POSITIONS


def load_tokenizer(path_or_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None
                   ) -> CLIPTokenizer:
    """The CLIP tokenizer of a minidiff folder, a single file, a diffusers pipeline's tokenizer/ (subfolder=
    "tokenizer") or a transformers folder (vocab.json + merges.txt or tokenizer.json, with tokenizer_config.json
    and special_tokens_map.json): its vocabulary, pad token, length and added tokens."""
    root = resolve(path_or_id, revision)
    if root.is_file() or is_minidiff_folder(root):
        folder = whole_folder(root)
        if "tokenizer" not in folder.config:
            raise ModelFolderError(f"{root} holds a {folder.config['kind']!r} model, which has no tokenizer")
        return folder_tokenizer(folder)
    source = root / subfolder if subfolder else root
    if not any((source / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        hint = ': pass subfolder="tokenizer"' if (source / "tokenizer").is_dir() else ""
        raise ConversionError(f"{source}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json){hint}")
    section, vocabulary = read_tokenizer(source, text_positions(source))
    return folder_tokenizer(ModelFolder({"tokenizer": section}, {}, vocabulary, str(source)))


def pipeline_kind(root: Path) -> str:
    """"pixel" or "stable-diffusion" for what load_pipeline reads (a minidiff folder's kind, whichever it is),
    without reading any weights; an error for what is not a pipeline."""
    if root.is_file():
        return "stable-diffusion"
    if is_minidiff_folder(root):
        return read_config(root)["kind"]
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        if is_sd_pipeline(index):
            return "stable-diffusion"
        if "unet" in index:
            return "pixel"
        raise ConversionError(f"{root}/model_index.json lists no unet: minidiff reads (and python -m minidiff.convert "
                              "converts) Stable Diffusion 1.x/2.x and pixel-space DDPM pipelines")
    if (root / "config.json").is_file() and (class_name := folder_class(read_json(root / "config.json"))):
        hint = ""
        if class_name == "UNet2DModel":
            hint = (", or make a pixel model folder of it, with diffusers' default DDPM scheduler: python -m "
                    f"minidiff.convert {root} DST")
        raise ConversionError(f"{root} is a {class_name} folder, not a pipeline (no model_index.json): load it as a "
                              f"{class_name}{hint}")
    return read_config(root)["kind"]  # not a model folder at all: read_config says so


def load_pipeline(path_or_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None, scheduler: str | None = None, device: torch.device | str = "cpu"
                  ) -> tuple[str, dict]:
    """(kind, parts) of a pixel or Stable Diffusion pipeline from a minidiff folder, a diffusers pipeline folder
    (or the flat google/ddpm-* layout) or a single SD file: ("pixel", {"unet", "scheduler"}) or
    ("stable-diffusion", {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}). The scheduler is the class
    the source's config names (from minidiff.schedulers.SCHEDULERS); `scheduler`, a key of SCHEDULERS, picks
    another with the same config (noise schedule, prediction type)."""
    root = resolve(path_or_id, revision)
    kind = pipeline_kind(root)
    if root.is_file() or is_minidiff_folder(root):
        folder = whole_folder(root)
    else:
        folder = (read_sd_pipeline(root, variant) if kind == "stable-diffusion" else read_pixel(root, variant)).folder
    return kind, pipeline_components(folder, scheduler, torch_dtype, device)
