"""CLIP guidance (minidiff/pipelines/clip_guidance.py): the spherical distance, the cutouts, the course's loop, and that
guidance does what it is for.

Models are tiny and random: a minidiff CLIPModel (32x32 images) and a pixel UNet2DModel (16x16), the UNet
built by diffusers and loaded into minidiff so the course's loop can run on diffusers' own UNet and scheduler.
The course's loop is compared within ATOL = 1e-5 on images in [0, 1] with one cut per step: both sides run
the same float32 operations and the measured difference is 0.0. With several cuts minidiff sums in another
order (all cuts in one CLIP batch, the gradient of the mean loss instead of the mean of the gradients): that
is compared on one step's gradient, because 10 steps of these random tiny models amplify a 1e-7 rounding
difference to ~1e-5 (measured 0.7-1.4e-5 for 2 cuts, at guidance scales 8 to 100).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from diffusers import UNet2DModel as DiffusersUNet2DModel
from helpers import seeded

from minidiff.convert.keymaps.unet import unet2d_from_diffusers
from minidiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from minidiff.models.clip_images import normalize_clip_input, preprocess_tensor
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.unet import UNet2DConfig, UNet2DModel
from minidiff.pipelines.clip_guidance import (
    CLIPGuidanceLoss,
    clip_guidance,
    crop_and_rotate,
    gaussian_blur,
    random_cutouts,
    spherical_distance_loss,
)
from minidiff.pipelines.guidance import LossGuidance, course_sqrt_alpha_bar, sqrt_alpha_bar
from minidiff.pipelines.pixel import PixelPipeline
from minidiff.schedulers import DDIMScheduler, DDPMScheduler

ATOL = 1e-5
PROMPT = "Red Rose (still life), red flower painting"  # the course's
SIZE = 32  # the tiny CLIP's image_size
TINY_UNET = dict(
    sample_size=16, block_out_channels=(32, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)  # fmt: skip


@pytest.fixture(scope="module")
def models():
    """(tiny CLIPModel, tokenizer, diffusers UNet2DModel, the same UNet in minidiff), seeded, eval, no grad."""
    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, projection_dim=12)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=8, projection_dim=12)
    clip_model = CLIPModel(CLIPConfig(text, vision, projection_dim=12)).eval().requires_grad_(False)
    reference = DiffusersUNet2DModel(**TINY_UNET).eval().requires_grad_(False)
    config = UNet2DConfig(**TINY_UNET)
    unet = UNet2DModel(config)
    unet.load_state_dict(unet2d_from_diffusers(reference.state_dict(), config))
    return clip_model, CLIPTokenizer(), reference, unet.eval().requires_grad_(False)


# ---- the squared great-circle distance -----------------------------------------------------------------


def course_distances(image_features, text_features):
    """The course's clip_loss after encode_image, verbatim."""
    input_normed = torch.nn.functional.normalize(image_features.unsqueeze(1), dim=2)
    embed_normed = torch.nn.functional.normalize(text_features.unsqueeze(0), dim=2)
    dists = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
    return dists.mean()


def test_spherical_distance_is_half_the_squared_angle():
    a, b = torch.randn(5, 12, generator=seeded(0)), torch.randn(3, 12, generator=seeded(1))
    assert spherical_distance_loss(a[:1], 3 * a[:1]).item() < 1e-12  # same direction
    e = torch.eye(3)
    assert spherical_distance_loss(e[:1], -2 * e[:1]).item() == pytest.approx(math.pi**2 / 2, abs=1e-6)  # 4.9348
    # Opposite random vectors: |u - v| / 2 rounds to 1 - 1e-7, 1 or 1 + 1e-7 in float32, and arcsin is so steep
    # at 1 that one rounding step moves the result by 3e-3; above 1 the course's formula gives NaN.
    for row in a:
        assert spherical_distance_loss(row[None], -row[None]).item() == pytest.approx(math.pi**2 / 2, abs=4e-3)
    over = torch.randn(1, 12, generator=seeded(22))  # a vector that rounds above 1
    assert course_distances(over, -over).isnan()
    assert spherical_distance_loss(over, -over) == spherical_distance_loss(e[:1], -e[:1])  # clamped: arcsin(1)
    right = torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    assert spherical_distance_loss(*right).item() == pytest.approx(math.pi**2 / 8, abs=1e-6)
    angles = torch.arccos(F.cosine_similarity(a[:, None].double(), b[None].double(), dim=2))  # (5, 3)
    assert spherical_distance_loss(a, b).item() == pytest.approx((angles**2 / 2).mean().item(), abs=1e-6)
    distance = spherical_distance_loss(a, b).item()
    assert spherical_distance_loss(b, a).item() == pytest.approx(distance, abs=1e-6)  # symmetric (up to rounding)
    assert spherical_distance_loss(2.5 * a, 0.1 * b).item() == pytest.approx(distance, abs=1e-6)  # scale-free
    assert spherical_distance_loss(a, b).item() == course_distances(a, b).item()  # the course's numbers


