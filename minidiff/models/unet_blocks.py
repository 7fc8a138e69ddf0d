"""The UNet skeleton shared by the pixel UNet (unet.py) and Stable Diffusion's UNet (unet_condition.py).

    h (B, C0, H, W) from conv_in -> down blocks -> mid block -> up blocks -> (B, C0, H, W) for the output head

    down block at level i: [ResnetBlock -> attention?] x layers_per_block -> Downsample (all but the last level)
    mid block:             ResnetBlock -> attention? -> ResnetBlock, at the lowest resolution
    up block at level i:   [cat(h, skip) -> ResnetBlock -> attention?] x (layers_per_block + 1) -> Upsample (not at 0)

Level i works at block_out_channels[i] channels. Every map the down path makes (conv_in's, each
ResnetBlock(+attention)'s, each Downsample's) goes on a skip stack, and each up-block ResnetBlock takes one back,
so the two halves mirror each other (Ronneberger et al. 2015, fig. 1; Ho et al. 2020, app. B). Every
ResnetBlock adds the time embedding emb.

What follows a ResnetBlock is where the two UNets differ, so they pass it in: the pixel UNet puts a
self-attention over the pixels (layers.Attention) in its "Attn" blocks; Stable Diffusion puts a Transformer2D,
whose cross-attention reads the text, in its "CrossAttn" blocks. An attention is called as attention(h, *context):
the pixel UNet passes no context, SD passes the text encoder's hidden states.

Reference: diffusers 0.42 models/unets/unet_2d_blocks.py ((Attn|CrossAttn)DownBlock2D, UNetMidBlock2D,
UNetMidBlock2DCrossAttn, (Attn|CrossAttn)UpBlock2D). Module names are diffusers' (resnets.N, attentions.N,
downsamplers.0, upsamplers.0), so its state dicts load by identity.
"""

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import nn

from minidiff.config import require
from minidiff.models.layers import ACTIVATIONS, Downsample, ResnetBlock, Upsample

MakeResnet = Callable[[int, int], ResnetBlock]  # (in_channels, out_channels) -> a ResnetBlock
MakeAttention = Callable[[], nn.Module]  # -> the attention after one ResnetBlock


