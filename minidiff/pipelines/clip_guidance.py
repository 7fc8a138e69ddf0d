"""CLIP guidance: steer an unconditional pixel model toward a text prompt (course Unit 2, "Guidance").

At each step the predicted x_0 is shown to CLIP through a few random augmented crops ("cutouts"); the loss is
the squared great-circle distance between the crops' image embeddings and the prompt's text embedding on the
unit sphere, and LossGuidance moves x_t down its gradient, times sqrt(alpha_bar) as the course does:

    x_0 -> n_cuts cutouts (random crop + small rotation, colour jitter, blur) -> CLIP image features
        -> spherical_distance_loss(., text features) -> x_t <- x_t - scale * grad * sqrt(alpha_bar)

The augmentations are the course's torchvision ones (RandomResizedCrop(224), RandomAffine(5), ColorJitter,
GaussianBlur(9, sigma=(0.1, 1.9))) written in plain torch and drawn from one torch.Generator, so a seed gives
the same cutouts. One deliberate difference: the course feeds x_0 in [-1, 1] straight to CLIP's Normalize,
which expects [0, 1]; minidiff maps x_0 to [0, 1] first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minidiff.models.clip import CLIPModel
from minidiff.models.clip_images import normalize_clip_input, preprocess_tensor
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.pipelines.guidance import GradScale, LossGuidance, course_sqrt_alpha_bar

CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: the crop's share of the image area...
CROP_RATIO = (3 / 4, 4 / 3)  # ...and its aspect ratio (drawn log-uniformly)
MAX_DEGREES = 5.0  # RandomAffine(5): a rotation in [-5, 5] degrees
JITTER = 0.1  # brightness, contrast, saturation in [0.9, 1.1] (torchvision's ColorJitter() alone: identity)
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 1.9)  # GaussianBlur(kernel_size=9, sigma=(0.1, 1.9))


def spherical_distance_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Mean squared great-circle distance over every (image, text) pair: (N, D), (M, D) -> scalar.

    For unit vectors u, v at an angle theta, |u - v| = 2 sin(theta / 2), so 2 arcsin(|u - v| / 2)^2 = theta^2 / 2:
    0 for the same direction, pi^2 / 8 at right angles, pi^2 / 2 for opposite ones. The course's formula, with
    |u - v| / 2 clamped at 1: for opposite vectors rounding gives 1 + 1e-7, where arcsin returns NaN."""
    u = F.normalize(image_features.unsqueeze(1), dim=2)  # (N, 1, D)
    v = F.normalize(text_features.unsqueeze(0), dim=2)  # (1, M, D)
    return (u - v).norm(dim=2).div(2).clamp(max=1).arcsin().pow(2).mul(2).mean()


