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
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.loading.model_folder import load_pixel_pipeline, save_pixel_model
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.models.unet import UNet2DConfig, UNet2DModel

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
    expected = load_pixel_pipeline(models["unconditional"], "ddim")(4, torch.Generator().manual_seed(7), 3).images
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
        (["--guidance-scale", "10"], "add --guidance color"),
        (["--guidance-through-unet"], "add --guidance color"),
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
    expected = load_pixel_pipeline(model)(2, torch.Generator().manual_seed(0), 3, class_labels=[7, 7]).images
    assert np.array_equal(pixels(tmp_path / "7.png"), np.concatenate([np.asarray(e) for e in expected], axis=1))
    assert not np.array_equal(pixels(tmp_path / "7.png"), pixels(tmp_path / "1.png"))


def test_several_class_labels_make_one_row_each(models, tmp_path):
    model, out = models["digits"], tmp_path / "rows.png"
    assert run(model, out, "--steps", "3", "--num-images", "2", "--class-label", "7", "1") == 0
    image = Image.open(out)
    assert (image.size, image.text["class_label"]) == ((56, 56), "7 1")  # 2 columns, a row per label
    expected = load_pixel_pipeline(model)(4, torch.Generator().manual_seed(0), 3, class_labels=[7, 7, 1, 1]).images
    rows = [np.concatenate([np.asarray(e) for e in expected[i : i + 2]], axis=1) for i in (0, 2)]
    assert np.array_equal(pixels(out), np.concatenate(rows, axis=0))


