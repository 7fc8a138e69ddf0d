"""An analytic checker of captioned-shapes images (minidiff/training/shapes.py): reads a picture's background,
colour, shape, size and position back off its pixels, so a text-to-image model's samples can be scored against their
captions without a second learned model.

    background  nearest BACKGROUNDS colour to the median of the border pixels
    mask        pixels nearer the shape's colour than the background's, cleaned of specks; largest component
    color       nearest COLORS entry to the median colour of the mask
    shape       two moment ratios of the coverage-weighted mask: y-skewness (a triangle's mass sits low), then
                E[dx^2 dy^2] / (Var x Var y), 1 for a square and 2/3 for a circle (see shape_from_moments)
    size        the longer sub-pixel extent of the mask against the halfway point of the two SIZES
    position    the centre of the mask's bounding box, nearest POSITIONS entry

Used by tests/test_shapes_data.py and, on generated images, by the text-to-image training checks.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from minidiff.training.shapes import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene

ATTRIBUTES = ("background", "color", "shape", "size", "position")
# Half the smallest background-to-colour distance: a pixel this far from the background is no longer background.
FOREGROUND_DISTANCE = 0.5 * min(float(np.linalg.norm(np.subtract(c, b))) for c in COLORS.values()
                                for b in BACKGROUNDS.values())
TRIANGLE_SKEWNESS = 0.28  # |skewness of y|: 0.57 for an upright triangle, 0 for a circle or a square
SQUARE_INDEPENDENCE = 0.83  # E[dx^2 dy^2] / (Var x Var y): 1 for a square, 2/3 for a circle
SIZE_THRESHOLD = sum(SIZES.values()) / 2  # between the small and the big width (fractions of the image)


def as_pixels(image: torch.Tensor | Image.Image) -> np.ndarray:
    """A (3, H, W) uint8 tensor or a PIL image -> (H, W, 3) float64 array of 0-255 values."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
    return image.permute(1, 2, 0).numpy().astype(np.float64)


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """The name of the palette colour closest (Euclidean in RGB) to `rgb` (3,)."""
    return min(palette, key=lambda name: np.linalg.norm(rgb - np.array(palette[name])))


def opening(mask: np.ndarray) -> np.ndarray:
    """The union of every 2x2 block that lies wholly inside a (H, W) bool mask (a morphological opening with a
    2x2 square): drops isolated pixels and one-pixel-wide spurs, keeps anything at least two pixels thick."""
    blocks = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]  # (H-1, W-1): block at (y, x) is full
    opened = np.zeros_like(mask)
    for dy in (0, 1):
        for dx in (0, 1):
            opened[dy : dy + blocks.shape[0], dx : dx + blocks.shape[1]] |= blocks
    return opened


def grow(mask: np.ndarray) -> np.ndarray:
    """A (H, W) bool mask grown by one pixel in all eight directions (a dilation with a 3x3 square)."""
    height, width = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a (H, W) bool mask. Each pixel starts labelled with its own number; every
    round it takes the largest label among itself and its neighbours, then the label of the pixel its label
    names (pointer jumping: labels travel far in few rounds), until one label is left per region."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)  # 0: background
    while True:
        padded = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        spread = np.concatenate([[0], spread.ravel()])[spread]  # pixel number n is entry n of this lookup
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def shape_mask(mask: np.ndarray) -> np.ndarray:
    """Clean a (H, W) bool foreground mask: an opening drops the specks and spurs noise leaves (and keeps a square
    exactly), then the largest region stays."""
    opened = opening(mask)
    return largest_component(opened) if opened.any() else opened


def shape_from_moments(weights: np.ndarray) -> str:
    """The shape drawn by (H, W) weights in [0, 1] (each pixel's coverage), from two ratios of central moments
    that do not depend on size or position and that soft edges and pixel noise barely move:

    skewness of y, E[dy^3] / Var(y)^1.5: -0.57 for an upright triangle (its mass sits low), 0 for the others;
    E[dx^2 dy^2] / (Var(x) Var(y)): 1 for a square (x and y are independent on it), 2/3 for a disc."""
    y, x = np.indices(weights.shape)
    total = weights.sum()
    dx = x - (weights * x).sum() / total
    dy = y - (weights * y).sum() / total
    var_x, var_y = (weights * dx**2).sum() / total, (weights * dy**2).sum() / total
    skewness = (weights * dy**3).sum() / total / var_y**1.5
    if abs(skewness) > TRIANGLE_SKEWNESS:
        return "triangle"
    return "square" if (weights * dx**2 * dy**2).sum() / total / (var_x * var_y) > SQUARE_INDEPENDENCE else "circle"


def describe_image(image: torch.Tensor | Image.Image) -> dict[str, str]:
    """image: (3, H, W) uint8 tensor or PIL RGB image -> {"background", "color", "shape", "size", "position"},
    each a name from minidiff/training/shapes.py, or "none" for all but the background when there is no foreground."""
    pixels = as_pixels(image)  # (H, W, 3)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2H + 2W, 3)
    background = nearest(np.median(border, axis=0), BACKGROUNDS)
    background_rgb = np.array(BACKGROUNDS[background], dtype=np.float64)
    description = {"background": background, "color": "none", "shape": "none", "size": "none", "position": "none"}

    rough = shape_mask(np.linalg.norm(pixels - background_rgb, axis=-1) > FOREGROUND_DISTANCE)
    if not rough.any():
        return description
    foreground_rgb = np.median(pixels[rough], axis=0)
    description["color"] = nearest(foreground_rgb, COLORS)
    # Coverage of each pixel along the background -> foreground line (the antialiasing's blend weight): projecting
    # onto that line leaves one dimension of noise instead of three; above 1/2 the pixel is mostly shape.
    direction = foreground_rgb - background_rgb
    coverage = (pixels - background_rgb) @ direction / (direction @ direction)
    mask = shape_mask(coverage > 0.5)
    if not mask.any():
        return description

    weights = np.clip(coverage, 0, 1) * grow(mask)  # (H, W): the shape with its antialiased rim
    description["shape"] = shape_from_moments(weights)
    # Sub-pixel extents: a column whose most-covered pixel is half covered adds half a pixel to the width.
    extent = max(weights.max(axis=0).sum() / width, weights.max(axis=1).sum() / height)
    description["size"] = "big" if extent > SIZE_THRESHOLD else "small"
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    centre = np.array([(columns[0] + columns[-1] + 1) / 2 / width, (rows[0] + rows[-1] + 1) / 2 / height])
    description["position"] = min(POSITIONS, key=lambda name: np.linalg.norm(centre - np.array(POSITIONS[name])))
    return description


def agreement(images, scenes: list[Scene], attributes: tuple[str, ...] = ("color", "shape")) -> float:
    """Fraction of images (each as describe_image takes) whose described `attributes` all equal their scene's."""
    matches = [all(describe_image(image)[a] == getattr(scene, a) for a in attributes)
               for image, scene in zip(images, scenes, strict=True)]
    return sum(matches) / len(matches)
