"""A minidiff model on disk: a folder holding config.json and one .safetensors file per component.

    weights/ddpm-celebahq-256/              weights/stable-diffusion-v1-5/
        config.json                             config.json
        unet.safetensors                        unet.safetensors, vae.safetensors, text_encoder.safetensors
                                                tokenizer/vocab.json, merges.txt (only if not CLIP's own)

config.json is human-readable. It says what kind of model the folder holds and gives each component's class
and config, under diffusers' / transformers' field names:

    {"minidiff_version": ..., "kind": "pixel" | "stable-diffusion" | "clip" | "vae" | "model", "source": "...",
     "unet": {"class": "UNet2DModel", "config": {...}},          one section per .safetensors file
     "tokenizer": {"pad_token": "!", "model_max_length": 77},    Stable Diffusion and CLIP (text) only
     "scheduler": {...}}                                         a diffusers scheduler_config.json as it is

("model": one lone model, saved by save_model, in a "model" section.) The same contents can live in memory, as a
ModelFolder: the converters (minidiff/convert) make one from a diffusers folder or a checkpoint, and every
loader here builds modules from a ModelFolder, whether open_model_folder read it from disk or a converter made it.

Weights load memory-mapped, straight into a module built on the meta device (no random init first, no copy
unless a dtype change asks for one), and strictly: every key and shape must fit. Modules come back in eval()
mode with requires_grad on, as diffusers' from_pretrained gives them: code that trains part of a model freezes
the rest itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minidiff import __version__
from minidiff.config import to_json_dict
from minidiff.loading.memory import keep_freed_memory
from minidiff.loading.safetensors import load_file, save_file
from minidiff.loading.strict import check_state_dict
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from minidiff.models.tokenizer import CLIPTokenizer, load_clip_bpe, read_tokenizer_folder
from minidiff.models.unet import UNet2DConfig, UNet2DModel
from minidiff.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.pipelines.pixel import PixelPipeline
from minidiff.pipelines.stable_diffusion import StableDiffusion
from minidiff.schedulers import SCHEDULERS, Scheduler

# What a component section's "class" may name: the module class and how to read its config.
MODEL_CLASSES = {
    "UNet2DModel": (UNet2DModel, UNet2DConfig.from_dict),
    "ClassConditionedUNet": (ClassConditionedUNet, lambda d: ClassConditionedConfig(**d)),
    "UNet2DConditionModel": (UNet2DConditionModel, UNet2DConditionConfig.from_dict),
    "AutoencoderKL": (AutoencoderKL, AutoencoderKLConfig.from_dict),
    "CLIPTextModel": (CLIPTextModel, CLIPTextConfig.from_dict),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig.from_dict),
    "CLIPVisionModel": (CLIPVisionModel, CLIPVisionConfig.from_dict),
    "CLIPVisionModelWithProjection": (CLIPVisionModelWithProjection, CLIPVisionConfig.from_dict),
    "CLIPModel": (CLIPModel, CLIPConfig.from_dict),
}
CLIP_CLASSES = tuple(name for name in MODEL_CLASSES if name.startswith("CLIP"))
# The components of each kind of pipeline folder, and the classes each may be.
PIPELINE_CLASSES = {
    "pixel": {"unet": ("UNet2DModel", "ClassConditionedUNet")},
    "stable-diffusion": {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                         "text_encoder": ("CLIPTextModel",)},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Vocabulary = tuple[dict[str, int], list[tuple[str, str]]]  # (token -> id, merges in rank order), as load_clip_bpe


class ModelFolderError(ValueError):
    """A folder that is not a minidiff model, or not the kind asked for; the message says what to do."""


@dataclass
class ModelFolder:
    """What a model folder holds, read from disk (open_model_folder) or made in memory (minidiff/convert)."""

    config: dict  # config.json: kind, source, one section per component, tokenizer, scheduler
    components: Mapping[str, Mapping[str, torch.Tensor]]  # {component: state dict in minidiff's layout}
    vocabulary: Vocabulary | None = None  # the tokenizer's, if not CLIP's own (tokenizer/ on disk)
    location: str = ""  # the folder, or the source it was converted from: for messages

    def weights_name(self, name: str) -> str:
        """Where component `name`'s weights are, for messages."""
        on_disk = isinstance(self.components, WeightFiles)
        return f"{self.location}/{name}.safetensors" if on_disk else f"{self.location} ({name})"


