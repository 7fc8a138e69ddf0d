"""What every pipeline shares with diffusers' DiffusionPipeline, so course code handles minidiff's the same way:
its parts as attributes and as `pipe.components` (`StableDiffusionImg2ImgPipeline(**pipe.components)`),
`pipe.to(device, dtype)`, `from_pretrained` / `save_pretrained`, a progress bar while `pipe(...)` runs, and the
output record with `.images`.

The sampling itself is in the subclasses (pixel.py, stable_diffusion.py); nothing here knows a model or a
scheduler. The generators a pipeline's loop is written as (`denoise`) stay quiet: the progress bar is only in
`__call__`, and sample.py draws its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from minidiff.models.outputs import ModelOutput


@dataclass
class ImagePipelineOutput(ModelOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor  # PIL images, (B, H, W, C) in [0, 1], or latents


@dataclass
class StableDiffusionPipelineOutput(ModelOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None  # minidiff has no safety checker: always None


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images, rounded as diffusers rounds them."""
    images = images[None] if images.ndim == 3 else images
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess(images: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> diffusers' output types: "pil" (a list of PIL images), "np" ((B, H, W, C)
    float32 in [0, 1]) or "pt" ((B, C, H, W) in [0, 1])."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return array if output_type == "np" else numpy_to_pil(array)


class DiffusionPipeline:
    """Components, device and dtype, loading and saving, the progress bar. A subclass lists its components in
    `component_names` and takes them as keyword arguments of the same names."""

    component_names: tuple[str, ...] = ()
    progress_bar_config: dict | None = None

    @property
    def components(self) -> dict[str, object]:
        """{name: part}: the keyword arguments that build this pipeline (or another one over the same parts)."""
        return {name: getattr(self, name) for name in self.component_names}

    def modules(self) -> list[nn.Module]:
        return [part for part in self.components.values() if isinstance(part, nn.Module)]

    def to(self, *args, **kwargs) -> DiffusionPipeline:
        """pipe.to("cuda"), pipe.to(torch.float16), pipe.to("cpu", torch.float32): moves every model; returns pipe."""
        for module in self.modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def progress_bar(self, iterable=None, total: int | None = None):
        return tqdm(iterable, total=total, **(self.progress_bar_config or {}))

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm's options for the bar __call__ shows, e.g. disable=True."""
        self.progress_bar_config = kwargs

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
        return numpy_to_pil(images)

    kind = ""  # the "kind" of model folder this pipeline is built from: "pixel", "stable-diffusion"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        revision: str | None = None, variant: str | None = None, **components) -> DiffusionPipeline:
        """A minidiff folder, a diffusers pipeline folder, an original single file, or a hub id already in the local
        Hugging Face cache; never downloads. Reading every format is the converters' job: this is the one call up
        to minidiff/convert/pretrained.py. `components` replace stored ones (scheduler=..., safety_checker=None)."""
        from minidiff.convert.pretrained import load_pipeline

        kind, parts = load_pipeline(pretrained_model_name_or_path, torch_dtype=torch_dtype, revision=revision,
                                    variant=variant)
        if kind != cls.kind:
            raise ValueError(f"{pretrained_model_name_or_path} holds a {kind} model, not what {cls.__name__} runs "
                             f"({cls.kind})")
        return cls(**{**parts, **components})
