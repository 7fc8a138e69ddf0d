"""sample.py, the sampling command line: a PNG grid with its settings, same seed same pixels, and a one-line
error with exit code 2 for each mistake a user can make.

The script is loaded from the repo root and main([...]) runs in-process (one subprocess smoke test checks the
real command). Models are tiny and random, saved with save_pixel_model; a few steps each keep this file fast.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.pretrained import load_pixel_pipeline, save_pixel_model
from minidiff.unet import UNet2DConfig, UNet2DModel

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)

TINY = UNet2DConfig(
    sample_size=16, block_out_channels=(32, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)  # fmt: skip
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}


def save_random_model(path: Path, config, unet_class=UNet2DModel, scheduler=DDPM) -> Path:
    torch.manual_seed(0)
    save_pixel_model(path, unet_class(config), config, scheduler)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    course_scheduler = dict(DDPM, beta_schedule="squaredcos_cap_v2")  # the course's digits scheduler
    return {
        "unconditional": save_random_model(folder / "unconditional", TINY),
        "three_classes": save_random_model(folder / "three_classes", UNet2DConfig(**{**vars(TINY),
                                                                                     "num_class_embeds": 3})),
        "digits": save_random_model(folder / "digits", ClassConditionedConfig(), ClassConditionedUNet,
                                    course_scheduler),
    }  # fmt: skip


def run(model: Path, out: Path, *args: str) -> int:
    return sample.main(["--model", str(model), "--out", str(out), *args])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_grid_png_with_settings_matches_the_library(models, tmp_path):
    out = tmp_path / "grid.png"
    assert run(models["unconditional"], out, "--scheduler", "ddim", "--steps", "3", "--seed", "7",
               "--num-images", "4") == 0  # fmt: skip
    image = Image.open(out)
    assert (image.mode, image.size) == ("RGB", (32, 32))  # 4 images of 16x16 as a 2x2 grid
    assert {k: image.text[k] for k in ("scheduler", "steps", "seed", "num_images", "size", "dtype")} == {
        "scheduler": "DDIMScheduler", "steps": "3", "seed": "7", "num_images": "4", "size": "16x16", "dtype": "fp32",
    }  # fmt: skip
    expected = load_pixel_pipeline(models["unconditional"], "ddim")(4, torch.Generator().manual_seed(7), 3)
    grid = pixels(out)
    for i, tile in enumerate(expected):  # row by row
        row, column = divmod(i, 2)
        assert np.array_equal(grid[16 * row : 16 * (row + 1), 16 * column : 16 * (column + 1)], np.asarray(tile))


def test_same_seed_same_pixels_other_seed_other_pixels(models, tmp_path):
    for name, seed in [("a.png", "1"), ("b.png", "1"), ("c.png", "2")]:
        assert run(models["unconditional"], tmp_path / name, "--steps", "3", "--seed", seed) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_colour_guidance_is_applied_and_recorded(models, tmp_path):
    common = ["--scheduler", "ddim", "--steps", "4", "--seed", "3"]
    assert run(models["unconditional"], tmp_path / "plain.png", *common) == 0
    guided = ["--guidance", "color", "--color", "#55FFAA", "--guidance-scale", "30", "--guidance-every", "2"]
    assert run(models["unconditional"], tmp_path / "guided.png", *common, *guided) == 0
    text = Image.open(tmp_path / "guided.png").text
    assert {k: text[k] for k in ("guidance", "color", "guidance_scale", "guidance_every")} == {
        "guidance": "color", "color": "#55FFAA", "guidance_scale": "30.0", "guidance_every": "2",
    }  # fmt: skip
    assert "guidance" not in Image.open(tmp_path / "plain.png").text
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "guided.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-label", "1"], "unconditional"),
        (["--color", "#55FFAA"], "add --guidance color"),
        (["--guidance", "color"], "--color"),
        (["--guidance", "color", "--color", "green"], "#RRGGBB"),
        (["--eta", "0.5"], "--scheduler ddim"),
        (["--eta", "0.5", "--scheduler", "ddpm"], "--scheduler ddim"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "1001"], "from 1 to 1000"),
        (["--num-images", "0"], "--num-images"),
        (["--guidance", "color", "--color", "#55FFAA", "--guidance-every", "0"], "--guidance-every"),
        (["--guidance-scale", "10"], "need --guidance"),
        (["--guidance-through-unet"], "need --guidance"),
        (["--out", "grid.jpg"], "must end in .png"),
        (["--out", "no/such/folder/grid.png"], "does not exist"),
    ],
)
def test_argument_mistakes_exit_2_with_one_line(models, tmp_path, capsys, args, message):
    out = tmp_path / "grid.png"
    assert run(models["unconditional"], out, "--steps", "2", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_model_must_be_a_minidiff_folder(tmp_path, capsys):
    (tmp_path / "diffusers_pipeline").mkdir()
    (tmp_path / "diffusers_pipeline" / "model_index.json").write_text("{}")
    (tmp_path / "diffusers_unet").mkdir()
    (tmp_path / "diffusers_unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    for folder, message in [("diffusers_pipeline", "minidiff.convert"), ("diffusers_unet", "minidiff.convert"),
                            ("missing", "does not exist")]:
        assert run(tmp_path / folder, tmp_path / "grid.png") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "grid.png").exists()


def test_class_conditioned_model_needs_a_label_in_range(models, tmp_path, capsys):
    model, out = models["three_classes"], tmp_path / "grid.png"
    assert run(model, out, "--steps", "2") == 2
    assert "class-conditioned" in capsys.readouterr().err
    assert run(model, out, "--steps", "2", "--class-label", "3") == 2
    assert "0..2" in capsys.readouterr().err
    assert not out.exists()
    assert run(model, out, "--steps", "2", "--class-label", "2") == 0


def test_course_class_conditioned_unet(models, tmp_path):
    model = models["digits"]
    for label in ("7", "1"):
        assert run(model, tmp_path / f"{label}.png", "--steps", "3", "--num-images", "2", "--class-label", label) == 0
    image = Image.open(tmp_path / "7.png")
    assert (image.mode, image.size, image.text["class_label"]) == ("L", (56, 28), "7")  # 2 grey 28x28 digits
    expected = load_pixel_pipeline(model)(2, torch.Generator().manual_seed(0), 3, class_labels=[7, 7])
    assert np.array_equal(pixels(tmp_path / "7.png"), np.concatenate([np.asarray(e) for e in expected], axis=1))
    assert not np.array_equal(pixels(tmp_path / "7.png"), pixels(tmp_path / "1.png"))


def test_command_line_smoke(models, tmp_path):
    out = tmp_path / "grid.png"
    command = [sys.executable, str(ROOT / "sample.py"), "--model", str(models["unconditional"]), "--steps", "2",
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and Image.open(out).size == (16, 16)
