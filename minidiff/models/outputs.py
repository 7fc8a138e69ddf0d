"""What the models return: small records shaped like diffusers' and transformers' outputs, so course code that
reads `unet(x, t).sample`, `unet(x, t)["sample"]`, `unet(x, t, return_dict=False)[0]`,
`vae.encode(x).latent_dist.sample()` or `text_encoder(ids)[0]` runs unchanged.

A field is read by name (out.sample, out["sample"]) or by position among the fields that are set (out[0]),
as with transformers' ModelOutput; `return_dict=False` on a model returns that tuple instead.
"""

from dataclasses import dataclass, fields

import torch


class ModelOutput:
    """Base of the output records (dataclasses): attribute, key and position access."""

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order."""
        return tuple(v for f in fields(self) if (v := getattr(self, f.name)) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()


@dataclass
class UNet2DOutput(ModelOutput):
    """Both UNets (diffusers' UNet2DOutput and UNet2DConditionOutput)."""

    sample: torch.Tensor  # (B, out_channels, H, W): the predicted noise (or x0, or v)


@dataclass
class DecoderOutput(ModelOutput):
    """AutoencoderKL.decode (and forward)."""

    sample: torch.Tensor  # (B, out_channels, H, W) images, roughly in [-1, 1]


@dataclass
class AutoencoderKLOutput(ModelOutput):
    """AutoencoderKL.encode: the posterior q(z|x), a DiagonalGaussian (.sample(generator), .mean, .mode())."""

    latent_dist: object
