"""CLIP guidance: steer an unconditional model toward a text prompt (course Unit 2, "Guidance"); the course guides
a pixel model, and the same LossGuidance guides Stable Diffusion through its VAE decoder (guidance.py).

At each step the predicted x_0 is shown to CLIP through a few random augmented views ("cuts"); the loss is the
squared great-circle distance between the views' image embeddings and the prompt's text embedding on the unit
sphere, and LossGuidance moves x_t down its gradient, times sqrt(alpha_bar) as the course does:

    x_0 -> n_cuts random views -> CLIP image features -> spherical_distance_loss(., text features)
        -> x_t <- x_t - scale * grad * sqrt(alpha_bar)

Two recipes for the views (CLIPGuidanceLoss(..., recipe=...), sample.py --clip-recipe):

- "course", the Unit 2 notebook exactly (cells 28-29, torchvision's transforms written here in torch, so
  torchvision is not needed): x_0 exactly as the scheduler predicts it, in [-1, 1], goes straight into
      RandomResizedCrop(size) -> RandomAffine(5) -> RandomHorizontalFlip() -> Normalize(CLIP mean, CLIP std)
  although Normalize's statistics are those of [0, 1] images: the notebook never maps x_0 to [0, 1], and the
  recipe keeps that. RandomResizedCrop draws a box of 8-100% of the area and aspect 3/4-4/3 (log-uniform),
  rounded to whole pixels, up to 10 tries, then resizes it bilinearly with antialiasing; RandomAffine(5) only
  rotates, by a uniform angle in [-5, 5] degrees, with nearest-pixel sampling and zeros outside; the flip has
  p = 0.5. Each cut draws its own crop, angle and flip, shared by the batch, the draws torchvision makes in
  its order (course_cutouts), from `generator` or, if None, from torch's global generator as torchvision does.
- "minidiff", the variant minidiff shipped first (random_cutouts): x_0 mapped to [0, 1]; a box of continuous
  area share in [0.08, 1] and aspect in [3/4, 4/3] at a uniform continuous position (clamped to the image, not
  redrawn), resized and rotated by [-5, 5] degrees in one bilinear grid_sample (no antialiasing), then a colour
  jitter (brightness, contrast and saturation each in [0.9, 1.1]) and a 9-tap Gaussian blur (sigma in [0.1,
  1.9]), no flip; then Normalize. The jitter and the blur are minidiff's additions: the notebook has neither.

Both score the views with the same loss, guidance_scale 8 and 4 cuts by default, the gradient scaled by the
course's `scheduler.alphas_cumprod[i].sqrt()` with i the loop index, not the timestep (course_sqrt_alpha_bar:
a quirk of the notebook, kept so its guidance_scale gives its images). Two differences from the notebook in
both: all cuts go through CLIP in one batch (the same gradient as its loop over cuts, up to rounding), and the
prompt is embedded in the model's dtype (the notebook uses CUDA autocast, float16 on a GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minidiff.models.clip import CLIPModel
from minidiff.models.clip_images import normalize_clip_input, preprocess_tensor
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.pipelines.guidance import GradScale, LossGuidance, course_sqrt_alpha_bar

RECIPES = ("course", "minidiff")
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: the crop's share of the image area...
CROP_RATIO = (3 / 4, 4 / 3)  # ...and its aspect ratio (drawn log-uniformly)
CROP_TRIES = 10  # RandomResizedCrop redraws a box that does not fit this many times, then takes a centred one
MAX_DEGREES = 5.0  # RandomAffine(5): a rotation in [-5, 5] degrees
FLIP_P = 0.5  # RandomHorizontalFlip()
JITTER = 0.1  # minidiff: brightness, contrast, saturation in [0.9, 1.1]
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 1.9)  # minidiff: a 9-tap Gaussian blur, sigma in [0.1, 1.9]


def spherical_distance_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Mean squared great-circle distance over every (image, text) pair: (N, D), (M, D) -> scalar.

    For unit vectors u, v at an angle theta, |u - v| = 2 sin(theta / 2), so 2 arcsin(|u - v| / 2)^2 = theta^2 / 2:
    0 for the same direction, pi^2 / 8 at right angles, pi^2 / 2 for opposite ones. The course's formula, with
    |u - v| / 2 clamped at 1: for opposite vectors rounding gives 1 + 1e-7, where arcsin returns NaN."""
    u = F.normalize(image_features.unsqueeze(1), dim=2)  # (N, 1, D)
    v = F.normalize(text_features.unsqueeze(0), dim=2)  # (1, M, D)
    return (u - v).norm(dim=2).div(2).clamp(max=1).arcsin().pow(2).mul(2).mean()


# ---- the course's recipe: torchvision's RandomResizedCrop, RandomAffine(5), RandomHorizontalFlip --------------