class UNetConfig(Protocol):
    """The config fields the skeleton reads; UNet2DConfig and UNet2DConditionConfig both have them."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: int
    mid_block_scale_factor: float
    downsample_padding: int
    norm_num_groups: int
    norm_eps: float
    dropout: float
    act_fn: str


def check_block_types(config: UNetConfig, kinds: tuple[str, ...], kinds_text: str) -> None:
    """What both UNet configs check of their blocks (called from their __post_init__): diffusers' old names
    ("UNetResDownBlock2D", ...) read as today's; one down and one up block per level, each a known kind
    (`kinds`, described to the user as `kinds_text`) on its own side; act_fn known; every width a multiple
    of the GroupNorm groups."""
    config.down_block_types = tuple(t.removeprefix("UNetRes") for t in config.down_block_types)
    config.up_block_types = tuple(t.removeprefix("UNetRes") for t in config.up_block_types)
    need, channels = partial(require, config), config.block_out_channels
    need(len(config.down_block_types) == len(channels) == len(config.up_block_types), "down_block_types, "
         f"block_out_channels and up_block_types must have the same length, got {len(config.down_block_types)}, "
         f"{len(channels)}, {len(config.up_block_types)}")
    for kind in config.down_block_types + config.up_block_types:
        need(kind in kinds, f"unsupported block type {kind!r}; {kinds_text}")
    need(all("Down" in k for k in config.down_block_types) and all("Up" in k for k in config.up_block_types),
         f"down/up block types are swapped: {config.down_block_types}, {config.up_block_types}")
    need(config.act_fn.lower() in ACTIVATIONS, f"act_fn {config.act_fn!r} is not one of {sorted(ACTIVATIONS)}")
    bad = [c for c in channels if c % config.norm_num_groups]
    need(not bad, f"block_out_channels {bad} are not divisible by norm_num_groups {config.norm_num_groups}")


class DownBlock(nn.Module):
    """num_layers ResnetBlocks, each followed by an attention if `attention` builds one, then a Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet: MakeResnet,
                 attention: MakeAttention | None, *, add_downsample: bool, downsample_padding: int):
        super().__init__()
        resnets, attentions = [], []
        for i in range(num_layers):  # built in diffusers' order, so a seed gives diffusers' initial weights
            resnets.append(resnet(in_channels if i == 0 else out_channels, out_channels))
            attentions += [attention()] if attention else []
        self.resnets, self.attentions = nn.ModuleList(resnets), nn.ModuleList(attentions)
        # A list (empty or one) so the keys read downsamplers.0.conv.* as in diffusers.
        self.downsamplers = nn.ModuleList(
            [Downsample(out_channels, padding=downsample_padding)] if add_downsample else []
        )

    def forward(self, h: torch.Tensor, emb: torch.Tensor, *context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> the output and the skips this block pushes: every resnet(+attention) output and the downsampled map."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[i](h, *context)
            skips.append(h)
        for downsample in self.downsamplers:
            h = downsample(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """num_layers ResnetBlocks, each eating one skip (concatenated on channels) and followed by an attention if
    `attention` builds one; then an Upsample to the size of the next skip.

    prev_channels come from the block below; the skips have out_channels, except the last: in_channels, the
    width entering this level's down block."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, num_layers: int,
                 resnet: MakeResnet, attention: MakeAttention | None, *, add_upsample: bool):
        super().__init__()
        resnets, attentions = [], []
        for i in range(num_layers):  # in diffusers' order, as DownBlock
            h_channels = prev_channels if i == 0 else out_channels
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnets.append(resnet(h_channels + skip_channels, out_channels))
            attentions += [attention()] if attention else []
        self.resnets, self.attentions = nn.ModuleList(resnets), nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, *context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C_h + C_skip, H, W)
            if self.attentions:
                h = self.attentions[i](h, *context)
        for upsample in self.upsamplers:
            h = upsample(h, upsample_size)
        return h


class MidBlock(nn.Module):
    """ResnetBlock, attention (if `attention` builds one), ResnetBlock, at the lowest resolution.

    diffusers' UNetMidBlock2D (also the VAE's, with no time embedding: emb None) and UNetMidBlock2DCrossAttn.
    """

    def __init__(self, channels: int, resnet: MakeResnet, attention: MakeAttention | None):
        super().__init__()
        first = resnet(channels, channels)  # built in diffusers' order: resnet, attention, resnet
        attentions = [attention()] if attention else []
        self.resnets = nn.ModuleList([first, resnet(channels, channels)])
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None, *context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        for attention in self.attentions:
            h = attention(h, *context)
        return self.resnets[1](h, emb)


def unet_blocks(cfg: UNetConfig, temb_channels: int, attention: Callable[[int], nn.Module],
                mid_attention: MakeAttention | None) -> tuple[nn.ModuleList, MidBlock | None, nn.ModuleList]:
    """A UNet's down blocks, mid block (None if cfg.mid_block_type is null) and up blocks.

    attention(level) builds the attention after a ResnetBlock of an "Attn" or "CrossAttn" block at that level;
    mid_attention() builds the mid block's (None: the mid block has no attention).
    """
    channels, n = cfg.block_out_channels, len(cfg.block_out_channels)
    resnet = partial(ResnetBlock, temb_channels=temb_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                     dropout=cfg.dropout, act=cfg.act_fn)

    def attention_at(kind: str, level: int) -> MakeAttention | None:
        return partial(attention, level) if "Attn" in kind else None  # AttnDownBlock2D, CrossAttnUpBlock2D, ...

    down_blocks = nn.ModuleList(
        DownBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block, resnet, attention_at(kind, i),
                  add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding)
        for i, kind in enumerate(cfg.down_block_types)
    )
    mid_resnet = partial(resnet, output_scale_factor=cfg.mid_block_scale_factor)
    mid_block = MidBlock(channels[-1], mid_resnet, mid_attention) if cfg.mid_block_type else None
    # The up path mirrors the down path: up block i works at level n-1-i, from the widest level back to 0.
    up_blocks = nn.ModuleList(
        UpBlock(channels[max(level - 1, 0)], channels[min(level + 1, n - 1)], channels[level],
                cfg.layers_per_block + 1, resnet, attention_at(kind, level), add_upsample=level > 0)
        for level, kind in zip(range(n - 1, -1, -1), cfg.up_block_types, strict=True)
    )
    return down_blocks, mid_block, up_blocks


class UNetSkeleton(nn.Module):
    """A UNet's blocks (from unet_blocks) and the loop that runs them around the skip stack."""

    down_blocks: nn.ModuleList
    mid_block: MidBlock | None
    up_blocks: nn.ModuleList

    def down_mid_up(self, h: torch.Tensor, emb: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        """h (B, C0, H, W) from conv_in, emb (B, temb), context for the attentions -> (B, C0, H, W)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, *context)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb, *context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: 2x when H, W are multiples of 2**(levels-1) (then identical to
            # diffusers' scale_factor=2), else it realigns odd sizes (diffusers' forward_upsample_size).
            h = block(h, block_skips, emb, *context, upsample_size=skips[-1].shape[-2:] if skips else None)
        return h