# ---- cutouts -------------------------------------------------------------------------------------------


def test_cutouts_shape_range_and_seed():
    images = torch.rand(2, 3, 16, 24, generator=seeded(0))
    cuts = random_cutouts(images, 3, SIZE, seeded(1))
    assert cuts.shape == (6, 3, SIZE, SIZE) and 0 <= cuts.min() and cuts.max() <= 1
    assert torch.equal(cuts, random_cutouts(images, 3, SIZE, seeded(1)))  # same seed, same cutouts
    assert not torch.allclose(cuts, random_cutouts(images, 3, SIZE, seeded(2)))
    assert not torch.allclose(cuts[:2], cuts[2:4])  # every cut draws its own crop
    generator = seeded(1)  # n cuts in one call = n calls of one cut (the course's loop draws cut by cut)
    assert torch.equal(cuts, torch.cat([random_cutouts(images, 1, SIZE, generator) for _ in range(3)]))


def test_crop_rotate_and_blur_geometry():
    images = torch.rand(2, 3, SIZE, SIZE, generator=seeded(0))
    same = crop_and_rotate(images, SIZE, area=1.0, aspect=1.0, left=0.5, top=0.5, degrees=0.0)
    assert (same - images).abs().max() < 1e-6  # the whole image at its own size: the identity
    quarter = crop_and_rotate(images, SIZE, area=1.0, aspect=1.0, left=0.5, top=0.5, degrees=90.0)
    assert (quarter - images.rot90(1, dims=(2, 3))).abs().max() < 1e-6  # counter-clockwise, as torchvision turns
    top_left = crop_and_rotate(images, 8, area=1 / 16, aspect=1.0, left=0.0, top=0.0, degrees=0.0)
    assert (top_left - images[..., :8, :8]).abs().max() < 1e-6  # a 1/16-area crop, not resized
    assert (gaussian_blur(torch.full((1, 3, 12, 12), 0.3), 1.9) - 0.3).abs().max() < 1e-6  # the kernel sums to 1
    assert gaussian_blur(images, 1.0).std() < images.std()


# ---- the loss and the guidance -------------------------------------------------------------------------


def test_clip_guidance_loss_and_its_options(models):
    clip_model, tokenizer, _, _ = models
    loss = CLIPGuidanceLoss(clip_model, tokenizer, PROMPT, n_cuts=2, generator=seeded(0))
    ids = tokenizer(PROMPT, padding="max_length", max_length=16, truncation=True,  # the tiny model's 16 positions
                    return_tensors="pt")["input_ids"]
    assert torch.equal(loss.text_features, clip_model.get_text_features(ids))  # computed once, in __init__
    x0 = (torch.rand(2, 3, 16, 16, generator=seeded(1)) * 2 - 1).requires_grad_()
    value = loss(x0)
    assert value.shape == () and torch.isfinite(torch.autograd.grad(value, x0)[0]).all()
    fixed = CLIPGuidanceLoss(clip_model, tokenizer, PROMPT, augment=False)
    assert fixed(x0).item() == fixed(x0).item()  # deterministic without augmentation
    with pytest.raises(ValueError, match="at least 1"):
        CLIPGuidanceLoss(clip_model, tokenizer, PROMPT, n_cuts=0)
    guidance = clip_guidance(clip_model, tokenizer, PROMPT, every=2)
    assert isinstance(guidance, LossGuidance) and guidance.loss.n_cuts == 4
    assert (guidance.scale, guidance.every, guidance.grad_scale) == (8.0, 2, course_sqrt_alpha_bar)  # course's


