"""Loss guidance on Stable Diffusion's latents (StableDiffusion.denoise(run, guidance=...)): the fastai Stable
Diffusion Deep Dive's "blue loss" (its cells 45-46), that it moves images toward the colour, and sample.py.

Parity. The Deep Dive's loop is written out below as the notebook has it, on diffusers' UNet and VAE and
transformers' text encoder and tokenizer, and compared with minidiff's loop on the same weight tensors (the tiny
models of tests/test_stable_diffusion.py). The notebook samples with LMS, a sampler in sigma space (x_t = x_0 +
sigma_t eps) that minidiff does not have yet, so two lines of the loop depend on the sampler:
- x_0: the notebook's `latents - sigma * noise_pred` is, for DDIM and PNDM's x_t = sqrt(a) x_0 + sqrt(1 - a) eps,
  `(latents - sqrt(1 - a) * noise_pred) / sqrt(a)` (DDPM eq. 15);
- the step: the notebook's `- cond_grad * sigma**2` is `- cond_grad` there, the course's Unit 2 rule
  (guidance_step_size's docstring says why these differ).
The whole loop is compared with DDIM and PNDM; the sigma-space step itself, with the notebook's own lines and
diffusers' LMS sigmas, on one step. Left out: the notebook's helper that casts LMS timesteps to float32 (DDIM
and PNDM index by integer timesteps).

Tolerance. The loop: none, ATOL = 0.0 (measured 0.0): both sides run the same float32 operations on the same
tensors, once the notebook's `vae.decode((1 / 0.18215) * latents_x0)` is written as StableDiffusion.decode
writes it, `latents_x0 / 0.18215`. As the notebook writes it, the two products differ in the last bit, and 10
steps of these random tiny models (latents of size 30) carry that to 2-3e-5 (relative 1e-6), so the verbatim
line is compared on one step, the sigma-space one, within 1e-5 of the step's size. The guidance itself moves
the latents by more than 1e-2 (checked).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import EulerDiscreteScheduler
from PIL import Image
from test_stable_diffusion import SD15, TINY_TEXT, TINY_UNET, TINY_VAE, components, pipelines
from test_tokenizer import model_folders  # noqa: F401 (a fixture used below)

from minidiff.loading.model_folder import load_stable_diffusion
from minidiff.pipelines.guidance import LossGuidance, blue_loss, color_loss, guidance_step_size
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from minidiff.schedulers.pndm import PNDMScheduler

ATOL = 0.0  # bit-identical: see the module docstring
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "tiny-sd"
PROMPT = "A campfire (oil on canvas)"  # the notebook's
CFG, BLUE_LOSS_SCALE = 8, 200  # the notebook's guidance_scale and blue_loss_scale
SCHEDULER_CONFIG = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())  # SD 1.5's


@pytest.fixture(scope="module")
def tiny():
    return components(TINY_UNET, TINY_VAE, TINY_TEXT)


@pytest.fixture(scope="module")
def folder(model_folders):  # noqa: F811
    return model_folders["sd1"]


def notebook_blue_loss(images):
    """Cell 45, verbatim."""
    # How far are the blue channel values to 0.9:
    error = torch.abs(images[:, 2] - 0.9).mean()  # [:,2] -> all images in batch, only the blue channel
    return error


def deep_dive_loop(models, folder, scheduler, latents, num_inference_steps, every, through_unet=False):
    """Cell 46 on diffusers' and transformers' modules, the two sampler lines in their DDIM / PNDM form and the
    decoder's input written as a division (see the module docstring). through_unet: the UNet runs with grad on
    the latents (the course's second variant; the notebook has only the first)."""
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    batch_size = 1
    # Prep text
    text_input = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        text_embeddings = text_encoder(text_input.input_ids)[0]
    max_length = text_input.input_ids.shape[-1]
    uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        uncond_embeddings = text_encoder(uncond_input.input_ids)[0]
    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])
    # Prep Scheduler and latents
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    # Loop
    for i, t in enumerate(scheduler.timesteps):
        guide = i % every == 0
        if guide and through_unet:
            latents = latents.detach().requires_grad_()
        latent_model_input = torch.cat([latents] * 2)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        with torch.set_grad_enabled(guide and through_unet):
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings)["sample"]
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + CFG * (noise_pred_text - noise_pred_uncond)
        if guide:
            if not through_unet:
                latents = latents.detach().requires_grad_()
            alpha_bar = scheduler.alphas_cumprod[t]
            latents_x0 = (latents - (1 - alpha_bar) ** 0.5 * noise_pred) / alpha_bar**0.5  # was: - sigma * noise_pred
            denoised_images = vae.decode(latents_x0 / 0.18215).sample / 2 + 0.5  # was: (1 / 0.18215) * latents_x0
            loss = notebook_blue_loss(denoised_images) * BLUE_LOSS_SCALE
            cond_grad = torch.autograd.grad(loss, latents)[0]
            latents = latents.detach() - cond_grad  # was: - cond_grad * sigma**2
        latents = scheduler.step(noise_pred.detach(), t, latents.detach()).prev_sample
    return latents


