"""The spatial transformer of Stable Diffusion: how the UNet reads the text.

    x (B, C, H, W) -> GroupNorm -> proj_in -> tokens (B, H*W, inner)
        -> [BasicTransformerBlock] x depth: self-attention, cross-attention to the text, GEGLU feed-forward
        -> proj_out -> (B, C, H, W) + x

Every pixel of the feature map is a token. Self-attention lets pixels look at each other; cross-attention
lets them look at the text encoder's tokens (the "context", (B, L, context_dim) with any L: 77, 154, ...),
which is how a prompt steers the denoiser (Rombach et al. 2022, sec. 3.3).

References:
- Vaswani et al. 2017, "Attention Is All You Need": scaled dot-product attention (eq. 1), pre-norm blocks.
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3 and
  appendix: the SpatialTransformer of ldm/modules/attention.py.
- Shazeer 2020, "GLU Variants Improve Transformer": the GEGLU feed-forward.
- diffusers 0.42 (the parity reference): models/transformers/transformer_2d.py (Transformer2DModel),
  models/attention.py (BasicTransformerBlock, FeedForward), models/activations.py (GEGLU),
  models/attention_processor.py (Attention + AttnProcessor2_0).

Module names equal diffusers' (and LDM's) names, so their state dicts load by identity.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.attention import multi_head_attention


class CrossAttention(nn.Module):
    """Multi-head attention whose keys and values may come from a separate context.

    x (B, N, dim) gives the queries; context (B, L, context_dim) gives keys and values (context=None: x
    itself, i.e. self-attention). q/k/v have no bias, the output projection has one (as in LDM).

    upcast_attention (SD 2.1-768) is not a parameter here: diffusers' default processor (AttnProcessor2_0)
    ignores it too, because F.scaled_dot_product_attention already computes the softmax of half-precision
    inputs in float32 on CPU and GPU. The flag only mattered for diffusers' older explicit baddbmm path.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # A list so the keys read to_out.0.* as in LDM and diffusers (whose index 1 is a weightless Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) or None -> (B, N, dim)."""
        context = x if context is None else context
        h = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)  # (B, N, inner)
        return self.to_out[0](h)


class GEGLU(nn.Module):
    """One Linear to twice the width, split in half: value * GELU(gate) (Shazeer 2020, eq. 6; exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 * dim, then back to dim: (B, N, dim) -> (B, N, dim).

    net = [GEGLU, Dropout, Linear] as in LDM's nn.Sequential, so the weights are net.0.proj and net.2; SD
    never sets the dropout (p = 0), the index is kept for the checkpoint's key names.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block over pixel tokens: each sub-layer is x + f(LayerNorm(x)).

    attn1: self-attention among the pixels; attn2: cross-attention from the pixels to the text context;
    ff: GEGLU feed-forward. LayerNorm eps is 1e-5 (PyTorch's default, as in diffusers and LDM).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, added to the input.

    SD 1.x projects in and out with 1x1 convs on the (B, C, H, W) map; SD 2.x (use_linear_projection) with
    Linear layers on the (B, H*W, C) tokens. The two are the same map, stored as [C, C, 1, 1] vs [C, C].
    GroupNorm eps is 1e-6 (fixed in diffusers, as in LDM's Normalize). The blocks work at width
    heads * head_dim, which equals the channels whenever the head count divides them (all SD models).
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, *, depth: int = 1,
                 groups: int = 32, use_linear_projection: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, context_dim) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C): one token per pixel; the conv projects before, the Linear after
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        else:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])
        for block in self.transformer_blocks:
            h = block(h, context)
        # (B, H*W, inner) -> (B, C, H, W), mirroring the projection above
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        else:
            h = self.proj_out(h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous())
        return h + x
