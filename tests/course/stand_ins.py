"""What the notebooks import besides diffusion, and what their download cells produce.

The notebooks plot with matplotlib, grid images with torchvision, show videos with IPython and fetch data with
requests, datasets and `!curl`. None of that is diffusion, none of it is installed here, and none of it may reach
the network, so both sides of every comparison import the same small stand-ins (`modules()`), installed into
sys.modules for the run:

- matplotlib.pyplot records what each cell plots (imshow/plot arguments as numpy arrays), so plotted values are
  compared too; torchvision.utils.make_grid and transforms.ToTensor are torchvision's own algorithms, rewritten.
- requests.get answers the notebooks' two image URLs with small synthetic PNGs; anything else raises.
- the download cells' outputs (a butterflies batch, MNIST digits, macaw.jpg, learned_embeds.bin) are small
  seeded fixtures (`butterflies`, `digits`, `files`).
"""

import io
import math
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec

import numpy as np
import torch
from PIL import Image, ImageDraw

# The two images of unit 3 cell 3 (CompVis/latent-diffusion's inpainting example and its mask).
IMAGE_URL = "https://raw.githubusercontent.com/CompVis/latent-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo.png"  # noqa: E501
MASK_URL = "https://raw.githubusercontent.com/CompVis/latent-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo_mask.png"  # noqa: E501


def module(name: str, **attributes) -> types.ModuleType:
    stand_in = types.ModuleType(name)
    stand_in.__spec__ = ModuleSpec(name, None)
    stand_in.__dict__.update(attributes)
    return stand_in


