"""The pixel-space denoiser: diffusers' UNet2DModel (the DDPM UNet of Ho et al. 2020), built from a config.

    x (B, in, H, W) -> conv_in -> down blocks -> mid block -> up blocks -> GroupNorm, SiLU, conv_out
    t -> sinusoidal embedding -> MLP -> emb (B, 4*C0), added (per channel) inside every ResnetBlock
    class label (optional) -> its own embedding (B, 4*C0), added to emb

The blocks and the skip stack are the UNet skeleton (minidiff/models/unet_blocks.py): each down block halves
the resolution (except the last), each up block concatenates one skip per ResnetBlock. What this file adds is
the conditioning, a time (and class) embedding and nothing else, and the attention in the "Attn" blocks:
self-attention among the pixels (layers.Attention). Compare unet_condition.py, where the pixels attend to a text.

Reference: diffusers 0.42 models/unets/unet_2d.py and unet_2d_blocks.py (DownBlock2D, AttnDownBlock2D,
UNetMidBlock2D, UpBlock2D, AttnUpBlock2D). Module names equal diffusers' names, so a modern diffusers
state dict loads by identity (see minidiff/convert/keymaps/unet.py for the legacy names of old hub checkpoints).
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from minidiff.config import CLASSES, DEPTH, LEVELS, SIDE, WIDTH, config_from, from_json_dict, require, setting, validate
from minidiff.models.layers import Attention, TimestepEmbedding, timestep_embedding
from minidiff.models.outputs import UNet2DOutput
from minidiff.models.pretrained import PretrainedModel
from minidiff.models.unet_blocks import UNetSkeleton, check_block_types, unet_blocks


@dataclass
class UNet2DConfig:
    """Field names and defaults are those of diffusers' UNet2DModel config.json."""

    sample_size: int | tuple[int, int] | None = setting(None, min=1, max=SIDE)  # training size; others run too
    in_channels: int = setting(3, min=1, max=WIDTH)
    out_channels: int = setting(3, min=1, max=WIDTH)
    center_input_sample: bool = False  # map input x to 2x - 1 first
    time_embedding_type: str = setting("positional", choices=("positional",))  # sinusoidal
    time_embedding_dim: int | None = setting(None, min=1, max=4 * WIDTH)  # None: 4 * block_out_channels[0]
    freq_shift: float = setting(0, min=0)  # google/ddpm-*: 1
    flip_sin_to_cos: bool = True  # google/ddpm-*: False ([sin, cos])
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = setting("UNetMidBlock2D", choices=("UNetMidBlock2D", None))  # None: no mid block
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = setting((224, 448, 672, 896), min=1, max=WIDTH, max_len=LEVELS)
    layers_per_block: int = setting(2, min=1, max=DEPTH)  # ResnetBlocks per down block; up blocks have one more
    mid_block_scale_factor: float = setting(1.0, above=0)  # mid resnets and attention divide their output by this
    downsample_padding: int = setting(1, choices=(0, 1))  # 0: pad right/bottom only (google/ddpm-*)
    downsample_type: str = setting("conv", choices=("conv",))
    upsample_type: str = setting("conv", choices=("conv",))
    dropout: float = setting(0.0, min=0, below=1)
    act_fn: str = "silu"  # ResnetBlocks only; the time MLP and the output use SiLU regardless
    attention_head_dim: int | None = setting(8, min=1, max=WIDTH)  # channels per head; None: one head
    norm_num_groups: int = setting(32, min=1, max=WIDTH)
    attn_norm_num_groups: int | None = setting(None, min=1, max=WIDTH)  # mid-block attention; None: norm_num_groups
    norm_eps: float = setting(1e-5, above=0)
    resnet_time_scale_shift: str = setting("default", choices=("default",))  # "scale_shift" is not supported
    add_attention: bool = True  # attention in the mid block
    class_embed_type: str | None = setting(None, choices=(None, "timestep", "identity"))  # None: see num_class_embeds
    num_class_embeds: int | None = setting(None, min=1, max=CLASSES)  # an nn.Embedding of labels (if no type)
    num_train_timesteps: int | None = None  # only used by "learned" time embeddings; ignored

    def __post_init__(self):
        validate(self)
        check_block_types(self, ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                          "minidiff's pixel UNet has (Attn)DownBlock2D, (Attn)UpBlock2D")
        need, channels = partial(require, self), self.block_out_channels
        attn_groups = self.attn_norm_num_groups or self.norm_num_groups
        need(channels[-1] % attn_groups == 0,
             f"block_out_channels[-1] = {channels[-1]} is not divisible by attn_norm_num_groups {attn_groups}")
        attn_widths = [c for c, k in zip(channels, self.down_block_types, strict=True) if k.startswith("Attn")]
        attn_widths += [c for c, k in zip(channels[::-1], self.up_block_types, strict=True) if k.startswith("Attn")]
        attn_widths += [channels[-1]] if self.add_attention and self.mid_block_type else []
        head = self.attention_head_dim
        need(head is None or all(head <= c for c in attn_widths),
             f"attention_head_dim {head} is wider than an attention block ({min(attn_widths, default=0)} channels)")

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConfig":
        """Build from a diffusers UNet2DModel config.json dict, as it is.

        Keys starting with "_" (_class_name, _diffusers_version, ...) are dropped; other unknown keys are
        ignored with a warning naming them; invalid values raise ValueError.
        """
        return from_json_dict(cls, d)


