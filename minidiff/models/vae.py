"""The KL autoencoder of latent diffusion: images <-> latents 8x smaller per side (AutoencoderKL, KL-f8).

    x (B, 3, H, W) -> Encoder -> quant_conv -> (mean, logvar) (B, 2*4, H/8, W/8) -> DiagonalGaussian
    z (B, 4, H/8, W/8) -> post_quant_conv -> Decoder -> (B, 3, H, W)

The encoder does not output a point but a diagonal Gaussian q(z|x) = N(mean, diag(exp(logvar))); training
samples from it with the reparameterisation z = mean + std * eps (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes", sec. 2.4) and pulls it towards N(0, I) with a small KL term. Rombach et al. 2022
("High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3 and app. G) train this "KL-f8"
autoencoder once and run the diffusion model on its latents.

The scaling factor is NOT applied here. Stable Diffusion's latents have a std of about 1/0.18215, so the
pipelines multiply encoder samples by `config.scaling_factor` before diffusion and divide by it before
`decode` (Rombach et al. 2022, sec. 4.3.2 and app. D.1): `vae.decode(latents / vae.config.scaling_factor).sample`.

Reference: diffusers 0.42 models/autoencoders/autoencoder_kl.py (AutoencoderKL), vae.py (Encoder, Decoder,
DiagonalGaussianDistribution), unets/unet_2d_blocks.py (DownEncoderBlock2D, UpDecoderBlock2D,
UNetMidBlock2D). Module names equal diffusers' names, so a diffusers state dict loads by identity
(minidiff/convert/keymaps/vae.py also reads old diffusers names and original LDM checkpoints).
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from minidiff.config import DEPTH, LEVELS, SIDE, WIDTH, config_from, from_json_dict, require, setting, validate
from minidiff.models.layers import ACTIVATIONS, Attention, Downsample, ResnetBlock, Upsample
from minidiff.models.outputs import AutoencoderKLOutput, DecoderOutput
from minidiff.models.pretrained import PretrainedModel
from minidiff.models.unet_blocks import MidBlock
from minidiff.noise import Generator, randn_tensor

EPS = 1e-6  # every GroupNorm of the VAE (hard-coded in diffusers and in LDM's Normalize)


@dataclass
class AutoencoderKLConfig:
    """Field names and defaults are those of diffusers' AutoencoderKL config.json (SD 1.x/2.x: four blocks
    of (128, 256, 512, 512), layers_per_block 2, as in shared/reference_configs)."""

    in_channels: int = setting(3, min=1, max=WIDTH)
    out_channels: int = setting(3, min=1, max=WIDTH)
    down_block_types: tuple[str, ...] = setting(("DownEncoderBlock2D",), choices=("DownEncoderBlock2D",))
    up_block_types: tuple[str, ...] = setting(("UpDecoderBlock2D",), choices=("UpDecoderBlock2D",))
    # each block but the last halves H and W
    block_out_channels: tuple[int, ...] = setting((64,), min=1, max=WIDTH, max_len=LEVELS)
    layers_per_block: int = setting(1, min=1, max=DEPTH)  # ResnetBlocks per encoder block; decoder blocks have one more
    act_fn: str = "silu"  # ResnetBlocks only; the output activation is SiLU regardless
    latent_channels: int = setting(4, min=1, max=WIDTH)
    norm_num_groups: int = setting(32, min=1, max=WIDTH)
    sample_size: int | tuple[int, int] = setting(32, min=1, max=SIDE)  # training resolution; other sizes run too
    # The next five are for the pipelines; the model itself never reads them.
    scaling_factor: float = setting(0.18215, above=0)  # latents = sample * scaling_factor (see the module docstring)
    shift_factor: float | None = None  # SD3/Flux subtract it before scaling; SD 1.x/2.x: None
    latents_mean: tuple[float, ...] | None = None  # per-channel latent statistics (playground); SD: None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # run the VAE in float32 when the pipeline runs in fp16
    use_quant_conv: bool = True  # 1x1 conv on (mean, logvar) after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # self-attention in both mid blocks

    def __post_init__(self):
        validate(self)
        need = partial(require, self)
        channels = self.block_out_channels
        need(len(self.down_block_types) == len(channels) == len(self.up_block_types),
             f"down_block_types, block_out_channels and up_block_types must have the same length, got "
             f"{len(self.down_block_types)}, {len(channels)}, {len(self.up_block_types)}")
        bad = [c for c in channels if c % self.norm_num_groups]
        need(not bad, f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        need(self.act_fn.lower() in ACTIVATIONS, f"act_fn {self.act_fn!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            need(value is None or len(value) == self.latent_channels,
                 f"{name} must be null or {self.latent_channels} numbers (one per latent channel), got {value!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        """Build from a diffusers AutoencoderKL config.json dict, as it is.

        Keys starting with "_" (_class_name, _diffusers_version, ...) are dropped; other unknown keys are
        ignored with a warning naming them; invalid values raise ValueError.
        """
        return from_json_dict(cls, d)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(var)), from the encoder's (B, 2*latent, h, w) output: mean, then logvar."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, latent, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # keeps exp() finite (LDM and diffusers alike)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation (Kingma & Welling 2014, sec. 2.4 and 3).
        The same draw as diffusers' latent_dist.sample(generator) for the same generator state."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean (what deterministic encoding uses)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,): 1/2 sum(mean^2 + var - 1 - logvar) over channels and pixels
        (Kingma & Welling 2014, eq. 10 and appendix B)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _resnets(in_channels: int, out_channels: int, num_layers: int, cfg: AutoencoderKLConfig) -> nn.ModuleList:
    """num_layers ResnetBlocks without a time input, the first from in_channels."""
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups=cfg.norm_num_groups, eps=EPS,
                    act=cfg.act_fn)
        for i in range(num_layers)
    )


class DownEncoderBlock(nn.Module):
    """num_layers ResnetBlocks (no time input), then, except in the last block, a stride-2 conv whose input is
    padded on the right and bottom only (LDM's Downsample; diffusers' downsample_padding=0)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 cfg: AutoencoderKLConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, cfg)
        # A list (empty or one) so the keys read downsamplers.0.conv.* as in diffusers.
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)] if add_downsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.downsamplers]:
            h = module(h)
        return h


