"""Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"):
text-to-image, image-to-image and inpainting, with classifier-free guidance and negative prompts.

Unit 3 of the course, in five moves:
1. text -> embeddings: CLIP's tokenizer and text transformer turn the prompt (and the negative prompt, or "")
   into (77, D) embeddings the UNet cross-attends to;
2. images <-> latents: the VAE encoder maps a 3x512x512 image to 4x64x64 latents (x scaling_factor), and the
   decoder maps latents back;
3. the denoising loop, in latent space: at each t the UNet runs on [x_t, x_t] with [negative, positive]
   embeddings, and classifier-free guidance (Ho & Salimans 2022, eq. 6) extrapolates
   eps = eps_uncond + g (eps_text - eps_uncond) before the scheduler step;
4. the three modes differ only in where the loop starts, one function each, returning the Run that denoise
   takes: pure noise (txt2img), the image's latents noised to the strength's timestep (img2img), or noise with
   a mask and the masked image as extra UNet input channels (inpainting UNet), or blended back after every
   step (any UNet, as the course does) (inpaint);
5. sd(prompt, ...) picks the mode from diffusers' argument names (image, mask_image), runs the loop, decodes,
   and returns `.images`. Under diffusers' names: StableDiffusionPipeline is this class; the img2img and
   inpainting pipelines are the same class asking for image (and mask_image).

Every random draw happens in the same order, shape and generator as in diffusers 0.42's StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline, so a seed gives the same image
(tests/test_stable_diffusion.py).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from minidiff.logging import MinidiffWarning
from minidiff.noise import Generator, randn_tensor
from minidiff.pipelines.base import DiffusionPipeline, StableDiffusionPipelineOutput, postprocess
from minidiff.pipelines.guidance import LossGuidance, classifier_free_guidance
from minidiff.schedulers import Scheduler

Prompt = str | list[str]
ImageInput = Image.Image | torch.Tensor  # a PIL image, or a (B, C, H, W) tensor (see preprocess_image)


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2024, sec. 3.4 (eq. 15-16): rescale the guided prediction to the text prediction's standard
    deviation (per sample, unbiased std as diffusers computes it), blended by `guidance_rescale`."""
    dims = list(range(1, noise_text.ndim))
    rescaled = noise_cfg * (noise_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def preprocess_image(image: ImageInput, height: int | None = None, width: int | None = None,
                     mask: bool = False, multiple: int = 8) -> torch.Tensor:
    """A PIL image -> (1, C, H, W) float32, as diffusers' VaeImageProcessor does: size floored to a multiple of
    `multiple` (the VAE's scale factor, 8 in SD) or the given height/width, LANCZOS resize, [0, 1] -> [-1, 1]. For a
    mask: greyscale, kept in [0, 1] and binarised at 0.5. A tensor is taken as it is ((B, 3, H, W) in [-1, 1], or a
    (B, 1, H, W) mask in [0, 1])."""
    if isinstance(image, torch.Tensor):
        return image if image.ndim == 4 else image[None]
    width = width or image.width - image.width % multiple
    height = height or image.height - image.height % multiple
    image = image.resize((width, height), resample=Image.LANCZOS).convert("L" if mask else "RGB")
    array = np.array(image).astype(np.float32) / 255.0
    array = array[:, :, None] if mask else array
    # (H, W, C) -> (1, H, W, C) -> (1, C, H, W), a channels-last view with diffusers' strides: convolutions pick
    # their kernel by the memory layout, so another layout of the same values moves the VAE's output by ~1e-6
    tensor = torch.from_numpy(array[None].transpose(0, 3, 1, 2))
    return (tensor >= 0.5).float() if mask else 2.0 * tensor - 1.0


def check_size(height: int | None, width: int | None) -> tuple[int | None, int | None]:
    """diffusers' rule: a height or width that is given must be a multiple of 8."""
    if (height and height % 8) or (width and width % 8):
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    return height, width


@dataclass
class Run:
    """Everything a prepared sampling run carries into the denoising loop; a mode (txt2img, ...) fills it in."""

    embeddings: torch.Tensor  # (2B, L, D) [negative; positive] with CFG, else (B, L, D)
    timesteps: torch.Tensor  # the timesteps this run visits
    guidance_scale: float
    do_cfg: bool
    batch_size: int  # B, the images drawn: prompts x num_images_per_prompt
    latents: torch.Tensor | None = None  # where the loop starts: x_T, or the noised image latents
    mask: torch.Tensor | None = None  # inpainting: (B, 1, h, w) latent-size mask, 1 = repaint
    extra_channels: torch.Tensor | None = None  # inpainting UNet (9 channels): [mask, masked image latents]
    image_latents: torch.Tensor | None = None  # blended inpainting (4-channel UNets)
    noise: torch.Tensor | None = None  # blended inpainting: the noise used to re-noise image_latents


class StableDiffusion(DiffusionPipeline):
    """A loaded Stable Diffusion model. Call it with diffusers' argument names:
    `sd(prompt, negative_prompt=..., num_inference_steps=50, guidance_scale=7.5, generator=..., image=...,
    strength=..., mask_image=...).images` -> PIL images. Or step through one mode, under torch.no_grad():
    `run = sd.img2img(prompt, image, 0.6)`, `for latents in sd.denoise(run): ...`, `sd.decode(latents)`.

    Built from diffusers' components, in diffusers' order, so `StableDiffusionImg2ImgPipeline(**pipe.components)`
    works; minidiff has no safety checker (safety_checker and feature_extractor are None)."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    kind = "stable-diffusion"

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer, unet: nn.Module, scheduler: Scheduler,
                 safety_checker: None = None, feature_extractor: None = None, requires_safety_checker: bool = False):
        if safety_checker is not None or requires_safety_checker:
            raise ValueError("minidiff has no NSFW safety checker: pass safety_checker=None")
        self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler = (
            vae, text_encoder, tokenizer, unet, scheduler)
        self.safety_checker = self.feature_extractor = None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD

    # 1. Text -> embeddings --------------------------------------------------------------------------------------

    def embed_texts(self, texts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """(B, 77, D) text embeddings; with clip_skip = k, the final layer norm of the k-th layer from the end."""
        max_length = self.tokenizer.model_max_length
        for text in texts:
            if len(self.tokenizer.encode(text)) + 2 > max_length:
                warnings.warn(f"prompt truncated to CLIP's {max_length} tokens: {text[:60]!r}...", MinidiffWarning,
                              stacklevel=3)
        ids = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt")["input_ids"]
        device = next(self.text_encoder.parameters()).device
        if clip_skip is None:
            return self.text_encoder(ids.to(device)).last_hidden_state
        out = self.text_encoder(ids.to(device), output_hidden_states=True)
        return self.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def encode_prompt(self, prompt: Prompt, device: torch.device | str | None = None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt: Prompt | None = None,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' encode_prompt: (prompt embeddings, negative prompt embeddings or None without CFG), each
        (B * num_images_per_prompt, 77, D), every prompt repeated in place (interleaved as diffusers does). A
        prompt or negative prompt is a string or a list of them; no negative prompt means "". clip_skip applies to
        the prompt only, as in diffusers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        dtype = next(self.text_encoder.parameters()).dtype

        def repeat(embeds: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B * n, L, D), each prompt n times
            B, L, D = embeds.shape
            embeds = embeds.to(device=device, dtype=dtype)
            return embeds.repeat(1, num_images_per_prompt, 1).view(B * num_images_per_prompt, L, D)

        positive = repeat(self.embed_texts(prompts, clip_skip))
        if not do_classifier_free_guidance:
            return positive, None
        return positive, repeat(self.embed_texts(negatives or [""] * len(prompts)))

    def _encode_prompt(self, prompt: Prompt, device: torch.device | str | None, num_images_per_prompt: int,
                       do_classifier_free_guidance: bool, negative_prompt: Prompt | None = None) -> torch.Tensor:
        """The older diffusers method the course's Unit 3 calls: encode_prompt's two halves in one batch,
        [negative; positive] with CFG (the order the denoising loop feeds the UNet)."""
        positive, negative = self.encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                                negative_prompt)
        return positive if negative is None else torch.cat([negative, positive])

    # 2. Images <-> latents --------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, generator: Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents sampled from the VAE posterior, times scaling_factor.
        With a list of generators each image uses its own (diffusers' order)."""
        if isinstance(generator, list):
            posteriors = [self.vae.encode(images[i : i + 1]).latent_dist for i in range(len(images))]
            # image i draws from generator i; one image with several generators uses the first, as diffusers does
            latents = torch.cat([q.sample(g) for q, g in zip(posteriors, generator, strict=False)])
        else:
            latents = self.vae.encode(images).latent_dist.sample(generator)
        return self.vae.config.scaling_factor * latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) images in [-1, 1] (unclamped)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """The older diffusers method the course's Unit 3 calls: latents -> (B, H, W, 3) floats in [0, 1]; then
        pipe.numpy_to_pil(images). It multiplies by 1 / scaling_factor as diffusers' old method did (decode
        divides, as its pipelines now do: the two differ in the last bit)."""
        return postprocess(self.vae.decode(1 / self.vae.config.scaling_factor * latents).sample, "np")

    # 3. The denoising loop ----------------------------------------------------------------------------------------

    def denoise(self, run: Run, guidance_rescale: float = 0.0, eta: float = 0.0, generator: Generator = None,
                guidance: LossGuidance | None = None) -> Iterator[torch.Tensor]:
        """Yield the latents after every scheduler step. `guidance`: loss guidance on the decoded x_0 (the Deep
        Dive's blue loss), from the guided noise prediction when CFG is on (pipelines/guidance.py)."""
        scheduler, latents = self.scheduler, run.latents
        ddim_eta = {"eta": eta} if eta else {}  # DDIM's knob: passed only when set (0 is DDIM's default)
        for i, t in enumerate(run.timesteps):
            guide = guidance is not None and guidance.applies_at(i)
            with torch.set_grad_enabled(guide and guidance.through_unet):
                if guide and guidance.through_unet:
                    latents = latents.detach().requires_grad_()
                model_input = torch.cat([latents] * 2) if run.do_cfg else latents  # one batch: [uncond, cond]
                model_input = scheduler.scale_model_input(model_input, t)
                if run.extra_channels is not None:  # inpainting UNet: 4 + 1 + 4 input channels
                    model_input = torch.cat([model_input, run.extra_channels], dim=1)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=run.embeddings).sample
                if run.do_cfg:  # classifier-free guidance
                    noise_pred, noise_text = classifier_free_guidance(noise_pred, run.guidance_scale)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale)
            if guide:  # move the latents down the gradient of the loss on the decoded x_0, then step from there
                latents = guidance.nudge(latents, noise_pred, t, scheduler, decode=self.decode)
            latents = scheduler.step(noise_pred.detach(), t, latents.detach(), generator=generator,
                                     **ddim_eta).prev_sample
            if run.image_latents is not None:  # blended inpainting: keep the known region at the next noise level
                known = run.image_latents
                if i < len(run.timesteps) - 1:
                    known = scheduler.add_noise(known, run.noise, torch.tensor([run.timesteps[i + 1]]))
                latents = (1 - run.mask) * known + run.mask * latents
            yield latents

    # 4. The three modes: where the loop starts ----------------------------------------------------------------

    def txt2img(self, prompt: Prompt, negative_prompt: Prompt | None = None, height: int | None = None,
                width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                num_images_per_prompt: int = 1, generator: Generator = None, latents: torch.Tensor | None = None,
                clip_skip: int | None = None) -> Run:
        """Text to image: the loop runs every step, from pure noise x_T ~ N(0, I) (or the given `latents`)."""
        height, width = self.default_size(height, width)
        run = self.start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         generator, clip_skip)
        device, dtype = run.embeddings.device, run.embeddings.dtype
        if latents is None:
            latents = randn_tensor(self.latent_shape(run, height, width), generator, device=device, dtype=dtype)
        run.latents = latents.to(device) * self.scheduler.init_noise_sigma
        return run

    def img2img(self, prompt: Prompt, image: ImageInput, strength: float = 0.8, negative_prompt: Prompt | None = None,
                height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, num_images_per_prompt: int = 1, generator: Generator = None,
                clip_skip: int | None = None) -> Run:
        """Image to image (SDEdit, Meng et al. 2022): the image's latents, noised to the timestep `strength` of the
        way up, and the last `strength` of the steps from there. The size is the image's (floored to a multiple of
        vae_scale_factor, as in diffusers) unless height and width are given."""
        init_image = preprocess_image(image, *check_size(height, width), multiple=self.vae_scale_factor)
        run = self.start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         generator, clip_skip)
        run.timesteps = self.strength_timesteps(strength, num_inference_steps)
        batch, device, dtype = run.batch_size, run.embeddings.device, run.embeddings.dtype
        if isinstance(generator, list):  # one copy of the image per generator, as diffusers does
            init_image = torch.cat([init_image] * (batch // len(init_image)))
        image_latents = self.encode_images(init_image.to(device, dtype), generator)  # RNG: posterior first
        image_latents = torch.cat([image_latents] * (batch // len(image_latents)))  # cat keeps the memory layout
        noise = randn_tensor(image_latents.shape, generator, device=device, dtype=dtype)  # then the noise
        run.latents = self.scheduler.add_noise(image_latents, noise, run.timesteps[:1].repeat(batch))
        return run

    def inpaint(self, prompt: Prompt, image: ImageInput, mask_image: ImageInput, strength: float = 1.0,
                negative_prompt: Prompt | None = None, height: int | None = None, width: int | None = None,
                num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                generator: Generator = None, latents: torch.Tensor | None = None, clip_skip: int | None = None) -> Run:
        """Inpainting: repaint where `mask_image` is white. The loop starts from noise (or, with strength < 1, from
        the image's latents noised part-way); an inpainting UNet (9 input channels) also sees the mask and the
        masked image's latents at every step, any other (4 channels) gets the known region put back after each."""
        in_channels = self.unet.config.in_channels
        if in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, not {in_channels}")
        height, width = self.default_size(height, width)
        run = self.start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         generator, clip_skip)
        run.timesteps = self.strength_timesteps(strength, num_inference_steps)
        batch, device, dtype = run.batch_size, run.embeddings.device, run.embeddings.dtype
        shape = self.latent_shape(run, height, width)
        init_image = preprocess_image(image, height, width).to(device, dtype)
        blended = in_channels == 4  # a normal UNet: blend the known region back every step
        if blended or (latents is None and strength < 1.0):  # RNG: the image posterior before the noise
            image_latents = self.encode_images(init_image, generator)
            image_latents = image_latents.repeat(batch // len(image_latents), 1, 1, 1)
        noise = randn_tensor(shape, generator, device=device, dtype=dtype) if latents is None else latents.to(device)
        if latents is not None or strength == 1.0:  # given latents replace the noise, and nothing is drawn
            run.latents = noise * self.scheduler.init_noise_sigma
        else:
            run.latents = self.scheduler.add_noise(image_latents, noise, run.timesteps[:1].repeat(batch))

        mask = preprocess_image(mask_image, height, width, mask=True)
        masked_image = init_image * (mask.to(device, dtype) < 0.5)  # the region to keep, the rest grey
        mask = nn.functional.interpolate(mask, size=shape[-2:]).to(device, dtype)  # nearest, to latent size
        run.mask = mask.repeat(batch // len(mask), 1, 1, 1)
        # RNG: the masked image's posterior after the noise. diffusers samples it for 4-channel UNets too, unused;
        # so does minidiff, so that the draws after it (DDPM, DDIM with eta > 0) are the same
        masked_latents = self.encode_images(masked_image, generator)
        if blended:
            run.image_latents, run.noise = image_latents, noise
        else:  # the UNet's 5 extra input channels, doubled for CFG as the latents are
            extra = torch.cat([run.mask, masked_latents.repeat(batch // len(masked_latents), 1, 1, 1)], dim=1)
            run.extra_channels = torch.cat([extra] * 2) if run.do_cfg else extra
        return run

    # What the modes share: the prompts and timesteps, the sizes, the steps that strength keeps

    def start(self, prompt: Prompt, negative_prompt: Prompt | None, num_inference_steps: int, guidance_scale: float,
              num_images_per_prompt: int, generator: Generator, clip_skip: int | None) -> Run:
        """A Run with the prompts' embeddings (with CFG, g > 1, the negative prompts' too) and every timestep."""
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one per image")
        do_cfg = guidance_scale > 1.0  # at g = 1 the negative pass would not change anything
        positive, negative = self.encode_prompt(prompt, None, num_images_per_prompt, do_cfg, negative_prompt,
                                                clip_skip)
        embeddings = positive if negative is None else torch.cat([negative, positive])  # one batch: [uncond; cond]
        self.scheduler.set_timesteps(num_inference_steps)
        return Run(embeddings, self.scheduler.timesteps, guidance_scale, do_cfg, batch)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The size to draw at: the UNet's sample size in pixels, where height or width is not given."""
        default = self.unet.config.sample_size * self.vae_scale_factor
        return check_size(height or default, width or default)

    def latent_shape(self, run: Run, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (run.batch_size, self.vae.config.latent_channels, height // f, width // f)

    def strength_timesteps(self, strength: float, num_inference_steps: int) -> torch.Tensor:
        """img2img and inpainting skip the first (1 - strength) of the steps (times the scheduler's order: PNDM
        evaluates its first step twice)."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        t_start = num_inference_steps - int(num_inference_steps * strength)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run")
        return timesteps

    # 5. Generating: the mode diffusers' argument names ask for ------------------------------------------------

    def prepare(self, prompt: Prompt, negative_prompt: Prompt | None = None, height: int | None = None,
                width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                num_images_per_prompt: int = 1, generator: Generator = None, latents: torch.Tensor | None = None,
                image: ImageInput | None = None, mask_image: ImageInput | None = None,
                strength: float | None = None, clip_skip: int | None = None) -> Run:
        """The Run of the mode that diffusers' arguments name: image and mask_image -> inpaint (strength default
        1.0), image -> img2img (default 0.8), neither -> txt2img. Arguments of another mode are a ValueError."""
        common = dict(negative_prompt=negative_prompt, height=height, width=width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      num_images_per_prompt=num_images_per_prompt, generator=generator, clip_skip=clip_skip)
        if strength is not None:  # else the mode's own default
            common["strength"] = strength
        if mask_image is not None:
            if image is None:
                raise ValueError("inpainting needs the image as well as mask_image")
            return self.inpaint(prompt, image, mask_image, latents=latents, **common)
        if image is not None:
            if latents is not None:
                raise ValueError("img2img starts from the image's latents: pass image or latents, not both")
            return self.img2img(prompt, image, **common)
        if strength is not None:
            raise ValueError("strength is how much of an image to repaint: pass image (img2img) or image and "
                             "mask_image (inpainting)")
        return self.txt2img(prompt, latents=latents, **common)

    @torch.no_grad()
    def __call__(self, prompt: Prompt, negative_prompt: Prompt | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generator = None,
                 latents: torch.Tensor | None = None, image=None, mask_image=None, strength: float | None = None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> StableDiffusionPipelineOutput | tuple:
        """Generate images in the mode the arguments name (see prepare) -> `.images`: output_type "pil" (PIL
        images), "np" ((B, H, W, 3) floats in [0, 1]), "pt" ((B, 3, H, W) in [0, 1]) or "latent" (the final
        latents); return_dict=False: the tuple (images, None)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        run = self.prepare(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                           num_images_per_prompt, generator, latents, image, mask_image, strength, clip_skip)
        latents = run.latents
        for step_latents in self.progress_bar(self.denoise(run, guidance_rescale, eta, generator),
                                              total=len(run.timesteps)):
            latents = step_latents
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return StableDiffusionPipelineOutput(images) if return_dict else (images, None)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a minidiff model folder (which must not exist yet) that from_pretrained reads back."""
        from minidiff.loading.model_folder import save_stable_diffusion

        save_stable_diffusion(save_directory, self)

    def load_textual_inversion(self, pretrained_model_name_or_path: str | os.PathLike | dict,
                               token: str | None = None) -> list[str]:
        """diffusers' load_textual_inversion: a learned_embeds.bin / .safetensors (diffusers' textual inversion),
        an A1111 embedding file, or its dict, read weights-only (no pickled code runs); the word(s) join the
        tokenizer and the text encoder. Returns the tokens added (a multi-vector concept adds token, token_1, ...)."""
        from minidiff.loading.textual_inversion import load_textual_inversion_into

        return load_textual_inversion_into(self, pretrained_model_name_or_path, token)


StableDiffusionPipeline = StableDiffusion  # diffusers' name for it


class StableDiffusionImg2ImgPipeline(StableDiffusion):
    """diffusers' img2img pipeline: StableDiffusion called with an image (strength 0.8 by default)."""

    def __call__(self, prompt: Prompt, image: ImageInput, strength: float = 0.8, **kwargs):
        return super().__call__(prompt, image=image, strength=strength, **kwargs)


class StableDiffusionInpaintPipeline(StableDiffusion):
    """diffusers' inpainting pipeline: StableDiffusion called with an image and the mask of what to repaint."""

    def __call__(self, prompt: Prompt, image: ImageInput, mask_image: ImageInput, strength: float = 1.0, **kwargs):
        return super().__call__(prompt, image=image, mask_image=mask_image, strength=strength, **kwargs)