class WeightFiles(Mapping):
    """{component: state dict} of a folder on disk: <name>.safetensors, memory-mapped when first asked for."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.names:
            raise KeyError(name)
        weights = self.path / f"{name}.safetensors"
        if not weights.is_file():
            raise ModelFolderError(f"{weights} is missing (config.json has a {name} section)")
        return load_file(weights)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def component_names(config: dict) -> list[str]:
    """The sections of a config.json that describe a module (those with a "class")."""
    return [name for name, section in config.items() if isinstance(section, dict) and "class" in section]


def save_model_folder(
    path: str | os.PathLike,
    config: dict,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    files: Mapping[str, str] | None = None,
) -> None:
    """Write a model folder at `path` (which must not exist yet): config.json (`config`, with minidiff's version
    first), one <name>.safetensors per entry of `components` ({name: state dict}, floating-point tensors cast
    to `dtype` if given) and the text `files` ({relative path: content}, e.g. "tokenizer/vocab.json").

    Everything is written into a temporary sibling folder that is renamed into place at the end, so a failed
    run leaves nothing half-written and never touches an existing folder."""
    path = Path(path)
    if path.exists():
        raise ModelFolderError(f"{path} already exists: choose a new output folder or remove it first")
    temp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        for name, state_dict in components.items():
            if dtype is not None:
                state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
            save_file(state_dict, temp / f"{name}.safetensors")
        for name, text in (files or {}).items():
            (temp / name).parent.mkdir(parents=True, exist_ok=True)
            (temp / name).write_text(text, encoding="utf-8")
        (temp / "config.json").write_text(json.dumps({"minidiff_version": __version__, **config}, indent=2) + "\n")
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def vocabulary_files(vocabulary: Vocabulary | None) -> dict[str, str]:
    """A tokenizer vocabulary as the files of a model folder (the hub's vocab.json and merges.txt layout);
    none for CLIP's own (None), which minidiff ships."""
    if vocabulary is None:
        return {}
    vocab, merges = vocabulary
    return {"tokenizer/vocab.json": json.dumps(vocab, ensure_ascii=False),
            "tokenizer/merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}


def save_pixel_model(
    path: str | os.PathLike,
    unet: nn.Module | dict[str, torch.Tensor],
    unet_config: UNet2DConfig | ClassConditionedConfig,
    scheduler_config: dict,
    source: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Write a pixel-space model folder at `path` (which must not exist yet): see save_model_folder."""
    unet_class = "ClassConditionedUNet" if isinstance(unet_config, ClassConditionedConfig) else "UNet2DModel"
    config = {
        "kind": "pixel",
        "source": source,
        "unet": {"class": unet_class, "config": to_json_dict(unet_config)},
        "scheduler": scheduler_config,
    }
    state_dict = unet.state_dict() if isinstance(unet, nn.Module) else unet
    save_model_folder(path, config, {"unet": state_dict}, dtype)


def save_model(model: nn.Module, path: str | os.PathLike, source: str = "") -> None:
    """Write one model (any class of MODEL_CLASSES) as a "kind": "model" folder at `path` (which must not exist
    yet): config.json with a single "model" section, and model.safetensors."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ModelFolderError(f"cannot save a {name}: a model folder holds one of {', '.join(MODEL_CLASSES)}")
    config = {"kind": "model", "source": source, "model": {"class": name, "config": to_json_dict(model.config)}}
    save_model_folder(path, config, {"model": model.state_dict()})


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of a minidiff model folder, with a clear error if there is none."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path} does not exist or is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = " (a diffusers or hub folder? convert it first: python -m minidiff.convert SRC DST)"
        raise ModelFolderError(f"{path} is not a minidiff model folder: no config.json{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise ModelFolderError(f"{config_file} has no 'kind': convert the model with python -m minidiff.convert")
    return config


def open_model_folder(path: str | os.PathLike) -> ModelFolder:
    """A minidiff model folder on disk as a ModelFolder; each component's weights are read when asked for."""
    path = Path(path)
    config = read_config(path)
    vocabulary = None
    if (path / "tokenizer").is_dir():
        files = read_tokenizer_folder(path / "tokenizer")
        vocabulary = files.vocab, files.merges
    return ModelFolder(config, WeightFiles(path, component_names(config)), vocabulary, str(path))


def load_module(module: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Fill `module` (built on the meta device) with `state_dict`, strictly; the tensors become its parameters
    (no copy unless `dtype` casts them). `where` names the weights in messages."""
    keep_freed_memory()  # the weights stay memory-mapped; see memory.py for why that matters to speed
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        check_state_dict(module, state_dict)
    except ValueError as e:
        raise ModelFolderError(f"{where}: {e}") from None
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval()


def build_module(section: dict, state_dict: Mapping[str, torch.Tensor], where: str,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """The module a config.json section ({"class": ..., "config": {...}}) describes, built on the meta device
    and filled with `state_dict` (see load_module)."""
    model_class, make_config = MODEL_CLASSES[section["class"]]
    try:
        config = make_config(section["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{where}: invalid {section['class']} config: {e}") from None
    with torch.device("meta"):
        module = model_class(config)
    return load_module(module, state_dict, where, dtype)


def load_component(folder: ModelFolder, name: str, classes: tuple[str, ...], dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """The module of component `name` of a model folder (its class must be one of `classes`), filled strictly."""
    section = folder.config.get(name)
    found = section.get("class") if isinstance(section, dict) else None
    if found not in classes:
        raise ModelFolderError(f"{folder.location}/config.json: the {name} section names class {found!r}, not one "
                               f"of {', '.join(classes)}")
    return build_module(section, folder.components[name], folder.weights_name(name), dtype).to(device)


def make_scheduler(where: str, scheduler_config: dict, name: str | None = None) -> Scheduler:
    """The scheduler `name` (a key of SCHEDULERS; None: the class scheduler_config names) built from the folder's
    scheduler config, so that the noise schedule the model was trained with is kept."""
    by_class = {cls.__name__: cls for cls in SCHEDULERS.values()}
    class_name = SCHEDULERS[name].__name__ if name in SCHEDULERS else name or scheduler_config.get("_class_name")
    if class_name not in by_class:
        raise ModelFolderError(f"{where}: scheduler {class_name!r} is not one of minidiff's ({', '.join(by_class)}): "
                               f"pass scheduler= one of {', '.join(SCHEDULERS)} (the folder's noise schedule is kept)")
    return by_class[class_name].from_config(dict(scheduler_config))


def folder_tokenizer(folder: ModelFolder) -> CLIPTokenizer:
    """CLIP's tokenizer with the folder's pad token, length and added tokens; the folder's own vocabulary if it
    brought one that differs from CLIP's, else CLIP's shipped one."""
    section = folder.config["tokenizer"]
    vocab, merges = folder.vocabulary or (None, None)
    tokenizer = CLIPTokenizer(vocab, merges, section["pad_token"], section["model_max_length"])
    added = section.get("added_tokens", [])
    if tokenizer.add_tokens(added) != len(added):
        raise ModelFolderError(f"{folder.location}/config.json: an added token is already in the vocabulary: {added}")
    return tokenizer


def pipeline_components(folder: ModelFolder, scheduler: str | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> dict:
    """The parts of a pixel or Stable Diffusion folder, built: {"unet", "scheduler"} (pixel) or {"unet", "vae",
    "text_encoder", "tokenizer", "scheduler"}. `scheduler` (a key of SCHEDULERS) overrides the folder's own
    scheduler class, keeping its config (noise schedule, prediction type)."""
    kind = folder.config["kind"]
    if kind not in PIPELINE_CLASSES:
        raise ModelFolderError(f"{folder.location} holds a {kind!r} model, not a pixel or Stable Diffusion pipeline")
    parts = {name: load_component(folder, name, classes, dtype, device)
             for name, classes in PIPELINE_CLASSES[kind].items()}
    if kind == "stable-diffusion":
        parts["tokenizer"] = folder_tokenizer(folder)
    parts["scheduler"] = make_scheduler(folder.location, folder.config["scheduler"], scheduler)
    return parts


def read_kind(path: str | os.PathLike, kind: str, what: str) -> ModelFolder:
    folder = open_model_folder(path)
    if folder.config["kind"] != kind:
        raise ModelFolderError(f"{path} holds a {folder.config['kind']!r} model, not {what}")
    return folder


def load_pixel_pipeline(path: str | os.PathLike, scheduler: str | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> PixelPipeline:
    """Load a pixel-space model folder as a PixelPipeline. `scheduler` ("ddpm", "ddim", ...: a key of SCHEDULERS)
    overrides the folder's own scheduler class, keeping its config (the noise schedule the model was trained with)."""
    folder = read_kind(path, "pixel", "a pixel-space DDPM")
    return PixelPipeline(**pipeline_components(folder, scheduler, dtype, device))


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
             ) -> AutoencoderKL:
    """Load a VAE model folder ("kind": "vae", written by train.py vae)."""
    return load_component(read_kind(path, "vae", "a VAE"), "vae", ("AutoencoderKL",), dtype, device)


def scheduler_json(scheduler: Scheduler) -> dict:
    """A scheduler's config as diffusers saves it: every key, "_class_name" its class, no "_use_default_values"."""
    saved = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    return {**saved, "_class_name": type(scheduler).__name__}


def save_stable_diffusion(path: str | os.PathLike, sd: StableDiffusion, source: str = "",
                          dtype: torch.dtype | None = None, scheduler_config: dict | None = None) -> None:
    """Write a loaded (or trained) StableDiffusion as a model folder that load_stable_diffusion reads back: its
    components, its scheduler's config, and the tokenizer's pad token, length and added tokens (with the
    vocabulary files only if they are not CLIP's own).

    scheduler_config: the scheduler section to write instead, e.g. the source folder's own, which keeps the keys
    that sd.scheduler's class does not use but another one would (PNDM ignores clip_sample; DDIM reads it)."""
    tokenizer = sd.tokenizer
    section = {"pad_token": tokenizer.pad_token, "model_max_length": tokenizer.model_max_length}
    if tokenizer.added_tokens:
        section["added_tokens"] = sorted(tokenizer.added_tokens, key=tokenizer.added_tokens.get)
    vocabulary = tokenizer.encoder, list(tokenizer.bpe_ranks)
    modules = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}
    config = {"kind": "stable-diffusion", "source": source,
              **{name: {"class": type(m).__name__, "config": to_json_dict(m.config)} for name, m in modules.items()},
              "tokenizer": section,
              "scheduler": scheduler_config or scheduler_json(sd.scheduler)}
    files = vocabulary_files(None if vocabulary == load_clip_bpe() else vocabulary)
    save_model_folder(path, config, {name: m.state_dict() for name, m in modules.items()}, dtype, files)


def load_stable_diffusion(
    path: str | os.PathLike,
    scheduler: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> StableDiffusion:
    """Load a Stable Diffusion model folder (python -m minidiff.convert makes one from a diffusers pipeline or an
    original single-file checkpoint). `scheduler` ("ddim", "ddpm", "pndm", ...: a key of SCHEDULERS) overrides the
    folder's own scheduler class, keeping its config (noise schedule, prediction type)."""
    folder = read_kind(path, "stable-diffusion", "Stable Diffusion")
    return StableDiffusion(**pipeline_components(folder, scheduler, dtype, device))


def load_clip(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, CLIPTokenizer | None]:
    """Load a CLIP model folder: (CLIPModel, CLIPTextModel(WithProjection) or CLIPVisionModel(WithProjection),
    its tokenizer; None for a vision-only model)."""
    folder = read_kind(path, "clip", "a CLIP model")
    model = load_component(folder, "clip", CLIP_CLASSES, dtype, device)
    return model, folder_tokenizer(folder) if "tokenizer" in folder.config else None
