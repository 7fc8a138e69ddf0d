"""The course's class-conditioned UNet (Unit 2, "Making a class-conditioned diffusion model").

Instead of adding a class embedding to the time embedding (diffusers' num_class_embeds), the course learns a
small vector per class, paints it over every pixel as extra input channels, and feeds [x, class map] to an
ordinary unconditional UNet2DModel:

    labels (B,) -> nn.Embedding(num_classes, class_emb_size) -> (B, E) -> broadcast to (B, E, H, W)
    cat([x (B, C, H, W), class map], dim=1) -> UNet2DModel(in_channels = C + E) -> (B, out, H, W)

The notebook names the parts class_emb and model; minidiff calls the UNet `unet` (convert/keymaps/unet.py maps it).

With classifier_free, the table has one more row, label num_classes, meaning "no class": trained by replacing
labels with it at random (train.py class-conditioned --label-dropout), it lets the sampler mix the conditional
and the unconditional prediction, classifier-free guidance (Ho & Salimans 2022; pipelines/pixel.py). The course's
model has no such row.
"""

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.config import CLASSES, WIDTH, config_from, require, setting, validate
from minidiff.models.outputs import UNet2DOutput
from minidiff.models.pretrained import PretrainedModel
from minidiff.models.unet import UNet2DConfig, UNet2DModel


def digits_unet_config(class_emb_size: int = 4) -> UNet2DConfig:
    """The notebook's UNet for 28x28 MNIST digits; the fields it does not set keep diffusers' defaults."""
    return UNet2DConfig(
        sample_size=28,
        in_channels=1 + class_emb_size,  # the grey image + the class map
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


@dataclass
class ClassConditionedConfig:
    num_classes: int = setting(10, min=1, max=CLASSES)
    class_emb_size: int = setting(4, min=1, max=WIDTH)  # extra input channels carrying the class
    unet: UNet2DConfig | None = None  # None: the notebook's digits UNet
    classifier_free: bool = False  # one more embedding row, label num_classes: "no class"

    def __post_init__(self):
        if isinstance(self.unet, dict):
            self.unet = UNet2DConfig.from_dict(self.unet)
        validate(self)
        if self.unet is None:
            self.unet = digits_unet_config(self.class_emb_size)
        require(self, self.unet.in_channels > self.class_emb_size, f"unet.in_channels ({self.unet.in_channels}) "
                f"must be the image channels + class_emb_size ({self.class_emb_size})")


class ClassConditionedUNet(PretrainedModel, nn.Module):
    """forward(x (B, C, H, W), t, class_labels (B,) int64) -> UNet2DOutput, .sample (B, out_channels, H, W)."""

    def __init__(self, config: ClassConditionedConfig | dict | None = None, **kwargs):
        """From a config, a dict of its fields, or keyword arguments (num_classes=10, class_emb_size=4); none: the
        notebook's digits model."""
        super().__init__()
        self.config = config_from(ClassConditionedConfig, config, kwargs)
        rows = self.config.num_classes + self.config.classifier_free  # + the "no class" row
        self.class_emb = nn.Embedding(rows, self.config.class_emb_size)
        self.unet = UNet2DModel(self.config.unet)

    # The questions a sampling loop asks of a pixel UNet (see UNet2DModel); the class map is not part of the image.
    is_class_conditional = True
    image_channels = property(lambda self: self.config.unet.in_channels - self.config.class_emb_size)
    out_channels = property(lambda self: self.config.unet.out_channels)
    sample_size = property(lambda self: self.config.unet.sample_size)
    num_classes = property(lambda self: self.config.num_classes)
    has_null_class = property(lambda self: self.config.classifier_free)  # a "no class" label for CFG

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor,
                return_dict: bool = True) -> UNet2DOutput | tuple[torch.Tensor]:
        B, _, H, W = x.shape
        class_map = self.class_emb(class_labels)[:, :, None, None].expand(B, -1, H, W)  # (B, E) -> (B, E, H, W)
        return self.unet(torch.cat([x, class_map], dim=1), t, return_dict=return_dict)
