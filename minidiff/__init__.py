"""minidiff: diffusion models from scratch in plain PyTorch, at parity with diffusers.

The names the course imports, from where they are defined, so that notebook code runs with only its imports
changed (`from diffusers import DDPMPipeline` -> `from minidiff import DDPMPipeline`):

    models       UNet2DModel, UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, ...
    schedulers   DDPMScheduler, DDIMScheduler, PNDMScheduler
    pipelines    DDPMPipeline, DDIMPipeline, StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
                 StableDiffusionInpaintPipeline
"""

__version__ = "0.1.0"

from minidiff import logging  # noqa: E402  (transformers' logging.set_verbosity_error, as the Deep Dive imports it)
from minidiff.models.class_conditioned import ClassConditionedUNet  # noqa: E402
from minidiff.models.clip import (  # noqa: E402
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from minidiff.models.tokenizer import CLIPTokenizer  # noqa: E402
from minidiff.models.unet import UNet2DModel  # noqa: E402
from minidiff.models.unet_condition import UNet2DConditionModel  # noqa: E402
from minidiff.models.vae import AutoencoderKL  # noqa: E402
from minidiff.pipelines.pixel import DDIMPipeline, DDPMPipeline, PixelPipeline  # noqa: E402
from minidiff.pipelines.stable_diffusion import (  # noqa: E402
    StableDiffusion,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler  # noqa: E402

__all__ = [
    "AutoencoderKL", "CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPVisionModel",
    "CLIPVisionModelWithProjection", "ClassConditionedUNet", "DDIMPipeline", "DDIMScheduler", "DDPMPipeline",
    "DDPMScheduler", "PNDMScheduler", "PixelPipeline", "StableDiffusion", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "UNet2DConditionModel", "UNet2DModel", "logging",
]
