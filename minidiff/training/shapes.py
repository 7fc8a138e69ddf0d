"""Captioned shapes: a text-to-image training set drawn on the fly, for training a tiny Stable Diffusion from scratch.

Every scene is one combination of five attributes (a shape, its colour, size and position, and the background);
its caption names some of them. 480 scenes train and 60 are held out, and a model trained on them can be checked
analytically: tests/quality_shapes.py reads the attributes back off a generated image.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated and far apart in RGB (closest pair: orange/yellow, 97 apart), none near a background
    "red": (220, 40, 40),
    "orange": (250, 130, 0),
    "yellow": (245, 225, 20),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 40, 200),
}
SIZES = {"small": 0.25, "big": 0.45}  # the shape's width as a fraction of the image's
POSITIONS = {  # where the shape's centre (the centre of its bounding box) lies, as fractions (x, y) of the image
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}  # neutral: never a COLORS entry

# The held-out split: scenes whose (color, shape, position) never occurs in training, so a model must compose
# "red circle" and "on the left" from separate examples. Each (color, shape) pair is held out at most at one position.
HELDOUT_COMBINATIONS = (
    ("red", "circle", "left"), ("orange", "square", "right"), ("yellow", "triangle", "top"),
    ("green", "circle", "bottom"), ("blue", "square", "center"), ("purple", "triangle", "left"),
    ("red", "square", "top"), ("orange", "triangle", "bottom"), ("green", "triangle", "right"),
    ("purple", "circle", "center"),
)

SUPERSAMPLE = 4  # draw at 4x and average each 4x4 block: antialiased edges
SIZE_JITTER = 0.1  # widths vary by +-10%
CENTER_JITTER = 1 / 16  # centres move by up to +-R/16 in x and y


@dataclass(frozen=True)
class Scene:
    """One picture's content: a flat-coloured shape of some size at some position on a flat background."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS),
                              ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")


def shape_scenes(split: str) -> list[Scene]:
    """The scenes of a split: "train" (480) or "heldout" (60), in itertools.product order of
    SHAPES x COLORS x SIZES x POSITIONS x BACKGROUNDS. The two are disjoint and together are all 540."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
    scenes = [Scene(*attributes) for attributes in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)]
    return [s for s in scenes if ((s.color, s.shape, s.position) in HELDOUT_COMBINATIONS) == (split == "heldout")]


def render_scene(scene: Scene, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """The scene as a (3, resolution, resolution) uint8 image. Three uniform draws from `generator` jitter the
    width (+-10%) and the centre (+-resolution/16 in x and y); the shape always stays at least a pixel inside
    the image. A triangle is upright and as tall as it is wide; a square is axis-aligned."""
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    jitter = 2 * torch.rand(3, generator=generator, dtype=torch.float64).numpy() - 1  # (3,) in [-1, 1)
    canvas = resolution * SUPERSAMPLE
    half = 0.5 * SIZES[scene.size] * (1 + SIZE_JITTER * jitter[0]) * canvas
    x, y = (canvas * (p + CENTER_JITTER * j) for p, j in zip(POSITIONS[scene.position], jitter[1:], strict=True))
    margin = SUPERSAMPLE + 1  # a one-pixel border of background (+1: PIL's boxes include their far edge)
    lowest, highest = half + margin, canvas - half - margin
    x, y = min(max(x, lowest), highest), min(max(y, lowest), highest)

    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw, fill = ImageDraw.Draw(image), COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    pixels = np.array(image.reduce(SUPERSAMPLE))  # (R, R, 3): each pixel the mean of a 4x4 block
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
CAPTION_TEMPLATES = (  # the first names all five attributes; every one names the colour and the shape
    "a {size} {color} {shape} {where} on a {background} background",
    "a {color} {shape}",
    "{size} {color} {shape}, {where}",
    "a picture of a {color} {shape} on {background}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape}",
    "a {color} {shape} on a {background} background",
    "{background} background, {size} {color} {shape} {where}",
    "a drawing of a {size} {color} {shape} {where}",
    "{color} {shape}, {size}, {where}, {background} background",
    "there is a {color} {shape} {where}",
)


def caption_scene(scene: Scene, generator: torch.Generator | None = None) -> str:
    """A caption of the scene from a template drawn with `generator` (one randint); None gives the first
    template, the canonical caption, e.g. "a big orange square on the left on a gray background"."""
    index = 0 if generator is None else torch.randint(len(CAPTION_TEMPLATES), (1,), generator=generator).item()
    caption = CAPTION_TEMPLATES[index].format(shape=scene.shape, color=scene.color, size=scene.size,
                                              where=WHERE[scene.position], background=scene.background)
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)  # "a orange" -> "an orange"


@dataclass
class CaptionedShapes:
    """The training set of a text-to-image model: each scene of a split, rendered afresh every time it is used,
    with its jitter and caption template drawn from the example's generator."""

    resolution: int = 64
    split: str = "train"
    repeats: int = 1  # the dataset lists each scene this many times (an "epoch" is len(self) examples)
    scenes: list[Scene] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ValueError(f"resolution must be at least 16 pixels, got {self.resolution}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        self.scenes = shape_scenes(self.split)

    @property
    def source(self) -> str:
        return (f"minidiff captioned shapes ({self.split} split, {len(self.scenes)} scenes, "
                f"{self.resolution}x{self.resolution})")

    def __len__(self) -> int:
        return len(self.scenes) * self.repeats

    def scene(self, index: int) -> Scene:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} is out of range for {len(self)} examples")
        return self.scenes[index % len(self.scenes)]

    def example(self, index: int, generator: torch.Generator) -> dict:
        """{"images": (3, R, R) float32 in [-1, 1], "caption": str}; the image's jitter, then the caption's
        template, are drawn from `generator`."""
        scene = self.scene(index)
        image = render_scene(scene, self.resolution, generator).float() / 127.5 - 1.0
        return {"images": image, "caption": caption_scene(scene, generator)}
