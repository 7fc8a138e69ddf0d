"""The contracts that let the pipelines and train.py stay ignorant of what they hold.

1. Every scheduler has one step signature, step(model_output, t, sample, generator=None, ...), and says its own
   default step count, so no pipeline, training mode or CLI asks which scheduler it was given (checked from the
   source: no isinstance or issubclass on a scheduler class).
2. StableDiffusion's __call__ picks the mode from diffusers' argument names: image and mask_image -> inpaint,
   image -> img2img, neither -> txt2img; contradictory arguments are a ValueError naming them.
3. train.py's subcommands are minidiff/training/modes.py's registry: a TrainingMode added there is a subcommand,
   with its options, defaults and task, and train.py does not change.
"""

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.models.unet import UNet2DConfig, UNet2DModel
from minidiff.pipelines.pixel import PixelPipeline
from minidiff.schedulers import SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER_BLIND = ["minidiff/pipelines", "minidiff/training", "train.py", "sample.py"]


def scheduler_type_checks(root: Path) -> list[str]:
    """'file:line' of every isinstance/issubclass whose class argument names a *Scheduler class."""
    files = [p for entry in SCHEDULER_BLIND for p in sorted((root / entry).rglob("*.py")) + [root / entry]
             if p.is_file()]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
                names = [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1])
                         if isinstance(n, ast.Name | ast.Attribute)]
                if any(name.endswith("Scheduler") for name in names):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_code_asks_which_scheduler_it_holds():
    assert scheduler_type_checks(ROOT) == []


def test_the_check_finds_a_scheduler_type_test(tmp_path):
    """The check above can fail: each way of writing the test is found."""
    (tmp_path / "minidiff" / "pipelines").mkdir(parents=True)
    (tmp_path / "minidiff" / "pipelines" / "p.py").write_text(
        "a = isinstance(s, DDIMScheduler)\nb = isinstance(s, (PNDMScheduler, int))\n"
        "c = isinstance(s, schedulers.DDPMScheduler | DDIMScheduler)\nd = isinstance(s, int)\n")
    (tmp_path / "sample.py").write_text("e = issubclass(type(s), LMSDiscreteScheduler)\n")
    assert scheduler_type_checks(tmp_path) == ["minidiff/pipelines/p.py:1", "minidiff/pipelines/p.py:2",
                                               "minidiff/pipelines/p.py:3", "sample.py:1"]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_steps_with_a_generator(name):
    """The same loop runs every scheduler: set_timesteps, init_noise_sigma, scale_model_input, step(..., generator=)
    with the generator as a keyword; the default step count is a number the scheduler gives."""
    scheduler = SCHEDULERS[name]()
    assert "generator" in inspect.signature(scheduler.step).parameters
    assert scheduler.default_num_inference_steps == (1000 if name == "ddpm" else 50)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 4, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = 0.1 * scheduler.scale_model_input(x, t)
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
    assert x.shape == (1, 3, 4, 4) and torch.isfinite(x).all()


def test_eta_reaches_ddim_only_when_set():
    """eta is DDIM's argument (diffusers' name); a pipeline passes it only when it is not 0, DDIM's default, so a
    sampler without it is never handed one, and asking such a sampler for eta fails instead of being ignored."""
    torch.manual_seed(0)
    unet = UNet2DModel(UNet2DConfig.from_dict(dict(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                                   layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                                   up_block_types=("UpBlock2D",) * 2)))
    for name in ("ddpm", "pndm"):
        pipe = PixelPipeline(unet, SCHEDULERS[name]())
        assert pipe(num_inference_steps=4, output_type="pt").images.shape == (1, 3, 8, 8)
        with pytest.raises(TypeError, match="eta"):
            pipe(num_inference_steps=4, eta=0.5)
    ddim = PixelPipeline(unet, SCHEDULERS["ddim"]())
    deterministic = ddim(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    noisy = ddim(num_inference_steps=4, output_type="pt", eta=1.0, generator=torch.Generator().manual_seed(0)).images
    assert (deterministic - noisy).abs().max() > 1e-3


# -------------------------------------------------------------------------------- StableDiffusion's three modes

MODES = ("txt2img", "img2img", "inpaint")


@pytest.fixture(scope="module")
def sd():
    from test_sample_cli import tiny_stable_diffusion

    return tiny_stable_diffusion()


def picture(seed: int, mask: bool = False) -> Image.Image:
    """16 x 16 (the tiny model's size): random colours, or a white square (repaint) on black."""
    if mask:
        return Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode, images", [
    ("txt2img", {}),
    ("img2img", {"image": picture(0)}),  # strength: img2img's default, 0.8
    ("img2img", {"image": picture(0), "strength": 0.5}),
    ("inpaint", {"image": picture(0), "mask_image": picture(0, mask=True)}),  # strength 1.0
    ("inpaint", {"image": picture(0), "mask_image": picture(0, mask=True), "strength": 0.7}),
])  # fmt: skip
def test_call_runs_the_mode_its_arguments_name(sd, monkeypatch, mode, images):
    """sd(...) calls exactly the mode that image / mask_image name, with every argument (the same latents as the
    mode function run by hand, same seed), and the mode's own default strength when none is given."""
    called = []

    def recorded(name, method):
        return lambda *args, **kwargs: called.append(name) or method(*args, **kwargs)

    for name in MODES:
        monkeypatch.setattr(sd, name, recorded(name, getattr(sd, name)))
    args = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0)
    got = sd("a red circle", **args, **images, eta=0.5, generator=torch.Generator().manual_seed(0),
             output_type="latent").images
    assert called == [mode]
    generator = torch.Generator().manual_seed(0)
    run = getattr(sd, mode)("a red circle", *images.values(), **args, generator=generator)
    *_, expected = sd.denoise(run, eta=0.5, generator=generator)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(mask_image=picture(0, mask=True)), "needs the image as well as mask_image"),
    (dict(image=picture(0), latents=torch.zeros(1, 4, 8, 8)), "pass image or latents, not both"),
    (dict(strength=0.5), "strength is how much of an image to repaint"),
])  # fmt: skip
def test_contradictory_arguments_are_named(sd, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sd("a red circle", num_inference_steps=2, **kwargs)


# ---------------------------------------------------------------------------------------------- training modes


def test_train_py_builds_its_subcommands_from_the_registry(monkeypatch, tmp_path, capsys):
    from minidiff.training import modes

    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    made = []

    def add_arguments(parser, name):
        parser.add_argument("--colour", default="red", help=f"the colour of {name}")

    def make_task(args, world):
        made.append((args.colour, args.learning_rate, args.num_sample_images, args.max_steps))
        raise ValueError("a toy mode makes no task")

    toy = modes.TrainingMode("toy", "a toy mode", add_arguments, make_task, defaults={"learning_rate": 0.5},
                             num_sample_images=3)
    monkeypatch.setitem(modes.MODES, "toy", toy)
    assert train.main(["toy", "--colour", "blue", "--output-dir", str(tmp_path / "run")]) == 2
    assert made == [("blue", 0.5, 3, 1000)]  # its option, its defaults, the loop's own default
    assert "a toy mode makes no task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["toy", "--help"])
    assert "a toy mode. Defaults here: --learning-rate 0.5; and --num-sample-images 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    listed = capsys.readouterr().out.split("positional arguments:")[1].split("options:")[0]
    assert re.findall(r"^    (\S+)", listed, re.MULTILINE) == list(modes.MODES)  # toy last