def modules(plots: list) -> dict[str, types.ModuleType]:
    """The stand-in modules by import name; `plots` collects what pyplot is given."""
    pyplot = module("matplotlib.pyplot", **{name: Recorder(plots, name) for name in PLOT_CALLS},
                    subplots=lambda nrows=1, ncols=1, **_: subplots(plots, nrows, ncols))
    transforms = module("torchvision.transforms", ToTensor=ToTensor)
    utils = module("torchvision.utils", make_grid=make_grid)
    display = module("IPython.display", HTML=lambda html: html)
    return {
        "matplotlib": module("matplotlib", pyplot=pyplot), "matplotlib.pyplot": pyplot,
        "torchvision": module("torchvision", transforms=transforms, utils=utils),
        "torchvision.transforms": transforms, "torchvision.utils": utils,
        "IPython": module("IPython", display=display), "IPython.display": display,
        "datasets": module("datasets", load_dataset=no_download("datasets.load_dataset")),
        "requests": module("requests", get=get),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ pyplot

PLOT_CALLS = ("imshow", "plot", "show", "legend", "title", "xlabel", "ylabel", "set_title", "axis")


class Recorder:
    """A pyplot function or Axes method: records the arrays it is given (as np.asarray would read them)."""

    def __init__(self, plots: list, name: str):
        self.plots, self.name = plots, name

    def __call__(self, *args, **kwargs):
        for value in args:
            if not isinstance(value, str):
                self.plots.append((self.name, np.asarray(value)))


class Axes:
    def __init__(self, plots: list):
        for name in PLOT_CALLS:
            setattr(self, name, Recorder(plots, name))


def subplots(plots: list, nrows: int, ncols: int):
    """(figure, axes) as matplotlib returns them: one Axes for 1x1, else a flat list for a single row."""
    axes = [Axes(plots) for _ in range(nrows * ncols)]
    return object(), axes[0] if len(axes) == 1 else axes


# ----------------------------------------------------------------------------------------------- torchvision


@torch.no_grad()
def make_grid(tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """torchvision.utils.make_grid (normalize=False): images in rows of `nrow`, `padding` pixels apart."""
    if isinstance(tensor, list):
        tensor = torch.stack(tensor)
    if tensor.dim() == 4 and tensor.size(1) == 1:  # one channel -> three
        tensor = torch.cat((tensor, tensor, tensor), 1)
    if tensor.size(0) == 1:
        return tensor.squeeze(0)
    count = tensor.size(0)
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    height, width = tensor.size(2) + padding, tensor.size(3) + padding
    grid = tensor.new_full((tensor.size(1), height * rows + padding, width * columns + padding), pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        grid.narrow(1, y * height + padding, height - padding).narrow(2, x * width + padding, width - padding).copy_(
            tensor[k])
    return grid


class ToTensor:
    """torchvision.transforms.ToTensor for PIL images: (H, W, C) uint8 -> (C, H, W) float32 in [0, 1]."""

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        array = torch.from_numpy(np.array(picture, copy=True))
        return array.view(picture.size[1], picture.size[0], -1).permute(2, 0, 1).contiguous().float().div(255)


# ------------------------------------------------------------------------------------------------- downloads


def no_download(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{what} downloads data: the notebook cell calling it is replaced by a fixture")
    return refuse


def get(url: str, **kwargs):
    """requests.get for the two inpainting images (as PNG bytes); any other address raises."""
    pictures = {IMAGE_URL: bench_picture, MASK_URL: bench_mask}
    if url not in pictures:
        raise RuntimeError(f"no network: {url}")
    buffer = io.BytesIO()
    pictures[url]().save(buffer, format="PNG")
    return types.SimpleNamespace(content=buffer.getvalue(), status_code=200)


def bench_picture(size: int = 96) -> Image.Image:
    """A seeded stand-in for the overture-creations photograph (a bench in a park): noise over a gradient."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.uniform(0, 55, (size, size, 3))
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def bench_mask(size: int = 96) -> Image.Image:
    """White where the inpainting paints (the bench), black elsewhere, as the example mask."""
    mask = Image.new("RGB", (size, size))
    ImageDraw.Draw(mask).rectangle((size // 4, size // 3, 3 * size // 4, 5 * size // 6), fill=(255, 255, 255))
    return mask


def butterflies(count: int = 4, size: int = 16, batch_size: int = 2):
    """What unit 2 cell 12 builds from huggan/smithsonian_butterflies_subset: a DataLoader of {"images": (B, 3,
    size, size)} batches in [-1, 1], shuffled by torch's global generator."""
    images = (torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(12)) * 2 - 1).unbind(0)
    dataset = [{"images": image} for image in images]
    return dataset, torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)


def digits(count: int = 6, size: int = 8):
    """What torchvision.datasets.MNIST(..., transform=ToTensor()) yields, in miniature: (1, size, size) images in
    [0, 1] with labels 0-9."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(count, 1, size, size, generator=generator).round()
    labels = torch.randint(0, 10, (count,), generator=generator)
    return [(image, int(label)) for image, label in zip(images, labels, strict=True)]


def files(folder, width: int) -> None:
    """The files the deep dive's shell cells and the fastai repository leave next to the notebook: macaw.jpg
    (`!curl`, cell 6) and learned_embeds.bin (a textual-inversion token, `width` wide)."""
    bench_picture(128).save(folder / "macaw.jpg")
    torch.save({"<birb-style>": torch.randn(width, generator=torch.Generator().manual_seed(38))},
               folder / "learned_embeds.bin")


class IPythonShell:
    """get_ipython() for the cells' `!` lines, which IPython rewrites to get_ipython().system("...")."""

    ALLOWED = ("rm -rf steps/", "mkdir -p steps/")

    def system(self, command: str) -> None:
        if command.strip() not in self.ALLOWED:
            raise RuntimeError(f"shell command not allowed here: {command}")
        subprocess.run(command, shell=True, check=True)


def install(stand_ins: dict) -> dict:
    """Put the stand-ins into sys.modules; returns what they replaced, for `uninstall`."""
    replaced = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    return replaced


def uninstall(replaced: dict) -> None:
    for name, previous in replaced.items():
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