class UpDecoderBlock(nn.Module):
    """num_layers ResnetBlocks (no skips: the decoder is not a UNet), then, except in the last block, nearest
    x2 upsampling and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool,
                 cfg: AutoencoderKLConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, cfg)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.upsamplers]:
            h = module(h)
        return h


def vae_mid_block(channels: int, cfg: AutoencoderKLConfig) -> MidBlock:
    """The UNet's mid block without a time input: ResnetBlock, single-head self-attention over all h*w latent
    pixels, ResnetBlock."""
    resnet = partial(ResnetBlock, groups=cfg.norm_num_groups, eps=EPS, act=cfg.act_fn)
    attention = partial(Attention, channels, None, groups=cfg.norm_num_groups, eps=EPS)
    return MidBlock(channels, resnet, attention if cfg.mid_block_add_attention else None)


class Encoder(nn.Module):
    """(B, in, H, W) -> (B, 2*latent, H/f, W/f), f = 2**(blocks-1): the mean and log-variance of q(z|x)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        channels, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block, i < n - 1, cfg)
            for i in range(n)
        )
        self.mid_block = vae_mid_block(channels[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, out, h*f, w*f): the encoder mirrored, widest blocks first."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        rev, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = vae_mid_block(rev[0], cfg)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i < n - 1, cfg) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(PretrainedModel, nn.Module):
    """diffusers' AutoencoderKL without tiling or slicing: `encode` images in [-1, 1] to a DiagonalGaussian,
    `decode` latents to images. Both work on unscaled latents: see the module docstring for scaling_factor."""

    def __init__(self, config: AutoencoderKLConfig | dict | None = None, **kwargs):
        """From a config, a config.json dict, or diffusers' keyword arguments (latent_channels=4, ...)."""
        super().__init__()
        self.config = cfg = config_from(AutoencoderKLConfig, config, kwargs)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        latent = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussian]:
        """x (B, in, H, W) in [-1, 1] -> .latent_dist, q(z|x) over (B, latent, H/f, W/f) latents, f =
        2**(blocks-1); return_dict=False: the tuple (latent_dist,)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        posterior = DiagonalGaussian(h)
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """z (B, latent, h, w), unscaled -> .sample, the image (B, out, h*f, w*f), roughly in [-1, 1] (not
        clamped); return_dict=False: the tuple (sample,)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        return DecoderOutput(image) if return_dict else (image,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct x through the mean latent, or a sampled one if sample_posterior (diffusers' order of
        arguments)."""
        posterior = self.encode(x).latent_dist
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode(), return_dict)
