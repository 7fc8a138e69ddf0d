"""The text-conditional latent denoiser of Stable Diffusion: diffusers' UNet2DConditionModel, from a config.

    z (B, 4, h, w) -> conv_in -> down blocks -> mid block -> up blocks -> GroupNorm, SiLU, conv_out -> (B, 4, h, w)
    t -> sinusoidal embedding -> MLP -> emb (B, 4*C0), added per channel inside every ResnetBlock
    text (B, L, D) -> read by the cross-attention of every Transformer2D (minidiff/models/transformer.py)

The skeleton is the pixel UNet's (minidiff/models/unet_blocks.py): ResnetBlocks, a skip stack, Down/Upsample. What
is new is the Transformer2D after each ResnetBlock of the "CrossAttn" blocks (and in the mid block), where the
pixels attend to the text; the time embedding alone carries t, there is no class embedding (compare unet.py).
h and w are any latent size (height/8, width/8): the up blocks upsample to the size of the skip they meet.
Inpainting UNets take 9 input channels: the noisy latents, the mask and the masked image's latents.

Reference: diffusers 0.42 models/unets/unet_2d_condition.py and unet_2d_blocks.py (CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D); Rombach et al. 2022 (LDM), fig. 3.
Module names equal diffusers' names, so a diffusers state dict loads by identity (minidiff/convert/keymaps/sd_unet.py
also reads the original single-file checkpoints).
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from minidiff.config import DEPTH, LEVELS, SIDE, WIDTH, config_from, from_json_dict, require, setting, validate
from minidiff.models.layers import TimestepEmbedding, activation, timestep_embedding
from minidiff.models.outputs import UNet2DOutput
from minidiff.models.pretrained import PretrainedModel
from minidiff.models.transformer import Transformer2D
from minidiff.models.unet_blocks import UNetSkeleton, check_block_types, unet_blocks


@dataclass
class UNet2DConditionConfig:
    """Field names and defaults are those of diffusers' UNet2DConditionModel config.json."""

    sample_size: int | tuple[int, int] | None = setting(None, min=1, max=SIDE)  # latents (64: 512 px); others run too
    in_channels: int = setting(4, min=1, max=WIDTH)  # 9 for inpainting: latents + mask + masked-image latents
    out_channels: int = setting(4, min=1, max=WIDTH)
    center_input_sample: bool = False  # map the input x to 2x - 1 first
    flip_sin_to_cos: bool = True  # SD: [cos, sin]
    freq_shift: float = setting(0, min=0)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = setting("UNetMidBlock2DCrossAttn", choices=("UNetMidBlock2DCrossAttn", None))
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = setting((320, 640, 1280, 1280), min=1, max=WIDTH, max_len=LEVELS)
    layers_per_block: int = setting(2, min=1, max=DEPTH)  # ResnetBlocks per down block; up blocks have one more
    downsample_padding: int = setting(1, choices=(0, 1))
    mid_block_scale_factor: float = setting(1.0, above=0)  # the mid ResnetBlocks divide their output by this
    dropout: float = setting(0.0, min=0, below=1)  # in the ResnetBlocks only
    act_fn: str = "silu"  # ResnetBlocks, the time MLP and the output
    norm_num_groups: int = setting(32, min=1, max=WIDTH)
    norm_eps: float = setting(1e-5, above=0)  # ResnetBlocks and the output norm (Transformer2D's GroupNorm: 1e-6)
    cross_attention_dim: int = setting(1280, min=1, max=WIDTH)  # text token width: 768 (SD 1.x), 1024 (SD 2.x)
    # BasicTransformerBlocks per Transformer2D, an int or one per down block (SDXL: up to 10)
    transformer_layers_per_block: int | tuple[int, ...] = setting(1, min=1, max=64)
    # NAMING BUG kept from diffusers: for this model "attention_head_dim" is the number of HEADS per block,
    # an int or one per down block (SD 1.x: 8; SD 2.x: [5, 10, 20, 20], i.e. 64 channels per head).
    attention_head_dim: int | tuple[int, ...] = setting(8, min=1, max=WIDTH)
    # The correctly named field; when given it wins over attention_head_dim. diffusers 0.42 refuses it with a
    # ValueError (naming issue #2011), so no diffusers config.json sets it.
    num_attention_heads: int | tuple[int, ...] | None = setting(None, min=1, max=WIDTH)
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # accepted and ignored, as by diffusers' SDPA processor (transformer.py)
    time_embedding_dim: int | None = setting(None, min=1, max=4 * WIDTH)  # None: 4 * block_out_channels[0]

    def __post_init__(self):
        validate(self)
        check_block_types(self, ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          "minidiff has (CrossAttn)DownBlock2D and (CrossAttn)UpBlock2D")
        need, channels = partial(require, self), self.block_out_channels
        for name in ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            need(not isinstance(value, tuple) or len(value) == len(channels), f"{name} must be a positive int or a "
                 f"list of {len(channels)} (one per down block), got {value!r}")
        wide = [(c, h) for c, h in zip(channels, self.heads, strict=True) if h > c]
        need(not wide, f"more attention heads than channels (channels, heads): {wide}; for this model "
             "attention_head_dim is the number of heads")

    def per_block(self, name: str) -> tuple[int, ...]:
        """An int-or-list field as one value per down block (up blocks use it reversed, the mid block [-1])."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block: num_attention_heads if given, else attention_head_dim (see above)."""
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim")

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConditionConfig":
        """Build from a diffusers UNet2DConditionModel config.json dict, as it is.

        Keys starting with "_" are dropped; an option in UNSUPPORTED set to anything but "off" raises a
        ValueError naming it; other unknown keys are ignored with a warning naming them.
        """
        for name, off in UNSUPPORTED.items():
            value = d.get(name, off[0])
            values = value if isinstance(value, list | tuple) else [value]  # per-block lists: all must be off
            if not all(v in off for v in values):
                raise ValueError(f"UNet2DConditionConfig: {name}={value!r} is not supported (minidiff implements "
                                 f"the SD 1.x/2.x UNet, where it is {off[0]!r})")
        # UNSUPPORTED options are checked above; addition_embed_type_num_heads is read only with addition_embed_type
        return from_json_dict(cls, d, ignore={*UNSUPPORTED, "addition_embed_type_num_heads"})


