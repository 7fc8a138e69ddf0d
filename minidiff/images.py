"""From model tensors to pictures on disk: [-1, 1] tensors -> PIL images -> a grid PNG with its settings."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> B PIL images, rounded as diffusers' numpy_to_pil does (C = 1 or 3)."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    return [Image.fromarray(a) for a in array]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images (all the same size) into a grid, row by row; `columns` defaults to about sqrt(n)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict[str, object]) -> None:
    """Save `image` as PNG with `settings` as text chunks (readable with PIL's `Image.open(p).text`).
    Written to a temporary file first and renamed, so a failure never leaves half a PNG at `path`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {path} must end in .png")
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format="PNG", pnginfo=info)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