@pytest.mark.parametrize("scheduler, through_unet", [("ddim", False), ("pndm", False), ("ddim", True)])
def test_guided_loop_matches_the_deep_dive(tiny, folder, scheduler, through_unet):
    assert tiny["reference"]["vae"].config.scaling_factor == 0.18215  # the constant the notebook writes
    reference, sd = pipelines(tiny, folder, scheduler=scheduler)
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(32))
    expected = deep_dive_loop(tiny["reference"], folder, reference.scheduler, start, 10, 3, through_unet)

    def ours(guidance):
        with torch.no_grad():  # as the pipeline's __call__ and sample.py run it
            run = sd.txt2img(PROMPT, num_inference_steps=10, guidance_scale=CFG, latents=start)
            *_, latents = sd.denoise(run, guidance=guidance)
            return latents, (sd.decode(latents) / 2 + 0.5).clamp(0, 1)

    guidance = LossGuidance(blue_loss, BLUE_LOSS_SCALE, every=3, through_unet=through_unet)
    latents, images = ours(guidance)
    with torch.no_grad():
        expected_images = (reference.vae.decode(expected / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert (latents - expected).abs().max().item() <= ATOL
    assert (images - expected_images).abs().max().item() <= ATOL
    unguided, _ = ours(None)
    assert (latents - unguided).abs().max() > 1e-2  # the guidance did something


def test_blue_loss_is_the_notebooks_on_images_in_minus_one_to_one():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert blue_loss(images) == notebook_blue_loss(images / 2 + 0.5)


# ---- the step size: 1 for DDPM, DDIM and PNDM; the Deep Dive's sigma^2 in sigma space -------------------------


class SigmaSpace(Scheduler):
    """What loss guidance reads of a sampler in sigma space (LMS, Euler): x_t = x_0 + sigma_t eps, started from
    N(0, sigma_max^2), sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t. minidiff has none yet."""

    init_noise_sigma = 14.6  # sigma_max of SD's schedule

    def predict_x0(self, model_output, sample, alpha_bar):
        return sample - ((1 - alpha_bar) / alpha_bar) ** 0.5 * model_output


def sigma_sampler():
    """Cell 3's scheduler settings, with integer ("leading") timesteps so that alphas_cumprod can be read at them.
    diffusers' Euler, not LMS: LMS needs scipy, which is not installed here, and both take the same sigmas,
    sqrt((1 - alpha_bar) / alpha_bar) interpolated at the timesteps."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)


def test_step_size_is_one_for_ddpm_ddim_pndm_and_sigma_squared_in_sigma_space():
    for scheduler_class in (DDPMScheduler, DDIMScheduler, PNDMScheduler):
        scheduler = scheduler_class.from_config(SCHEDULER_CONFIG)
        scheduler.set_timesteps(10)
        assert all(guidance_step_size(t, scheduler) == 1.0 for t in scheduler.timesteps)
    euler = sigma_sampler()
    euler.set_timesteps(50)
    assert euler.init_noise_sigma > 1
    for i, t in enumerate(euler.timesteps):
        sigma_squared = guidance_step_size(int(t), euler)
        assert sigma_squared.item() == pytest.approx(euler.sigmas[i].item() ** 2, rel=1e-6)  # diffusers' sigmas
    first, last = guidance_step_size(int(euler.timesteps[0]), euler), guidance_step_size(1, euler)
    assert 100 < first and last < 3e-3  # 172 at t = 981, 0.0017 at t = 1


def test_one_sigma_space_step_is_the_deep_dives(tiny, folder):
    """Cell 46's guided step, verbatim, with diffusers' sigma at one timestep and diffusers' VAE, against
    LossGuidance.nudge with a sigma-space scheduler."""
    _, sd = pipelines(tiny, folder)
    vae = tiny["reference"]["vae"]
    euler = sigma_sampler()
    euler.set_timesteps(50)
    i = 20
    t, sigma = euler.timesteps[i], euler.sigmas[i]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator) * (sigma**2 + 1) ** 0.5
    noise_pred = torch.randn(2, 4, 8, 8, generator=generator)

    x = latents.detach().requires_grad_()  # the notebook's lines, verbatim
    latents_x0 = x - sigma * noise_pred
    denoised_images = vae.decode((1 / 0.18215) * latents_x0).sample / 2 + 0.5
    loss = notebook_blue_loss(denoised_images) * BLUE_LOSS_SCALE
    cond_grad = torch.autograd.grad(loss, x)[0]
    expected = x.detach() - cond_grad * sigma**2

    scheduler = SigmaSpace.from_config(SCHEDULER_CONFIG)
    got = LossGuidance(blue_loss, BLUE_LOSS_SCALE).nudge(latents, noise_pred, int(t), scheduler, sd.decode)
    moved = (expected - latents).abs().max().item()
    assert moved > 1e-2  # sigma^2 = 4.6 here: the step is visible
    assert (got - expected).abs().max().item() <= 1e-5 * moved  # measured: 2e-7 relative (sigma rounded apart)


# ---- it does what it is for, on the shipped model ----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "config.json").is_file():
        pytest.fail(f"{SHIPPED} is missing: the repository ships its tiny Stable Diffusion there")
    return load_stable_diffusion(SHIPPED)


def test_guidance_moves_the_shipped_models_images_toward_the_colour(shipped):
    """weights/tiny-sd, "a big red circle", 2 images, 6 DDIM steps: the colour loss toward #0000FF (what sample.py
    --guidance color --color "#0000FF" optimises) and the Deep Dive's blue loss, each guided and unguided."""
    blue = (0.0, 0.0, 1.0)

    def images(guidance):
        with torch.no_grad():
            run = shipped.txt2img("a big red circle", num_inference_steps=6, num_images_per_prompt=2,
                                  generator=torch.Generator().manual_seed(0))
            *_, latents = shipped.denoise(run, guidance=guidance)
            return shipped.decode(latents).clamp(-1, 1)

    plain = images(None)
    colour = images(LossGuidance(lambda x: color_loss(x, blue), 100))
    deep_dive = images(LossGuidance(blue_loss, 100))
    losses = {"unguided": (color_loss(plain, blue).item(), blue_loss(plain).item()),
              "colour": color_loss(colour, blue).item(), "blue": blue_loss(deep_dive).item()}
    assert losses["colour"] < losses["unguided"][0] - 0.05, losses  # measured 0.80 vs 0.92 unguided
    assert losses["blue"] < 0.5 * losses["unguided"][1], losses  # measured 0.16 vs 0.63 unguided


def test_sample_py_colour_guidance_on_the_shipped_model(tmp_path):
    out = tmp_path / "blue.png"
    command = [sys.executable, str(ROOT / "sample.py"), "--guidance", "color", "--color", "#0000FF", "--loss-scale",
               "100", "--guidance-every", "2", "--steps", "4", "--height", "32", "--width", "32", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (32, 32)
    assert {k: image.text.get(k) for k in ("guidance", "color", "loss_scale", "guidance_every", "guidance_scale",
                                           "prompt", "steps")} == {
        "guidance": "color", "color": "#0000FF", "loss_scale": "100.0", "guidance_every": "2",
        "guidance_scale": "7.5", "prompt": "a big red circle", "steps": "4"}  # fmt: skip
