"""Sampling loops for pixel-space diffusion models: unconditional, class-conditioned and loss-guided.

The loop is the one of the course's Unit 1-2 notebooks, written out so every step is visible:

    x_T ~ N(0, I)
    for t in scheduler.timesteps:
        eps = unet(scale_model_input(x_t), t, class_labels).sample   # predict the noise
        (guidance: x_t <- x_t - grad loss(x_0(x_t, eps)))        # optional, see guidance.py
        x_{t-1} = scheduler.step(eps, t, x_t).prev_sample       # the sampler's update (DDPM, DDIM, ...)

A class-conditioned model trained with a "no class" label (models/class_conditioned.py, classifier_free) can be
sampled with classifier-free guidance (Ho & Salimans 2022, eq. 6), the same mix Stable Diffusion makes:

    eps = eps(x_t, t, no class) + cfg_scale * (eps(x_t, t, class) - eps(x_t, t, no class))

`PixelPipeline.denoise` is a generator that yields after every step, so a caller (sample.py) owns the
progress bar; `PixelPipeline.__call__` runs it to the end and returns `.images`. Noise is drawn exactly as
diffusers' DDPMPipeline and DDIMPipeline draw it, so the same seed gives the same image
(tests/test_pixel_pipeline.py). Under diffusers' names: DDPMPipeline is this class, DDIMPipeline this class
with its scheduler made a DDIMScheduler (as diffusers' DDIMPipeline does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from minidiff.noise import Generator, randn_tensor
from minidiff.pipelines.base import DiffusionPipeline, ImagePipelineOutput, postprocess
from minidiff.pipelines.guidance import LossGuidance, classifier_free_guidance
from minidiff.schedulers import DDIMScheduler, Scheduler

# For models with a "no class" label (weights/digits); 1.0 turns guidance off. Measured on weights/digits
# (tests/quality_digits.py, 200 digits per seed): the asked digit is drawn 93.5 / 93.5 / 88.5% of the time
# unguided, 97 / 95.5 / 94.5% at 1.25; at 1.5 and 2 (seed 0) strokes thicken and break up: 88.5%, 51%.
# Stable Diffusion's 7.5 would be far too strong for a 1.7M-parameter pixel model that sees its class only as 4
# input channels.
DEFAULT_CFG_SCALE = 1.25


class PixelPipeline(DiffusionPipeline):
    """A pixel-space denoiser and its scheduler, ready to sample.

    `unet` is a UNet2DModel (optionally class-conditional through num_class_embeds) or the course's
    ClassConditionedUNet; `scheduler` any minidiff scheduler, DDPM, DDIM, ... (the sampler is the scheduler;
    swap it with `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`).
    """

    component_names = ("unet", "scheduler")
    kind = "pixel"

    def __init__(self, unet: nn.Module, scheduler: Scheduler) -> None:
        self.unet = unet
        self.scheduler = scheduler

    @property
    def is_class_conditional(self) -> bool:
        return self.unet.is_class_conditional

    @property
    def has_null_class(self) -> bool:
        """Whether the model knows a "no class" label, so that classifier-free guidance can be used."""
        return self.unet.has_null_class

    @property
    def num_classes(self) -> int | None:
        """How many class labels the model knows (None if it does not say, e.g. 'identity' embeddings)."""
        return self.unet.num_classes

    @property
    def image_channels(self) -> int:
        return self.unet.image_channels

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self.unet.sample_size
        if size is None:
            raise ValueError("the UNet config has no sample_size: pass height and width")
        return (size, size) if isinstance(size, int) else tuple(size)

    def check_class_labels(self, class_labels: torch.Tensor | None, batch_size: int) -> None:
        """A clear error for labels given to an unconditional model, missing, or out of range."""
        if class_labels is None:
            if self.is_class_conditional:
                raise ValueError("this model is class-conditioned: pass class labels (e.g. --class-label 7)")
            return
        if not self.is_class_conditional:
            raise ValueError("this model is unconditional: it takes no class labels")
        if class_labels.shape != (batch_size,):
            raise ValueError(f"need one class label per image ({batch_size}), got shape {tuple(class_labels.shape)}")
        n = self.num_classes
        if n is not None and not (0 <= int(class_labels.min()) and int(class_labels.max()) < n):
            raise ValueError(f"class labels must be in 0..{n - 1} for this model, got {class_labels.tolist()}")

    def check_cfg_scale(self, cfg_scale: float, class_labels: torch.Tensor | None) -> None:
        """A clear error for classifier-free guidance asked of a model that cannot do it."""
        if cfg_scale != 1.0 and not (self.has_null_class and class_labels is not None):
            raise ValueError("classifier-free guidance needs a class-conditioned model trained with a \"no class\" "
                             "label (train.py class-conditioned --label-dropout) and class labels")

    def denoise(self, x: torch.Tensor, class_labels: torch.Tensor | None = None, guidance: LossGuidance | None = None,
                generator: Generator = None, eta: float = 0.0, cfg_scale: float = 1.0) -> Iterator[torch.Tensor]:
        """Run the reverse process from x_T over `scheduler.timesteps` (call set_timesteps first), yielding
        x_{t-1} after each step. `eta` applies to DDIM only (0: deterministic, 1: DDPM-like). `cfg_scale` != 1:
        classifier-free guidance, for a model with a "no class" label."""
        self.check_cfg_scale(cfg_scale, class_labels)
        scheduler = self.scheduler
        if cfg_scale != 1.0:  # each image twice in one batch of 2B: with "no class", then with its class
            no_class = torch.full_like(class_labels, self.unet.num_classes)
            guided_labels = torch.cat([no_class, class_labels])
        ddim_eta = {"eta": eta} if eta else {}  # DDIM's knob: passed only when set (0 is DDIM's default)
        for i, t in enumerate(scheduler.timesteps):
            guide = guidance is not None and guidance.applies_at(i)
            grad_through_unet = guide and guidance.through_unet
            with torch.set_grad_enabled(grad_through_unet):
                if grad_through_unet:
                    x = x.detach().requires_grad_()
                model_input = scheduler.scale_model_input(x, t)
                if class_labels is None:
                    model_output = self.unet(model_input, t).sample
                elif cfg_scale == 1.0:
                    model_output = self.unet(model_input, t, class_labels).sample
                else:
                    eps = self.unet(torch.cat([model_input, model_input]), t, guided_labels).sample
                    model_output, _ = classifier_free_guidance(eps, cfg_scale)
            if guide:  # move x_t down the loss gradient, then take the ordinary step from there
                x = guidance.nudge(x, model_output, t, scheduler)
            x = scheduler.step(model_output.detach(), t, x.detach(), generator=generator, **ddim_eta).prev_sample
            yield x

    def prepare(self, batch_size: int = 1, num_inference_steps: int | None = None, generator: Generator = None,
                height: int | None = None, width: int | None = None,
                class_labels: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Set the scheduler's timesteps and draw x_T ~ N(0, I) as diffusers does: (x_T, class_labels)."""
        parameter = next(self.unet.parameters())
        default_h, default_w = self.sample_size if height is None or width is None else (height, width)
        height, width = height or default_h, width or default_w
        if num_inference_steps is None:  # diffusers' DDPMPipeline runs all 1000 steps, DDIMPipeline 50
            num_inference_steps = self.scheduler.default_num_inference_steps
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images: pass one per image")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=parameter.device).reshape(-1)
        self.check_class_labels(class_labels, batch_size)
        self.scheduler.set_timesteps(num_inference_steps)
        shape = (batch_size, self.image_channels, height, width)
        x = randn_tensor(shape, generator, device=parameter.device, dtype=parameter.dtype)
        return x * self.scheduler.init_noise_sigma, class_labels

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generator = None, num_inference_steps: int | None = None, *,
                 eta: float = 0.0, class_labels: torch.Tensor | list[int] | None = None,
                 guidance: LossGuidance | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", cfg_scale: float = 1.0,
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Sample `batch_size` images -> `.images`: PIL images ("pil"), (B, H, W, C) floats in [0, 1] ("np") or
        (B, C, H, W) in [0, 1] ("pt"); return_dict=False: the tuple (images,). num_inference_steps defaults to
        the scheduler's (DDPM: all 1000, DDIM: 50). cfg_scale: classifier-free guidance (see denoise)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        x, class_labels = self.prepare(batch_size, num_inference_steps, generator, height, width, class_labels)
        steps = self.denoise(x, class_labels, guidance, generator, eta, cfg_scale)
        for x_prev in self.progress_bar(steps, total=len(self.scheduler.timesteps)):
            x = x_prev
        images = postprocess(x, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a minidiff model folder (which must not exist yet): the UNet and the scheduler's config."""
        from minidiff.loading.model_folder import save_pixel_model, scheduler_json

        save_pixel_model(save_directory, self.unet, self.unet.config, scheduler_json(self.scheduler))


DDPMPipeline = PixelPipeline  # diffusers' name for it


class DDIMPipeline(PixelPipeline):
    """diffusers' DDIMPipeline: a PixelPipeline whose scheduler is turned into a DDIMScheduler with the same
    config (the same noise schedule), so it samples in 50 steps by default."""

    def __init__(self, unet: nn.Module, scheduler: Scheduler) -> None:
        super().__init__(unet, DDIMScheduler.from_config(scheduler.config))
