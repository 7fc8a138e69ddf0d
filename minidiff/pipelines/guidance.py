"""Guidance: steer a diffusion model at sampling time, by a differentiable loss on x_0 or by its own conditioning.

Classifier-free guidance (Ho & Salimans 2022) is one line, shared by every pipeline (classifier_free_guidance):
the model runs on a batch of 2B, [unconditional; conditional], and the two predictions are extrapolated.

Loss guidance is the rest of this file, one idea for pixel and latent models alike.

Unit 2 of the course ("Guidance"): at each step the model predicts the noise, the scheduler turns it into a
prediction of the final image x_0, a loss scores that x_0 (too far from a colour, too far from a CLIP text
embedding, ...), and x_t moves a little down the loss gradient before the ordinary scheduler step. Two
variants, as in the course:
- through_unet=False: the gradient flows only through the x_0 formula (cheap: the UNet runs without grad);
- through_unet=True: x_t requires grad before the UNet, so the gradient flows through the UNet too (better
  gradients, about twice the memory and time).
An optional `grad_scale(t, scheduler)` multiplies the gradient by a schedule: the course's CLIP guidance scales
it by sqrt(alpha_bar) (see course_sqrt_alpha_bar for which alpha_bar; minidiff/pipelines/clip_guidance.py).

Stable Diffusion (the fastai Stable Diffusion Deep Dive's "blue loss", its last section): the same nudge on the
latents. The predicted x_0 is a latent, so the pipeline passes its VAE decoder and the loss scores the decoded
image; the gradient flows back through the decoder to the latents (StableDiffusion.denoise, guidance=):

    x_0 = x_0(latents, eps)  ->  images = vae.decode(x_0 / scaling_factor)  ->  scale * loss(images)
        ->  latents <- latents - grad * guidance_step_size(t)  ->  the ordinary scheduler step

With classifier-free guidance the x_0 comes from the guided prediction, as in the Deep Dive. A loss always sees
images in [-1, 1], pixel or decoded (the Deep Dive's blue_loss takes [0, 1]: blue_loss maps them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minidiff.schedulers import Scheduler

Loss = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] (x_0, or decoded x_0), (B, C, H, W) -> a scalar
GradScale = Callable[[torch.Tensor, Scheduler], torch.Tensor]  # (t, scheduler) -> a factor on the gradient


def classifier_free_guidance(model_output: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ho & Salimans 2022, eq. 6: eps = eps_uncond + scale * (eps_cond - eps_uncond), from a model output of
    batch 2B whose first half is unconditional (no class, or the negative prompt) and second half conditional.
    Returns (guided, eps_cond): (B, ...) each; scale 1 is the conditional prediction alone."""
    uncond, cond = model_output.chunk(2)
    return uncond + scale * (cond - uncond), cond


def color_loss(images: torch.Tensor, target_color: tuple[float, float, float] = (0.1, 0.9, 0.5)) -> torch.Tensor:
    """The course's colour loss: mean |pixel - target| with the target given in [0, 1] RGB."""
    target = (torch.tensor(target_color, device=images.device, dtype=images.dtype) * 2 - 1)[None, :, None, None]
    return (images - target).abs().mean()


def blue_loss(images: torch.Tensor) -> torch.Tensor:
    """The Deep Dive's blue loss: mean |blue - 0.9| over the blue channel, on images in [-1, 1] mapped to the
    [0, 1] the notebook decodes to."""
    return torch.abs((images / 2 + 0.5)[:, 2] - 0.9).mean()


def parse_hex_color(text: str) -> tuple[float, float, float]:
    """'#55FFAA' -> (0.333, 1.0, 0.667)."""
    digits = text.removeprefix("#")
    if len(digits) != 6 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"colour {text!r} is not of the form #RRGGBB (e.g. #55FFAA)")
    return tuple(int(digits[i : i + 2], 16) / 255 for i in (0, 2, 4))


def sqrt_alpha_bar(t: torch.Tensor, scheduler: Scheduler) -> torch.Tensor:
    """sqrt(alpha_bar_t): ~0 at the noisiest steps, 1 at the last, so the guidance acts late in sampling. This
    is the schedule the course's notebook plots ("Possible guidance scaling schedules", against t)."""
    return scheduler.alphas_cumprod[t].sqrt()


