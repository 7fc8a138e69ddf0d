"""A minidiff model on disk: a folder holding config.json and one .safetensors file per component.

    weights/ddpm-celebahq-256/
        config.json         {"kind": "pixel", "unet": {"class": ..., "config": {...}}, "scheduler": {...}, ...}
        unet.safetensors    the UNet's state dict under minidiff's own key names

config.json is human-readable: the component configs use diffusers' field names and the scheduler section
is a diffusers scheduler_config.json as it is. Weights load memory-mapped, straight into the module (no
random init first, no copy unless a dtype change asks for one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from minidiff import __version__
from minidiff.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.keymaps import check_state_dict
from minidiff.pipelines import PixelPipeline
from minidiff.safetensors import load_file, save_file
from minidiff.schedulers import DDIMScheduler, DDPMScheduler
from minidiff.unet import UNet2DConfig, UNet2DModel

UNET_CLASSES = {
    "UNet2DModel": (UNet2DModel, UNet2DConfig.from_dict),
    "ClassConditionedUNet": (ClassConditionedUNet, lambda d: ClassConditionedConfig(**d)),
}
SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelFolderError(ValueError):
    """A folder that is not a minidiff model, or not the kind asked for; the message says what to do."""


def config_to_dict(config: object) -> dict:
    """A config dataclass -> JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_pixel_model(
    path: str | os.PathLike,
    unet: nn.Module | dict[str, torch.Tensor],
    unet_config: UNet2DConfig | ClassConditionedConfig,
    scheduler_config: dict,
    source: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Write a pixel-space model folder at `path` (which must not exist yet).

    Everything is written into a temporary sibling folder that is renamed into place at the end, so a failed
    run leaves nothing half-written and never touches an existing folder."""
    path = Path(path)
    if path.exists():
        raise ModelFolderError(f"{path} already exists: choose a new output folder or remove it first")
    unet_class = "ClassConditionedUNet" if isinstance(unet_config, ClassConditionedConfig) else "UNet2DModel"
    state_dict = unet.state_dict() if isinstance(unet, nn.Module) else unet
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config = {
        "minidiff_version": __version__,
        "kind": "pixel",
        "source": source,
        "unet": {"class": unet_class, "config": config_to_dict(unet_config)},
        "scheduler": scheduler_config,
    }
    temp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        save_file(state_dict, temp / "unet.safetensors")
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


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


def load_module(module: nn.Module, weights: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Fill `module` (built on the meta device) with the tensors of a .safetensors file, strictly."""
    state_dict = load_file(weights)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        check_state_dict(module, state_dict)
    except ValueError as e:
        raise ModelFolderError(f"{weights}: {e}") from None
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_pixel_pipeline(
    path: str | os.PathLike,
    scheduler: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> PixelPipeline:
    """Load a pixel-space model folder as a PixelPipeline. `scheduler` ("ddpm" or "ddim") overrides the
    folder's own scheduler class, keeping its config (the noise schedule the model was trained with)."""
    path = Path(path)
    config = read_config(path)
    if config["kind"] != "pixel":
        raise ModelFolderError(f"{path} holds a {config['kind']!r} model, not a pixel-space DDPM")
    unet_section = config["unet"]
    if unet_section.get("class") not in UNET_CLASSES:
        raise ModelFolderError(f"{path}/config.json: unknown UNet class {unet_section.get('class')!r}")
    unet_class, make_config = UNET_CLASSES[unet_section["class"]]
    try:
        unet_config = make_config(unet_section["config"])
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}/config.json: invalid UNet config: {e}") from None
    with torch.device("meta"):
        unet = unet_class(unet_config)
    unet = load_module(unet, path / "unet.safetensors", dtype).to(device)

    scheduler_config = dict(config["scheduler"])
    name = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}.get(scheduler, scheduler)
    name = name or scheduler_config.get("_class_name")
    if name not in SCHEDULERS:
        raise ModelFolderError(f"{path}: scheduler {name!r} is not one of ddpm, ddim")
    return PixelPipeline(unet, SCHEDULERS[name].from_config(scheduler_config))