def crop_and_rotate(images: torch.Tensor, size: int, area: float, aspect: float, left: float, top: float,
                    degrees: float) -> torch.Tensor:
    """Cut a box of `area` (share of the image) and `aspect` (w / h) at relative position (left, top) in [0, 1],
    resize it to size x size and rotate it by `degrees`: one affine_grid + grid_sample, zeros outside."""
    _, _, H, W = images.shape
    w = min(math.sqrt(area * H * W * aspect), W)  # in pixels, clamped to the image
    h = min(math.sqrt(area * H * W / aspect), H)
    x0, y0 = left * (W - w), top * (H - h)
    # grid_sample's coordinates run from -1 to 1 across the image (align_corners=False): the box's centre and
    # half-extent there; output coordinates are rotated first (the output is square), then mapped into the box
    cx, cy, sx, sy = 2 * (x0 + w / 2) / W - 1, 2 * (y0 + h / 2) / H - 1, w / W, h / H
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[sx * cos, -sx * sin, cx], [sy * sin, sy * cos, cy]], dtype=images.dtype,
                         device=images.device).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), ITU-R 601 weights as torchvision's rgb_to_grayscale."""
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def color_jitter(images: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """torchvision's three blends toward black, the mean grey and the pixel's grey, in a fixed order."""
    images = (images * brightness).clamp(0, 1)
    images = (contrast * images + (1 - contrast) * _luma(images).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    return (saturation * images + (1 - saturation) * _luma(images)).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """A separable Gaussian blur with reflect padding (as torchvision's GaussianBlur)."""
    x = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-((x / sigma) ** 2) / 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    images = F.pad(images, [kernel_size // 2] * 4, mode="reflect")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along the rows
    return F.conv2d(images, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along the columns


def random_cutouts(images: torch.Tensor, n_cuts: int, size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (n_cuts * B, 3, size, size) augmented views in [0, 1], cut by cut (each
    cut's random crop, rotation, jitter and blur is shared by the batch, as a torchvision transform is)."""
    cuts, device = [], generator.device if generator is not None else "cpu"
    for _ in range(n_cuts):  # 9 uniforms per cut, drawn in order: n cuts = n calls of one cut
        u = torch.rand(9, generator=generator, device=device).tolist()
        (lo, hi), (rlo, rhi) = CROP_SCALE, CROP_RATIO
        area = lo + (hi - lo) * u[0]
        aspect = math.exp(math.log(rlo) + (math.log(rhi) - math.log(rlo)) * u[1])
        view = crop_and_rotate(images, size, area, aspect, u[2], u[3], MAX_DEGREES * (2 * u[4] - 1))
        view = color_jitter(view, *(1 + JITTER * (2 * v - 1) for v in u[5:8]))
        cuts.append(gaussian_blur(view, BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[8]))
    return torch.cat(cuts)


class CLIPGuidanceLoss:
    """x_0 in [-1, 1], (B, 3, H, W) -> scalar: the mean spherical distance of its CLIP views to `prompt`.

    n_cuts: random augmented views per call, all in one CLIP batch. The mean of their losses has the mean of
        their gradients, which is what the course accumulates (`cond_grad -= grad / n_cuts`).
    generator: draws the cutouts (None: torch's global generator).
    augment: False scores one deterministic view instead: CLIP's own preprocessing (resize, centre crop).
    """

    def __init__(self, clip_model: CLIPModel, tokenizer: CLIPTokenizer, prompt: str, n_cuts: int = 4,
                 generator: torch.Generator | None = None, augment: bool = True) -> None:
        if n_cuts < 1:
            raise ValueError(f"n_cuts={n_cuts}: must be at least 1")
        self.clip_model, self.n_cuts, self.generator, self.augment = clip_model, n_cuts, generator, augment
        self.size = clip_model.config.vision_config.image_size
        max_length = clip_model.config.text_config.max_position_embeddings
        ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():  # the target: computed once
            self.text_features = clip_model.get_text_features(ids.to(clip_model.text_projection.weight.device))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        images = x0 / 2 + 0.5  # CLIP's normalization expects [0, 1]
        if self.augment:
            views = normalize_clip_input(random_cutouts(images, self.n_cuts, self.size, self.generator))
        else:
            views = preprocess_tensor(images, self.size)
        return spherical_distance_loss(self.clip_model.get_image_features(views), self.text_features)


def clip_guidance(clip_model: CLIPModel, tokenizer: CLIPTokenizer, prompt: str, scale: float = 8.0,
                  n_cuts: int = 4, every: int = 1, generator: torch.Generator | None = None, augment: bool = True,
                  grad_scale: GradScale | None = course_sqrt_alpha_bar, through_unet: bool = False) -> LossGuidance:
    """The course's CLIP guidance as a LossGuidance for PixelPipeline: guidance_scale 8 and 4 cuts by default,
    the gradient scaled by the course's sqrt(alpha_bar) (pass grad_scale=sqrt_alpha_bar for the per-timestep
    schedule the notebook plots, None for none)."""
    loss = CLIPGuidanceLoss(clip_model, tokenizer, prompt, n_cuts, generator, augment)
    return LossGuidance(loss, scale, every, through_unet, grad_scale)