# diffusers UNet2DConditionModel options that SD 1.x/2.x leave off, with the values that mean "off". A
# config.json that turns one on describes a model minidiff does not implement (SDXL, unCLIP, LCM, ...).
UNSUPPORTED = {
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}


class UNet2DConditionModel(PretrainedModel, UNetSkeleton):
    """diffusers' UNet2DConditionModel for SD 1.x/2.x: predicts noise (or v) from noisy latents, a timestep
    and the text encoder's hidden states."""

    def __init__(self, config: UNet2DConditionConfig | dict | None = None, **kwargs):
        """From a config, a config.json dict, or diffusers' keyword arguments (cross_attention_dim=768, ...)."""
        super().__init__()
        self.config = cfg = config_from(UNet2DConditionConfig, config, kwargs)
        channels, heads, depth = cfg.block_out_channels, cfg.heads, cfg.per_block("transformer_layers_per_block")
        temb_dim = cfg.time_embedding_dim or 4 * channels[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim, act=cfg.act_fn)

        # The attention of the "CrossAttn" blocks and the mid block: a Transformer2D whose cross-attention reads
        # the text, with heads[level] heads of channels // heads channels and depth[level] transformer blocks.
        def attention(level: int) -> Transformer2D:
            c, n_heads = channels[level], heads[level]
            return Transformer2D(c, n_heads, c // n_heads, cfg.cross_attention_dim, depth=depth[level],
                                 groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection)

        # The mid block's is the last level's; mid_block_scale_factor divides only the mid ResnetBlocks.
        self.down_blocks, self.mid_block, self.up_blocks = unet_blocks(
            cfg, temb_dim, attention, mid_attention=lambda: attention(len(channels) - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True) -> UNet2DOutput | tuple[torch.Tensor]:
        """sample (B, in_channels, h, w), timestep (a number, a 0-d or (B,) tensor), encoder_hidden_states
        (B, L, cross_attention_dim) -> UNet2DOutput with .sample, the prediction (B, out_channels, h, w);
        return_dict=False: the tuple (sample,)."""
        cfg = self.config
        B = sample.shape[0]
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            hint = " (inpainting: latents, mask, masked-image latents)" if cfg.in_channels == 9 else ""
            raise ValueError(f"sample has shape {tuple(sample.shape)}; this UNet takes (B, {cfg.in_channels}, h, w)"
                             + hint)
        context = encoder_hidden_states
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states has shape {tuple(context.shape)}; this UNet takes "
                             f"({B}, tokens, {cfg.cross_attention_dim}): one text encoding per sample")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # Time: fractional timesteps stay fractional (diffusers' get_time_embed: float -> float64 -> float32,
        # which rounds as float -> float32 does here); the embedding is computed in float32.
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, B):
            raise ValueError(f"got {t.numel()} timesteps for a batch of {B}; pass one or one each")
        t_emb = timestep_embedding(t.expand(B), cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype))  # (B, temb_dim)

        # The skeleton of unet_blocks.py, with the text passed to every Transformer2D.
        h = self.down_mid_up(self.conv_in(sample), emb, context)
        out = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return UNet2DOutput(out) if return_dict else (out,)