def resized_crop_box(height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params with its defaults, draw for draw: an area share in CROP_SCALE and a
    log-uniform aspect (w / h) in CROP_RATIO, rounded to whole pixels; a box that fits gets a uniform integer
    position, one that does not is redrawn, and after CROP_TRIES misses the whole image is cut to the nearest
    allowed aspect, centred. -> (top, left, h, w)."""
    device = generator.device if generator is not None else "cpu"
    log_ratio = torch.log(torch.tensor(CROP_RATIO))  # float32, as torchvision computes it
    for _ in range(CROP_TRIES):
        area = height * width * torch.empty(1, device=device).uniform_(*CROP_SCALE, generator=generator).item()
        aspect = torch.empty(1, device=device).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                        generator=generator).exp().item()
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=generator, device=device).item()
            left = torch.randint(0, width - w + 1, (1,), generator=generator, device=device).item()
            return top, left, h, w
    if width / height < min(CROP_RATIO):
        w, h = width, round(width / min(CROP_RATIO))
    elif width / height > max(CROP_RATIO):
        w, h = round(height * max(CROP_RATIO)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(images: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """torchvision's resized_crop on tensors: the box, resized to size x size bilinearly with antialiasing (left
    as it is if it already has that size)."""
    box = images[..., top : top + h, left : left + w]
    if (h, w) == (size, size):
        return box
    return F.interpolate(box, size=[size, size], mode="bilinear", align_corners=False, antialias=True)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """torchvision's affine(angle=degrees) on tensors, with RandomAffine's defaults (no translation, scale or
    shear; nearest pixel; zeros outside): each output pixel centre, in pixels from the image centre (y down), is
    turned back by the angle and read from the input. Positive degrees turn the image clockwise (as torchvision's
    affine; its rotate turns the other way). RandomAffine(5)'s angle is uniform in [-5, 5]: either way round."""
    _, _, h, w = images.shape
    a = math.radians(degrees)
    inverse = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]], dtype=images.dtype,
                           device=images.device)  # (2, 3): output (x, y, 1) -> input (x, y)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=images.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=images.device)
    centres = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones_like(xs).expand(h, w)], dim=-1)
    # grid_sample's coordinates run from -1 to 1 across the image: divide by the half-sizes
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=images.dtype, device=images.device)
    grid = centres.to(images.dtype).view(1, h * w, 3).bmm(inverse.T[None] / half).view(1, h, w, 2)
    grid = grid.expand(len(images), h, w, 2)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def course_cutouts(images: torch.Tensor, n_cuts: int, size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) images, as they are -> (n_cuts * B, 3, size, size) CLIP inputs: for each cut the notebook's
    tfms, RandomResizedCrop(size), RandomAffine(5), RandomHorizontalFlip(), Normalize(CLIP's mean and std), with
    torchvision's draws in torchvision's order (crop, angle, flip), each shared by the batch."""
    cuts, device = [], generator.device if generator is not None else "cpu"
    for _ in range(n_cuts):
        view = resized_crop(images, *resized_crop_box(*images.shape[-2:], generator), size)
        view = rotate(view, torch.empty(1, device=device).uniform_(-MAX_DEGREES, MAX_DEGREES,
                                                                   generator=generator).item())
        if torch.rand(1, generator=generator, device=device) < FLIP_P:
            view = view.flip(-1)
        cuts.append(normalize_clip_input(view))
    return torch.cat(cuts)


# ---- minidiff's recipe: continuous crops and rotation, colour jitter, blur ------------------------------------


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
    """minidiff's recipe: (B, 3, H, W) images in [0, 1] -> (n_cuts * B, 3, size, size) augmented views in [0, 1],
    before Normalize, cut by cut (each cut's random crop, rotation, jitter and blur is shared by the batch, as a
    torchvision transform is)."""
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

    recipe: "course" (the notebook's transforms on x_0 as it is, course_cutouts) or "minidiff" (x_0 mapped to
        [0, 1], random_cutouts); see the module docstring.
    n_cuts: random views per call, all in one CLIP batch. The mean of their losses has the mean of their
        gradients, which is what the course accumulates (`cond_grad -= grad / n_cuts`).
    generator: draws the views (None: torch's global generator, as torchvision's transforms draw).
    augment: False scores one deterministic view of the recipe's input instead: CLIP's own preprocessing
        (resize, centre crop, normalize).
    """

    def __init__(self, clip_model: CLIPModel, tokenizer: CLIPTokenizer, prompt: str, n_cuts: int = 4,
                 generator: torch.Generator | None = None, augment: bool = True, recipe: str = "course") -> None:
        if n_cuts < 1:
            raise ValueError(f"n_cuts={n_cuts}: must be at least 1")
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
        self.clip_model, self.n_cuts, self.generator, self.augment = clip_model, n_cuts, generator, augment
        self.recipe = recipe
        self.size = clip_model.config.vision_config.image_size
        max_length = clip_model.config.text_config.max_position_embeddings
        ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():  # the target: computed once
            self.text_features = clip_model.get_text_features(ids.to(clip_model.text_projection.weight.device))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        images = x0 if self.recipe == "course" else x0 / 2 + 0.5  # minidiff gives CLIP the [0, 1] it expects
        if not self.augment:
            views = preprocess_tensor(images, self.size)
        elif self.recipe == "course":
            views = course_cutouts(images, self.n_cuts, self.size, self.generator)
        else:
            views = normalize_clip_input(random_cutouts(images, self.n_cuts, self.size, self.generator))
        return spherical_distance_loss(self.clip_model.get_image_features(views), self.text_features)


def clip_guidance(clip_model: CLIPModel, tokenizer: CLIPTokenizer, prompt: str, scale: float = 8.0,
                  n_cuts: int = 4, every: int = 1, generator: torch.Generator | None = None, augment: bool = True,
                  grad_scale: GradScale | None = course_sqrt_alpha_bar, through_unet: bool = False,
                  recipe: str = "course") -> LossGuidance:
    """The course's CLIP guidance as a LossGuidance (PixelPipeline, StableDiffusion.denoise): guidance_scale 8
    and 4 cuts by default, the gradient scaled by the course's sqrt(alpha_bar) (pass grad_scale=sqrt_alpha_bar
    for the per-timestep schedule the notebook plots, None for none); recipe "course" (default) or "minidiff"
    for the views."""
    loss = CLIPGuidanceLoss(clip_model, tokenizer, prompt, n_cuts, generator, augment, recipe)
    return LossGuidance(loss, scale, every, through_unet, grad_scale)