class UNet2DModel(PretrainedModel, UNetSkeleton):
    """diffusers' UNet2DModel: predicts noise (or x0 / v) from a noisy image, a timestep and a class.

    Runs at any size the downsampling allows, not only sample_size: the up blocks upsample to the size of
    the skip they meet, so sizes that are not multiples of 2**(levels-1) also work (diffusers' UNet2DModel
    raises on those).
    """

    def __init__(self, config: UNet2DConfig | dict | None = None, **kwargs):
        """From a config, a config.json dict, or diffusers' keyword arguments (UNet2DModel(sample_size=28, ...))."""
        super().__init__()
        self.config = cfg = config_from(UNet2DConfig, config, kwargs)
        channels = cfg.block_out_channels
        temb_dim = cfg.time_embedding_dim or 4 * channels[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)  # SiLU whatever act_fn says
        if cfg.class_embed_type == "timestep":  # labels are numbers, embedded like timesteps
            self.class_embedding = TimestepEmbedding(channels[0], temb_dim)
        elif cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb_dim)
        else:  # "identity" (labels are already (B, temb_dim) vectors) or no class input
            self.class_embedding = None

        # The attention of the "Attn" blocks: the pixels attend to each other, attention_head_dim channels per
        # head (null: one head as wide as the block).
        def attention(level: int) -> Attention:
            return Attention(channels[level], cfg.attention_head_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)

        def mid_attention() -> Attention:  # its own GroupNorm groups; scaled like the mid ResnetBlocks
            groups = cfg.attn_norm_num_groups or cfg.norm_num_groups
            return Attention(channels[-1], cfg.attention_head_dim, groups=groups, eps=cfg.norm_eps,
                             rescale_output_factor=cfg.mid_block_scale_factor)

        self.down_blocks, self.mid_block, self.up_blocks = unet_blocks(
            cfg, temb_dim, attention, mid_attention if cfg.add_attention else None)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, kernel_size=3, padding=1)

    @property
    def is_class_conditional(self) -> bool:
        return self.class_embedding is not None or self.config.class_embed_type == "identity"

    # What a sampling loop asks of a pixel UNet; ClassConditionedUNet answers the same questions.
    image_channels = property(lambda self: self.config.in_channels)
    out_channels = property(lambda self: self.config.out_channels)
    sample_size = property(lambda self: self.config.sample_size)
    num_classes = property(lambda self: self.config.num_class_embeds)  # None for "identity" embeddings
    has_null_class = False  # no "no class" label: no classifier-free guidance

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, block_out_channels[0]) sinusoidal features."""
        return timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                  self.config.freq_shift)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """sample (B, in, H, W), timestep (a number, a 0-d or (B,) tensor), class_labels (B,) ->
        UNet2DOutput with .sample, the prediction (B, out, H, W); return_dict=False: the tuple (sample,).

        Unlike diffusers, a Python float timestep is not truncated to an int (diffusers turns 499.5 into
        499); a tensor timestep behaves exactly as in diffusers.
        """
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, sample.shape[0]):
            raise ValueError(f"got {t.numel()} timesteps for a batch of {sample.shape[0]}; pass one or one each")
        t = t.expand(sample.shape[0])  # (B,)
        emb = self.time_embedding(self.time_features(t).to(dtype))  # (B, temb_dim)

        if self.is_class_conditional:
            if class_labels is None:
                raise ValueError("this UNet is class-conditioned: pass class_labels")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_features(class_labels).to(dtype)
            class_emb = class_labels if self.class_embedding is None else self.class_embedding(class_labels)
            emb = emb + class_emb.to(dtype)
        elif class_labels is not None:
            raise ValueError("this UNet has no class embedding (set num_class_embeds or class_embed_type)")

        h = self.down_mid_up(self.conv_in(sample), emb)  # down path, skip stack, up path (unet_blocks.py)
        out = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return UNet2DOutput(out) if return_dict else (out,)

