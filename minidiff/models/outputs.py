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


# CLIP (transformers' BaseModelOutput(WithPooling), CLIPTextModelOutput, CLIPOutput), minidiff/models/clip.py


@dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # (B, L, D): the output of the last layer (no final LayerNorm)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # the input of every layer and that output: N + 1


@dataclass
class CLIPTextOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # (B, L, D), after the final LayerNorm
    pooler_output: torch.Tensor | None = None  # (B, D): last_hidden_state at each sequence's EOS
    hidden_states: tuple[torch.Tensor, ...] | None = None  # N + 1 states (B, L, D), embeddings first, no final LN
    text_embeds: torch.Tensor | None = None  # (B, projection_dim), CLIPTextModelWithProjection only


@dataclass
class CLIPVisionOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # (B, 1 + patches, D), without post_layernorm
    pooler_output: torch.Tensor  # (B, D): post_layernorm of the class token's state
    hidden_states: tuple[torch.Tensor, ...] | None = None  # N + 1 states, the first after pre_layrnorm
    image_embeds: torch.Tensor | None = None  # (B, projection_dim), CLIPVisionModelWithProjection only


@dataclass
class CLIPOutput(ModelOutput):
    logits_per_image: torch.Tensor  # (images, texts): cosine similarity * logit_scale.exp()
    logits_per_text: torch.Tensor  # (texts, images), its transpose
    text_embeds: torch.Tensor  # (texts, projection_dim), unit length
    image_embeds: torch.Tensor  # (images, projection_dim), unit length
