"""The pixel-space training modes: `ddpm` (fine-tune a converted UNet2DModel, or train one from a config, on an
image folder) and `class-conditioned` (the course's digits model: one subfolder per class, from scratch).

Both train the same objective, the denoising loss of loop.py on the images themselves; they differ in
the data (labels or none) and in the model each accepts. The result is a minidiff model folder that
sample.py samples (with --class-label for class-conditioned models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minidiff.config import to_json_dict
from minidiff.images import make_grid
from minidiff.loading.model_folder import ModelFolderError, load_pixel_pipeline, read_config, save_pixel_model
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet, digits_unet_config
from minidiff.models.unet import UNet2DConfig, UNet2DModel
from minidiff.pipelines.pixel import DEFAULT_CFG_SCALE, PixelPipeline
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from minidiff.training.data import ImageDataset
from minidiff.training.loop import Task, denoising_loss, enable_gradient_checkpointing


class PixelDenoisingLoss(nn.Module):
    """The thing a pixel mode trains: forward(batch, generators) -> the mean denoising loss of the batch.

    batch: {"images": (B, C, H, W) in [-1, 1], "class_labels": (B,) int64 for class-conditioned models}.
    label_dropout: the probability that an example's label is replaced by the "no class" label (a
    classifier_free ClassConditionedUNet), drawn from the example's generator: classifier-free guidance training."""

    def __init__(self, unet: nn.Module, scheduler: Scheduler, label_dropout: float = 0.0) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.label_dropout = label_dropout

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        labels = batch.get("class_labels")
        if self.label_dropout:
            dropped = torch.cat([torch.rand(1, generator=g) for g in generators]).to(labels.device) < self.label_dropout
            labels = torch.where(dropped, self.unet.config.num_classes, labels)  # (B,): the last row is "no class"

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return (self.unet(x_t, t) if labels is None else self.unet(x_t, t, labels)).sample

        return denoising_loss(denoise, self.scheduler, batch["images"], generators).mean()


@dataclass
class PixelModel:
    """A UNet to train, with the configs its model folder will record."""

    unet: nn.Module
    unet_config: UNet2DConfig | ClassConditionedConfig
    scheduler_config: dict  # a diffusers scheduler_config.json dict
    origin: str  # "fine-tuned from PATH" or "trained from scratch"


def load_model(path: str | Path) -> PixelModel:
    """A pixel model folder (made by python -m minidiff.convert or by train.py) to fine-tune, in float32."""
    unet = load_pixel_pipeline(path, dtype=torch.float32).unet.requires_grad_(True)
    return PixelModel(unet, unet.config, read_config(path)["scheduler"], f"fine-tuned from {Path(path).resolve()}")


def scratch_scheduler_config(num_train_timesteps: int, beta_schedule: str, prediction_type: str) -> dict:
    """A DDPM noise schedule for a new model (checked by building the scheduler)."""
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": num_train_timesteps,
              "beta_schedule": beta_schedule, "prediction_type": prediction_type}
    DDPMScheduler.from_config(config)
    return config


def new_model(mode: str, dataset: ImageDataset, unet_config: dict | None, scheduler_config: dict,
              seed: int, classifier_free: bool = False) -> PixelModel:
    """A freshly initialised model (seeded). ddpm: a UNet2DModel from `unet_config` (a diffusers UNet2DModel
    config.json dict). class-conditioned: the course's ClassConditionedUNet, its inner UNet from `unet_config`
    or, without one, the notebook's digits UNet for this data's channels and classes; classifier_free adds its
    "no class" label."""
    if mode == "ddpm":
        if unet_config is None:
            raise ValueError("ddpm from scratch needs a UNet config: add --unet-config FILE (or --model DIR)")
        config = UNet2DConfig.from_dict(unet_config)
    else:
        if unet_config is None:  # the notebook's UNet, for this data: C image channels + 4 class channels
            inner = dataclasses.replace(digits_unet_config(), in_channels=dataset.channels + 4,
                                        out_channels=dataset.channels)
        else:
            inner = UNet2DConfig.from_dict(unet_config)
        config = ClassConditionedConfig(num_classes=len(dataset.classes), unet=inner, classifier_free=classifier_free)
    torch.manual_seed(seed)
    unet = UNet2DModel(config) if mode == "ddpm" else ClassConditionedUNet(config)
    return PixelModel(unet, config, scheduler_config, "trained from scratch")