def course_sqrt_alpha_bar(t: torch.Tensor, scheduler: Scheduler) -> torch.Tensor:
    """The factor the course's CLIP guidance loop computes: `scheduler.alphas_cumprod[i].sqrt()`, with i the
    loop's step NUMBER (0, 1, 2, ...), not the timestep t. minidiff keeps it as the default of CLIP guidance so
    that the course's guidance_scale gives the course's images. Note what it does: over 50 DDIM steps it only
    falls from 1 to 0.985 (alpha_bar of the first 50 training steps), i.e. almost no scaling; over 1000 DDPM
    steps it falls to 0.006 at the END, the reverse of sqrt_alpha_bar."""
    i = int((scheduler.timesteps == t).nonzero()[0])  # the step number of t in this run
    return scheduler.alphas_cumprod[i].sqrt()


def guidance_step_size(t: torch.Tensor, scheduler: Scheduler) -> float | torch.Tensor:
    """How far x_t moves per unit of loss gradient, as each source writes it for its kind of sampler:

    - 1 for DDPM, DDIM and PNDM, whose x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps and whose
      init_noise_sigma is 1: the course's Unit 2 loop, `x = x.detach() + cond_grad`;
    - sigma_t^2 for samplers in sigma space (LMS in the Deep Dive, Euler, ...: x_t = x_0 + sigma_t eps, started
      from N(0, sigma_max^2), so init_noise_sigma > 1), with sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t: the
      Deep Dive's `latents = latents.detach() - cond_grad * sigma**2`.

    These are two rules, not one rule in two coordinate systems. Moved into DDPM's coordinates (x_DDPM =
    sqrt(alpha_bar_t) x_sigma: a move there is sqrt(alpha_bar_t) times the move in sigma space, the gradient
    1 / sqrt(alpha_bar_t) times the gradient there), the Deep Dive's step is (1 - alpha_bar_t) grad: about the
    course's 1 at the noisy start, but fading to 0 at the last steps, where the course's stays 1. So a loss scale
    tuned with DDIM is not the one for LMS; to follow the Deep Dive's schedule with DDIM, pass
    grad_scale=lambda t, s: 1 - s.alphas_cumprod[t]. minidiff's samplers are all of the first kind today; the
    second branch is what a sigma-space sampler gets (tests/test_latent_guidance.py checks it on the Deep Dive's
    own step)."""
    if scheduler.init_noise_sigma == 1.0:
        return 1.0
    alpha_bar = scheduler.alphas_cumprod[t]
    return (1 - alpha_bar) / alpha_bar


@dataclass
class LossGuidance:
    """Guide sampling with `loss` (on x_0, or on the decoded x_0 of a latent model) times `scale`, at every
    `every`-th step. The same object guides PixelPipeline.denoise and StableDiffusion.denoise."""

    loss: Loss
    scale: float
    every: int = 1  # guide at steps 0, every, 2*every, ... of the loop (1 = every step)
    through_unet: bool = False  # the course's second variant: differentiate through the UNet as well
    grad_scale: GradScale | None = None  # a schedule on top of guidance_step_size, e.g. course_sqrt_alpha_bar

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"guidance every={self.every}: must be at least 1")

    def applies_at(self, step_index: int) -> bool:
        return step_index % self.every == 0

    def nudge(self, x: torch.Tensor, model_output: torch.Tensor, t, scheduler: Scheduler,
              decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x_t - grad_x (scale * loss(images)) * guidance_step_size(t) [* grad_scale(t)], where images is x_0(x_t)
        for a pixel model, or decode(x_0(x_t)) for a latent one (decode: latents -> images in [-1, 1], with grad;
        StableDiffusion passes its VAE decoder). With through_unet, `x` must be the tensor the UNet saw, with
        requires_grad set, and `model_output` must carry its graph."""
        with torch.enable_grad():
            if not self.through_unet:
                x = x.detach().requires_grad_()
            x0 = scheduler.predict_x0(model_output, x, scheduler.alphas_cumprod[t])
            images = x0 if decode is None else decode(x0)
            loss = self.loss(images) * self.scale
            grad = torch.autograd.grad(loss, x)[0]
        grad = grad * guidance_step_size(t, scheduler)
        if self.grad_scale is not None:
            grad = grad * self.grad_scale(t, scheduler)
        return x.detach() - grad
