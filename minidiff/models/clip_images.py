"""CLIP's image preprocessing: PIL images (or differentiable tensors) -> the (B, 3, 224, 224) input of the vision
tower, as transformers' CLIPImageProcessor makes it: RGB, shortest edge resized (bicubic), centre crop, scaled
to [0, 1] and normalized with OpenAI's per-channel statistics."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's per-channel statistics of the training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def normalize_clip_input(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def _resize_and_crop(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new h, new w, crop top, crop left) as CLIPImageProcessor computes them: the shortest edge to size, the
    long edge to int(size * long / short), then a centered size x size crop."""
    long = int(size * max(h, w) / min(h, w))
    h, w = (long, size) if w <= h else (size, long)
    return h, w, (h - size) // 2, (w - size) // 2


def preprocess_images(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 CLIP input, bit-identical to transformers' CLIPImageProcessor
    (PIL backend): RGB; shortest edge to `size` with PIL bicubic; center crop; / 255; (x - CLIP_MEAN) /
    CLIP_STD."""
    crops = []
    for image in images:
        image = _to_rgb(image)
        h, w, top, left = _resize_and_crop(image.height, image.width, size)
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[:, top:top + size, left:left + size]
        crops.append(pixels.float() / 255)  # equal, for all 256 values, to transformers' float64 rescale
    return normalize_clip_input(torch.stack(crops))


def preprocess_tensor(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, 3, size, size) CLIP input, differentiable (for CLIP guidance).

    The same steps as preprocess_images, but on tensors: F.interpolate bicubic with antialias (Pillow's
    filter), center crop, normalize. NOT pixel-identical to the PIL path, which resizes 8-bit pixels in fixed
    point and rounds the result to 8 bits."""
    h, w, top, left = _resize_and_crop(*images.shape[-2:], size)
    images = F.interpolate(images, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return normalize_clip_input(images[..., top:top + size, left:left + size])
