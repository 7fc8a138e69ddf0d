"""Stable Diffusion from nothing: the two training stages of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), the modes `vae` and `text-to-image` of train.py.

    vae             stage 1, perceptual compression (sec. 3.1): an AutoencoderKL learns to encode images to a
                    small latent grid and back; loss = ||x - D(z)||^2 + kl_weight * KL(q(z|x) || N(0, I)) with
                    z ~ q(z|x), per pixel. LDM adds a perceptual and an adversarial loss for photographs; flat
                    shapes do not need them. LDM's kl_weight, 1e-6, barely constrains the latents' scale, so at
                    the end scaling_factor = 1 / std(z) over the data (LDM sec. 4.3.2: the latents are rescaled to unit
                    standard deviation, estimated on a batch of data): that is how SD's 0.18215 was found.
    text-to-image   stage 2 (sec. 3.3, eq. 3): with that VAE frozen, a UNet2DConditionModel and a CLIP-architecture
                    text encoder learn together, both from scratch, through the denoising loss on
                    z_0 = scaling_factor * z. A caption is replaced by "" with probability caption_dropout, so the
                    same model also learns the unconditional prediction that classifier-free guidance needs (Ho &
                    Salimans 2022, sec. 3.2).

The data is shapes.py's captioned shapes. The result is a Stable Diffusion model folder like a converted SD 1.5:
the same classes, the real CLIP tokenizer, SD's noise schedule; only the sizes (TINY_*) differ. weights/tiny-sd
is this recipe's output (weights/README.md has the commands).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.config import to_json_dict
from minidiff.images import make_grid, to_pil
from minidiff.loading.model_folder import load_vae, save_model_folder, save_stable_diffusion
from minidiff.models.clip import CLIPTextConfig, CLIPTextModel
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.pipelines.stable_diffusion import StableDiffusion
from minidiff.training.loop import Task
from minidiff.training.personalize import LatentDenoisingLoss, SDModel, sampler
from minidiff.training.shapes import CaptionedShapes, caption_scene, shape_scenes

# weights/tiny-sd's sizes. 64x64 images -> 16x16x4 latents (two downsamplings); the text encoder keeps CLIP's
# vocabulary (49,408 rows: most of its parameters) at width 64.
TINY_VAE = dict(block_out_channels=[16, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=64)
TINY_TEXT_ENCODER = dict(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=77)
TINY_UNET = dict(sample_size=16, block_out_channels=[64, 96, 128], layers_per_block=1, cross_attention_dim=64,
                 attention_head_dim=4, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
# SD 1.x's noise schedule (its scheduler_config.json), sampled with DDIM by default
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
# Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), sec. 3: SD's schedule still
# shows the image at t = T (alpha_bar_T = 0.0047: on a 16x16 latent its mean, the background and layout, survives),
# so training never needs the text for those. Fix: rescale the betas to alpha_bar_T = 0 (pure noise), predict v
# (epsilon says nothing at SNR 0), and start sampling at t = T ("trailing" steps). train.py --zero-terminal-snr.
ZERO_SNR_SCHEDULER = {**SD_SCHEDULER, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                      "timestep_spacing": "trailing"}
SCALE_IMAGES = 512  # images encoded to measure std(z) for the scaling factor


# ---- stage 1: the autoencoder ------------------------------------------------------------------------------------

class VAELoss(nn.Module):
    """forward(batch, generators) -> mean squared reconstruction error + kl_weight * KL, both per image pixel."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        x = batch["images"]  # (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generators)).sample  # z ~ q(z|x): the reparameterisation
        kl = posterior.kl().mean() / x[0].numel()  # (B,) sums -> per image pixel, like the reconstruction term
        return F.mse_loss(reconstruction.float(), x.float()) + self.kl_weight * kl