def test_sqrt_alpha_bar_by_step_number_or_by_timestep():
    """The course writes alphas_cumprod[i] with i the step number; minidiff follows it by default
    (course_sqrt_alpha_bar) and names the per-timestep schedule the notebook plots sqrt_alpha_bar."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)  # the course's CLIP guidance run
    course = torch.stack([course_sqrt_alpha_bar(t, scheduler) for t in scheduler.timesteps])
    per_t = torch.stack([sqrt_alpha_bar(t, scheduler) for t in scheduler.timesteps])
    assert torch.equal(course, scheduler.alphas_cumprod[:50].sqrt())
    assert 0.985 < course.min() and course.max() <= 1  # the course's factor: almost no scaling at all
    assert per_t[0] < 0.01 and per_t[-1] > 0.999  # per timestep: ~0 at t = 980, ~1 at t = 0
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(1000)
    assert course_sqrt_alpha_bar(ddpm.timesteps[-1], ddpm) < 0.01  # by step number over 1000 steps: reversed


def course_loop(clip_model, tokenizer, unet, tfms, n_cuts, guidance_scale, index):
    """Unit 2's CLIP guidance loop as the notebook writes it, on diffusers' UNet and DDIMScheduler. Only tfms
    differs: torchvision's random transforms become minidiff's (seeded), and the image goes from [-1, 1] to
    [0, 1] first. `index` "i" is the notebook's alphas_cumprod[i]; "t" is alphas_cumprod[t]."""

    def clip_loss(image, text_features):
        image_features = clip_model.get_image_features(tfms(image))
        input_normed = torch.nn.functional.normalize(image_features.unsqueeze(1), dim=2)
        embed_normed = torch.nn.functional.normalize(text_features.unsqueeze(0), dim=2)
        dists = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
        return dists.mean()

    scheduler = DiffusersDDIMScheduler()
    scheduler.set_timesteps(10)
    ids = tokenizer([PROMPT], padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    text_features = clip_model.get_text_features(ids)
    x = torch.randn(2, 3, 16, 16, generator=seeded(0))
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            noise_pred = unet(model_input, t)["sample"]
        cond_grad = 0
        for _cut in range(n_cuts):
            x = x.detach().requires_grad_()
            x0 = scheduler.step(noise_pred, t, x).pred_original_sample
            loss = clip_loss(x0, text_features) * guidance_scale
            cond_grad -= torch.autograd.grad(loss, x)[0] / n_cuts
        alpha_bar = scheduler.alphas_cumprod[i if index == "i" else t]
        x = x.detach() + cond_grad * alpha_bar.sqrt()
        x = scheduler.step(noise_pred, t, x).prev_sample
    return (x.detach() / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("augment, index", [(False, "i"), (True, "i"), (False, "t")])
def test_guided_loop_matches_the_course_notebook(models, augment, index):
    clip_model, tokenizer, reference, unet = models
    scale = 100  # the course uses 8 on a real model; this tiny one needs more for a visible effect
    if augment:
        generator = seeded(3)

        def tfms(image):
            return normalize_clip_input(random_cutouts(image / 2 + 0.5, 1, SIZE, generator))
    else:

        def tfms(image):
            return preprocess_tensor(image / 2 + 0.5, SIZE)

    expected = course_loop(clip_model, tokenizer, reference, tfms, 1, scale, index)

    pipe = PixelPipeline(unet, DDIMScheduler())
    schedule = course_sqrt_alpha_bar if index == "i" else sqrt_alpha_bar
    guidance = clip_guidance(clip_model, tokenizer, PROMPT, scale, 1, generator=seeded(3), augment=augment,
                             grad_scale=schedule)
    got = pipe(2, seeded(0), 10, guidance=guidance, output_type="pt").images
    assert (got - expected).abs().max().item() <= ATOL  # measured 0.0
    unguided = pipe(2, seeded(0), 10, output_type="pt").images
    assert (got - unguided).abs().max() > 1e-2  # the guidance did something


def test_the_mean_over_cuts_has_the_course_accumulated_gradient(models):
    """One guidance gradient with 4 seeded cuts: minidiff's one batch vs the course's loop over the cuts."""
    clip_model, tokenizer, _, _ = models
    loss = CLIPGuidanceLoss(clip_model, tokenizer, PROMPT, n_cuts=4, generator=seeded(5))
    x0 = (torch.rand(2, 3, 16, 16, generator=seeded(6)) * 2 - 1).requires_grad_()
    ours = torch.autograd.grad(loss(x0), x0)[0]
    generator, cond_grad = seeded(5), 0
    for _cut in range(4):
        features = clip_model.get_image_features(normalize_clip_input(random_cutouts(x0 / 2 + 0.5, 1, SIZE, generator)))
        cond_grad -= torch.autograd.grad(course_distances(features, loss.text_features), x0)[0] / 4
    assert (ours + cond_grad).abs().max() <= 2e-6 * cond_grad.abs().max()  # measured 4.4e-7


def test_clip_guidance_lowers_the_clip_loss_of_samples(models):
    """Same seed, 20 DDIM steps, 4 images; the score is the deterministic CLIP view (no augmentation)."""
    clip_model, tokenizer, _, unet = models
    pipe = PixelPipeline(unet, DDIMScheduler())
    score = CLIPGuidanceLoss(clip_model, tokenizer, PROMPT, augment=False)

    def final_losses(guidance):
        images = pipe(4, seeded(0), 20, guidance=guidance, output_type="pt").images
        return torch.stack([score(image[None] * 2 - 1) for image in images])

    plain = final_losses(None)
    guided = final_losses(clip_guidance(clip_model, tokenizer, PROMPT, scale=100, n_cuts=4, generator=seeded(1)))
    numbers = f"unguided {plain.tolist()} (mean {plain.mean():.4f}), guided {guided.tolist()} ({guided.mean():.4f})"
    assert (guided < plain - 0.1).all(), numbers  # measured: 1.17-1.25 (mean 1.203) unguided, 0.86-0.88 (0.872)