def check_model_fits(mode: str, pipeline: PixelPipeline, dataset: ImageDataset) -> None:
    """A ModelFolderError if the model cannot learn this data in this mode."""
    if mode == "ddpm" and pipeline.is_class_conditional:
        raise ModelFolderError("the model is class-conditioned: train it with the class-conditioned mode")
    if mode == "class-conditioned" and not pipeline.is_class_conditional:
        raise ModelFolderError("the model is unconditional: train it with the ddpm mode")
    channels, kinds = dataset.channels, {1: "greyscale (L, 1 channel)", 3: "RGB (3 channels)"}
    if pipeline.image_channels != channels or pipeline.unet.out_channels != channels:
        raise ModelFolderError(
            f"the model takes {pipeline.image_channels}-channel images and predicts {pipeline.unet.out_channels} "
            f"channels, but the images are {kinds[channels]}: use images of the model's kind "
            f"or a UNet config with in_channels/out_channels for {channels}-channel images")
    if mode == "class-conditioned" and pipeline.num_classes not in (None, len(dataset.classes)):
        raise ModelFolderError(f"the model knows {pipeline.num_classes} classes but the data has "
                               f"{len(dataset.classes)} class folders ({', '.join(dataset.classes)})")


def pixel_task(mode: str, dataset: ImageDataset, model: PixelModel, gradient_checkpointing: bool = False,
               num_sample_images: int = 16, sample_steps: int = 50, label_dropout: float = 0.0) -> Task:
    """The Task for loop.py's trainer: objective, data, final-model writer and sample grids (DDIM, with
    classifier-free guidance at DEFAULT_CFG_SCALE for a model that has a "no class" label)."""
    if not 0 <= label_dropout < 1:
        raise ValueError(f"--label-dropout must be in [0, 1), got {label_dropout}")
    if label_dropout and not model.unet.has_null_class:
        raise ValueError("--label-dropout trains the \"no class\" label of a model made with it: this model has "
                         "none (train one from scratch with --label-dropout, or drop the option)")
    size = dataset.resolution[0]
    unet_config = model.unet_config
    if isinstance(unet_config, ClassConditionedConfig):  # record the training resolution as sample_size
        unet_config = dataclasses.replace(unet_config, unet=dataclasses.replace(unet_config.unet, sample_size=size))
    else:
        unet_config = dataclasses.replace(unet_config, sample_size=size)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    pipeline = PixelPipeline(model.unet, DDIMScheduler.from_config(model.scheduler_config))
    pipeline.set_progress_bar_config(disable=True)  # the training loop has its own bar
    check_model_fits(mode, pipeline, dataset)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model.unet)
    classes = dataset.classes

    def save_model(path: Path, weights: str) -> None:
        labels = f", classes {', '.join(f'{i}={name}' for i, name in enumerate(classes))}" if classes else ""
        source = (f"minidiff train.py {mode}: {model.origin}, on {dataset.source} ({len(dataset)} images at "
                  f"{size}x{size}{labels}); {weights}")
        save_pixel_model(path, model.unet, unet_config, model.scheduler_config, source=source)

    def sample_grid(generator: torch.Generator):
        labels = [i % len(classes) for i in range(num_sample_images)] if classes else None
        cfg_scale = DEFAULT_CFG_SCALE if pipeline.has_null_class else 1.0
        images = pipeline(num_sample_images, generator, sample_steps, class_labels=labels, height=size, width=size,
                          cfg_scale=cfg_scale).images
        return make_grid(images, columns=len(classes) if classes else None)

    fingerprint = {"mode": mode, "model": model.origin, "unet": to_json_dict(unet_config),
                   "scheduler": model.scheduler_config, "data": dataset.source, "resolution": size,
                   "classes": classes, "random_flip": dataset.random_flip, "label_dropout": label_dropout}
    return Task(PixelDenoisingLoss(model.unet, scheduler, label_dropout), dataset, save_model, sample_grid, fingerprint)