class ImagesOf:
    """A captioned dataset without its captions, {"images": (3, H, W)}: what the autoencoder learns from."""

    def __init__(self, dataset: CaptionedShapes) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"images": self.dataset.example(index, generator)["images"]}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, dataset: CaptionedShapes, seed: int) -> float:
    """1 / std of z ~ q(z|x) over SCALE_IMAGES training images (LDM sec. 4.3.2): the diffusion model then sees
    latents of unit variance, as its noise schedule assumes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.stack([dataset.example(i % len(dataset), generator)["images"] for i in range(SCALE_IMAGES)])
    latents = torch.cat([vae.encode(chunk).latent_dist.sample(generator) for chunk in images.split(64)])
    return 1.0 / latents.float().std().item()


def vae_task(dataset: CaptionedShapes, kl_weight: float = 1e-6, seed: int = 0, num_sample_images: int = 8) -> Task:
    """Stage 1 as a Task for loop.py's trainer: a new TINY_VAE, trained on `dataset`'s images. The model folder
    ("kind": "vae") holds the VAE with its measured scaling_factor; its sample grids show each image above its
    reconstruction."""
    config = AutoencoderKLConfig.from_dict({**TINY_VAE, "sample_size": dataset.resolution})
    torch.manual_seed(seed)
    vae = AutoencoderKL(config)

    def save_model(path: Path, weights: str) -> None:
        vae.eval()
        vae.config.scaling_factor = latent_scaling_factor(vae, dataset, seed)
        source = f"minidiff train.py vae: trained from scratch on {dataset.source}; {weights}"
        save_model_folder(path, {"kind": "vae", "source": source,
                                 "vae": {"class": "AutoencoderKL", "config": to_json_dict(vae.config)}},
                          {"vae": vae.state_dict()})
        vae.train()

    @torch.no_grad()
    def sample_grid(generator: torch.Generator):
        images = torch.stack([dataset.example(i, generator)["images"] for i in range(num_sample_images)])
        reconstructions = vae(images).clamp(-1, 1)  # through the mean latent
        return make_grid(to_pil(torch.cat([images, reconstructions])), columns=num_sample_images)

    fingerprint = {"mode": "vae", "vae": to_json_dict(config), "data": dataset.source, "kl_weight": kl_weight}
    return Task(VAELoss(vae, kl_weight), ImagesOf(dataset), save_model, sample_grid, fingerprint)


# ---- stage 2: the text-conditioned UNet and the text encoder -----------------------------------------------------

class CaptionedExamples:
    """The dataset's examples with their captions as CLIP token ids, each caption dropped to "" with probability
    caption_dropout (drawn from the example's generator): {"images": (3, H, W), "input_ids": (77,)}."""

    def __init__(self, dataset: CaptionedShapes, tokenizer: CLIPTokenizer, caption_dropout: float) -> None:
        self.dataset, self.tokenizer, self.caption_dropout = dataset, tokenizer, caption_dropout

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        example = self.dataset.example(index, generator)
        dropped = torch.rand(1, generator=generator).item() < self.caption_dropout
        caption = "" if dropped else example["caption"]
        input_ids = self.tokenizer(caption, padding="max_length", truncation=True, return_tensors="pt")["input_ids"][0]
        return {"images": example["images"], "input_ids": input_ids}


def new_text_to_image_model(vae: AutoencoderKL, seed: int, scheduler_config: dict = SD_SCHEDULER) -> SDModel:
    """A Stable Diffusion whose UNet and text encoder are freshly initialised (seeded) and whose VAE is `vae`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(UNet2DConditionConfig(**TINY_UNET))
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    vae.requires_grad_(False).eval()
    sd = StableDiffusion(vae=vae, text_encoder=text_encoder.train(), tokenizer=CLIPTokenizer(), unet=unet.train(),
                         scheduler=None)
    return SDModel(sd, scheduler_config, "trained from scratch")


def text_to_image_task(vae_path: str | Path, dataset: CaptionedShapes, caption_dropout: float = 0.1, seed: int = 0,
                       num_sample_images: int = 8, sample_steps: int = 20, guidance_scale: float = 5.0,
                       zero_terminal_snr: bool = False) -> Task:
    """Stage 2 as a Task: TINY_UNET and TINY_TEXT_ENCODER from scratch over the frozen VAE of `vae_path` (a
    train.py vae model folder), with SD's noise schedule or ZERO_SNR_SCHEDULER. Sample grids draw the canonical
    captions of held-out scenes."""
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
    vae = load_vae(vae_path, dtype=torch.float32)
    if vae.config.sample_size != dataset.resolution:
        raise ValueError(f"the VAE was trained at {vae.config.sample_size} px: use --resolution "
                         f"{vae.config.sample_size}")
    scheduler_config = ZERO_SNR_SCHEDULER if zero_terminal_snr else SD_SCHEDULER
    model = new_text_to_image_model(vae, seed, scheduler_config)
    sd = model.sd
    sd.unet.config.sample_size = dataset.resolution // sd.vae_scale_factor  # what the pipeline draws by default
    examples = CaptionedExamples(dataset, sd.tokenizer, caption_dropout)
    objective = LatentDenoisingLoss(model)
    draw = sampler(model)
    prompts = [caption_scene(scene) for scene in shape_scenes("heldout")[:num_sample_images]]

    def save_model(path: Path, weights: str) -> None:
        source = (f"minidiff train.py text-to-image: UNet and text encoder trained from scratch on {dataset.source} "
                  f"(caption dropout {caption_dropout}) over the VAE of {Path(vae_path).resolve()}; {weights}")
        save_stable_diffusion(path, sd, source=source, scheduler_config=scheduler_config, dtype=torch.float16)

    def sample_grid(generator: torch.Generator):
        images = draw(prompts, num_inference_steps=sample_steps, guidance_scale=guidance_scale,
                      generator=generator).images
        return make_grid(images, columns=min(4, len(images)))

    fingerprint = {"mode": "text-to-image", "vae": str(Path(vae_path).resolve()), "unet": TINY_UNET,
                   "text_encoder": TINY_TEXT_ENCODER, "scheduler": scheduler_config, "data": dataset.source,
                   "caption_dropout": caption_dropout}
    return Task(objective, examples, save_model, sample_grid, fingerprint)

