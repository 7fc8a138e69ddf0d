"""UNet building blocks, shared by the pixel UNet, the text-conditional UNet and the VAE.

References:
- Vaswani et al. 2017, "Attention Is All You Need", sec. 3.5: sinusoidal position encoding.
- Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B: the timestep embedding, ResNet
  blocks with GroupNorm (from Wide ResNet), self-attention at low resolution.
- diffusers 0.42 (the parity reference): models/embeddings.py (get_timestep_embedding, TimestepEmbedding),
  models/resnet.py (ResnetBlock2D), models/attention_processor.py (Attention + AttnProcessor2_0),
  models/downsampling.py (Downsample2D), models/upsampling.py (Upsample2D).

Submodule names follow diffusers where its name is a good one (norm1, conv1, time_emb_proj, to_q, ...), so a
diffusers state dict loads by identity.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.attention import multi_head_attention

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    """The activation module for a diffusers `act_fn` name ("silu" and "swish" are the same function)."""
    if name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]()


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: float = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N,) -> (N, dim) float32.

    Vaswani et al. 2017 sec. 3.5, as used by DDPM: frequency i is max_period ** (-i / (half - shift)) for
    i = 0 .. half-1. DDPM (google/ddpm-*) uses shift 1 and [sin, cos]; Stable Diffusion and the UNet2DModel
    defaults use shift 0 and [cos, sin] (flip_sin_to_cos). Computed in float32 in diffusers' operation order:
    float64 drifts by ~1e-5 at t ~ 1000.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # odd dim: one zero column at the end


class TimestepEmbedding(nn.Module):
    """The MLP on top of the sinusoidal embedding: linear_1 -> act -> linear_2, (N, in) -> (N, dim)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = activation(act)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Pre-activation residual block, optionally conditioned on a time embedding (Ho et al. 2020, app. B).

    x -> GroupNorm -> act -> conv3x3 (+ Linear(act(temb)) per channel) -> GroupNorm -> act -> dropout ->
    conv3x3, added to x (through a 1x1 conv when the channel count changes), then divided by
    output_scale_factor. temb_channels=None builds the block without a time input (the VAE's blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        act: str = "silu",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # 1x1 conv on the shortcut only when the channel count changes
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = activation(act)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W), temb: (B, temb_channels) -> (B, C_out, H, W)."""
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, C_out) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        if self.conv_shortcut is not None:
            # training: a contiguous copy first, as diffusers makes, so the backward kernels and gradients match
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    GroupNorm, then every pixel attends to every other (H*W tokens of C channels); the output projection
    is added back to the input and divided by rescale_output_factor. head_dim=None means one head as wide
    as the channels (the google/ddpm-* models). Like diffusers, heads = channels // head_dim and the
    projections are heads * head_dim wide, which is less than channels if head_dim does not divide it.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int | None = None,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        head_dim = head_dim or channels
        self.heads = channels // head_dim
        if self.heads < 1:
            raise ValueError(f"attention head_dim {head_dim} is wider than the {channels} channels")
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        # A list so the keys read to_out.0.* as in diffusers (whose index 1 is a weightless Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, C, HW) -> (B, HW, C) tokens
        h = multi_head_attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads)  # (B, HW, inner)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return (h + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).

    padding=1 pads every side; padding=0 pads only the right and bottom by one (diffusers'
    downsample_padding=0, the google/ddpm-* models and the VAE encoder), which shifts the sampling grid.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to output_size, e.g. an odd skip size), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W), or (B, C, *output_size)."""
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)