def test_command_line_smoke(models, tmp_path):
    out = tmp_path / "grid.png"
    command = [sys.executable, str(ROOT / "sample.py"), "--model", str(models["unconditional"]), "--steps", "2",
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and Image.open(out).size == (16, 16)


# ---- Stable Diffusion models and CLIP guidance ----------------------------------------------------------------


def tiny_stable_diffusion(in_channels: int = 4):
    """A random tiny SD: 2-level UNet with cross-attention, 2-level VAE (factor 2), 2-layer CLIP text encoder."""
    from minidiff.models.clip import CLIPTextConfig, CLIPTextModel
    from minidiff.models.tokenizer import CLIPTokenizer
    from minidiff.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
    from minidiff.pipelines.stable_diffusion import StableDiffusion
    from minidiff.schedulers import DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, in_channels=in_channels, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))  # fmt: skip
    vae = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusion(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer(), unet=unet, scheduler=scheduler)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    from minidiff.config import to_json_dict
    from minidiff.loading.model_folder import save_model_folder, save_stable_diffusion
    from minidiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    folder = tmp_path_factory.mktemp("text-models")
    sd = tiny_stable_diffusion()
    sd.tokenizer.add_tokens(["<cat-toy>"])
    sd.text_encoder.add_token_embedding(torch.randn(32))
    save_stable_diffusion(folder / "sd", sd, source="a tiny random test model")
    save_stable_diffusion(folder / "sd-inpaint", tiny_stable_diffusion(in_channels=9))
    torch.manual_seed(0)
    towers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(CLIPTextConfig(**towers), CLIPVisionConfig(**towers, image_size=32, patch_size=8),
                        projection_dim=16)
    clip = CLIPModel(config)
    save_model_folder(folder / "clip", {"kind": "clip", "clip": {"class": "CLIPModel", "config": to_json_dict(config)},
                                        "tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77}},
                      {"clip": clip.state_dict()})
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(folder / "photo.png")
    mask = np.zeros((16, 24), np.uint8)
    mask[:, 12:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return SimpleNamespace(folder=folder, sd=sd)


def test_save_stable_diffusion_round_trip(text_models):
    from minidiff.loading.model_folder import load_stable_diffusion

    loaded = load_stable_diffusion(text_models.folder / "sd")
    for name in ("unet", "vae", "text_encoder"):
        original = getattr(text_models.sd, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert got.keys() == original.keys() and all(torch.equal(got[k], original[k]) for k in original)
    assert loaded.tokenizer.convert_tokens_to_ids("<cat-toy>") == 49408
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.scheduler.config.steps_offset == 1


def test_txt2img_grid_matches_the_library(text_models, tmp_path):
    from minidiff.loading.model_folder import load_stable_diffusion

    out = tmp_path / "fox.png"
    assert run(text_models.folder / "sd", out, "--prompt", "a red <cat-toy>", "--negative-prompt", "blurry",
               "--steps", "3", "--num-images", "2", "--height", "16", "--width", "24", "--seed", "5") == 0
    image = Image.open(out)
    assert image.size == (48, 16)
    assert {k: image.text[k] for k in ("prompt", "negative_prompt", "guidance_scale", "steps")} == {
        "prompt": "a red <cat-toy>", "negative_prompt": "blurry", "guidance_scale": "7.5", "steps": "3"}  # fmt: skip
    sd = load_stable_diffusion(text_models.folder / "sd")
    expected = sd("a red <cat-toy>", "blurry", 16, 24, 3, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(5)).images
    assert np.array_equal(pixels(out)[:, :24], np.asarray(expected[0]))
    assert np.array_equal(pixels(out)[:, 24:], np.asarray(expected[1]))


def test_several_prompts_make_one_row_each(text_models, tmp_path):
    from minidiff.loading.model_folder import load_stable_diffusion

    out, prompts = tmp_path / "rows.png", ["a red cat", "a blue dog"]
    assert run(text_models.folder / "sd", out, "--prompt", *prompts, "--steps", "2", "--num-images", "2",
               "--height", "16", "--width", "16") == 0
    image = Image.open(out)
    assert image.size == (32, 32) and json.loads(image.text["prompt"]) == prompts
    sd = load_stable_diffusion(text_models.folder / "sd")
    expected = sd(prompts, None, 16, 16, 2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    rows = [np.concatenate([np.asarray(e) for e in expected[i : i + 2]], axis=1) for i in (0, 2)]
    assert np.array_equal(pixels(out), np.concatenate(rows, axis=0))


def test_img2img_and_inpainting(text_models, tmp_path):
    folder = text_models.folder
    assert run(folder / "sd", tmp_path / "a.png", "--prompt", "a cat", "--steps", "4",
               "--init-image", str(folder / "photo.png"), "--strength", "0.5") == 0
    assert Image.open(tmp_path / "a.png").size == (28, 20)  # the photo's size, floored to the VAE's multiple
    assert Image.open(tmp_path / "a.png").text["strength"] == "0.5"
    for model in ("sd", "sd-inpaint"):  # a 4-channel UNet blends, a 9-channel one takes the mask as input
        assert run(folder / model, tmp_path / f"{model}.png", "--prompt", "a cat", "--steps", "3", "--height", "16",
                   "--width", "24", "--init-image", str(folder / "photo.png"), "--mask", str(folder / "mask.png")) == 0
        assert Image.open(tmp_path / f"{model}.png").size == (24, 16)


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("sd", [], "needs --prompt"),
        ("sd", ["--prompt", "x", "--class-label", "1"], "belong to pixel-space models"),
        ("sd", ["--prompt", "x", "--cfg-scale", "2"], "belong to pixel-space models"),
        ("sd", ["--prompt", "x", "--loss-scale", "10"], "only with guidance"),
        ("sd", ["--prompt", "x", "--clip-recipe", "minidiff"], "only with guidance"),
        ("sd", ["--prompt", "x", "--guidance", "color"], "--color"),
        ("sd", ["--prompt", "x", "--mask", "mask.png"], "add --init-image"),
        ("sd", ["--prompt", "x", "--strength", "0.5"], "add --init-image"),
        ("sd", ["--prompt", "x", "--init-image", "missing.png"], "cannot read it as an image"),
        ("sd", ["--prompt", "x", "--height", "12"], "multiples of 8"),
        ("sd", ["--prompt", "x", "--init-image", "photo.png", "--strength", "1.5"], "strength"),
        ("clip", ["--prompt", "x"], "does not generate images"),
        ("unconditional", ["--prompt", "x"], "belong to Stable Diffusion models"),
        ("unconditional", ["--scheduler", "pndm"], "pixel models take ddpm or ddim"),
        ("unconditional", ["--guidance", "clip", "--guidance-prompt", "a rose"], "--clip-model"),
        ("unconditional", ["--guidance", "clip", "--clip-model", "@clip"], "--guidance-prompt"),
        ("unconditional", ["--guidance", "color", "--color", "#55FFAA", "--cuts", "2"], "belong to --guidance clip"),
        ("unconditional", ["--guidance", "color", "--color", "#55FFAA", "--clip-recipe", "course"],
         "belong to --guidance clip"),
        ("unconditional", ["--guidance", "color", "--color", "#55FFAA", "--loss-scale", "10"],
         "--loss-scale belong to Stable Diffusion models"),
    ],
)
def test_text_and_clip_mistakes_exit_2(models, text_models, tmp_path, capsys, model, args, message):
    folder = text_models.folder
    path = models[model] if model in models else folder / model
    args = [str(folder / a.removeprefix("@")) if a.endswith(".png") or a.startswith("@") else a for a in args]
    assert run(path, tmp_path / "x.png", "--steps", "2", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_clip_guidance_from_the_command_line(models, text_models, tmp_path):
    common = ["--scheduler", "ddim", "--steps", "4", "--seed", "1"]
    assert run(models["unconditional"], tmp_path / "plain.png", *common) == 0
    assert run(models["unconditional"], tmp_path / "rose.png", *common, "--guidance", "clip", "--guidance-prompt",
               "a red rose", "--clip-model", str(text_models.folder / "clip"), "--guidance-scale", "500") == 0
    text = Image.open(tmp_path / "rose.png").text
    assert text["guidance"] == "clip" and text["guidance_prompt"] == "a red rose" and text["guidance_scale"] == "500.0"
    assert (text["clip_recipe"], text["cuts"]) == ("course", "4")  # the defaults
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "rose.png"))
    assert run(models["unconditional"], tmp_path / "variant.png", *common, "--guidance", "clip", "--guidance-prompt",
               "a red rose", "--clip-model", str(text_models.folder / "clip"), "--guidance-scale", "500",
               "--clip-recipe", "minidiff", "--cuts", "2") == 0
    text = Image.open(tmp_path / "variant.png").text
    assert (text["clip_recipe"], text["cuts"]) == ("minidiff", "2")
    assert not np.array_equal(pixels(tmp_path / "rose.png"), pixels(tmp_path / "variant.png"))


def test_loss_guidance_on_stable_diffusion(text_models, tmp_path):
    """--guidance on a Stable Diffusion model: the loss multiplier is --loss-scale, --guidance-scale stays CFG;
    the image is the library's (StableDiffusion.denoise with a LossGuidance) and the PNG records the settings."""
    from minidiff.images import to_pil
    from minidiff.loading.model_folder import load_stable_diffusion
    from minidiff.pipelines.guidance import LossGuidance, color_loss

    common = ["--prompt", "a red cat", "--steps", "3", "--height", "16", "--width", "16", "--seed", "2"]
    assert run(text_models.folder / "sd", tmp_path / "plain.png", *common) == 0
    assert run(text_models.folder / "sd", tmp_path / "blue.png", *common, "--guidance", "color", "--color",
               "#0000FF", "--loss-scale", "50", "--guidance-every", "2", "--guidance-scale", "5") == 0
    text = Image.open(tmp_path / "blue.png").text
    assert {k: text[k] for k in ("guidance", "color", "loss_scale", "guidance_every", "guidance_scale")} == {
        "guidance": "color", "color": "#0000FF", "loss_scale": "50.0", "guidance_every": "2", "guidance_scale": "5.0"}
    assert "guidance" not in Image.open(tmp_path / "plain.png").text
    sd = load_stable_diffusion(text_models.folder / "sd")
    guidance = LossGuidance(lambda x0: color_loss(x0, (0.0, 0.0, 1.0)), 50.0, every=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        prepared = sd.prepare("a red cat", None, 16, 16, 3, 5.0, generator=generator)
        *_, latents = sd.denoise(prepared, generator=generator, guidance=guidance)
        expected = sd.decode(latents)
    assert np.array_equal(pixels(tmp_path / "blue.png"), np.asarray(to_pil(expected)[0]))
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "blue.png"))

    assert run(text_models.folder / "sd", tmp_path / "rose.png", *common, "--guidance", "clip", "--guidance-prompt",
               "a red rose", "--clip-model", str(text_models.folder / "clip"), "--loss-scale", "500",
               "--guidance-through-unet") == 0
    text = Image.open(tmp_path / "rose.png").text
    assert (text["guidance"], text["loss_scale"], text["clip_recipe"], text["guidance_through_unet"]) == (
        "clip", "500.0", "course", "True")
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "rose.png"))
