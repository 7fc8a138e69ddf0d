"""Stable Diffusion from scratch (minidiff/training/from_scratch.py, train.py vae and text-to-image): each stage trains,
writes a folder the loaders read, and the result runs through the same pipeline as a converted SD 1.5."""

import pytest
import torch

import train
from minidiff.loading.model_folder import load_stable_diffusion, load_vae, read_config
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.training.from_scratch import TINY_VAE, CaptionedExamples, VAELoss, latent_scaling_factor
from minidiff.training.shapes import CaptionedShapes

RES = 32  # the tiny configs at 32 px: 8x8 latents
FAST = ["--max-steps", "2", "--batch-size", "2", "--sample-every", "0", "--resolution", str(RES)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    assert train.main(["vae", "--output-dir", str(out), *FAST]) == 0
    return out / "model"


@pytest.fixture(scope="module")
def sd_dir(vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    assert train.main(["text-to-image", "--vae", str(vae_dir), "--output-dir", str(out), *FAST]) == 0
    return out / "model"


def test_vae_folder_and_scaling_factor(vae_dir):
    assert read_config(vae_dir)["kind"] == "vae"
    vae = load_vae(vae_dir)
    assert isinstance(vae, AutoencoderKL) and vae.config.sample_size == RES
    # the recorded factor brings latents of other images (another seed) to about unit std
    shapes = CaptionedShapes(resolution=RES)
    generator = torch.Generator().manual_seed(123)
    images = torch.stack([shapes.example(i, generator)["images"] for i in range(128)])
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
    assert 0.85 < z.std().item() < 1.15
    assert vae.config.scaling_factor != 0.18215


def test_vae_loss_decreases():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict({**TINY_VAE, "sample_size": RES}))
    loss_fn = VAELoss(vae, kl_weight=1e-6)
    shapes = CaptionedShapes(resolution=RES)
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.stack([shapes.example(i, generator)["images"] for i in range(8)])}
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = loss_fn(batch, generators)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_scaling_factor_is_one_over_latent_std():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict({**TINY_VAE, "sample_size": RES}))
    shapes = CaptionedShapes(resolution=RES)
    factor = latent_scaling_factor(vae, shapes, seed=0)
    generator = torch.Generator().manual_seed(1)
    images = torch.stack([shapes.example(i, generator)["images"] for i in range(256)])
    with torch.no_grad():
        std = vae.encode(images).latent_dist.sample(generator).std().item()
    assert factor * std == pytest.approx(1.0, rel=0.1)


def test_caption_dropout():
    tokenizer = CLIPTokenizer()
    empty = tokenizer([""], padding="max_length", return_tensors="pt")["input_ids"][0]
    generator = torch.Generator().manual_seed(0)
    for p, low, high in ((0.0, 0, 0), (0.5, 150, 250)):
        examples = CaptionedExamples(CaptionedShapes(resolution=RES), tokenizer, p)
        dropped = sum(torch.equal(examples.example(i % len(examples), generator)["input_ids"], empty)
                      for i in range(400))
        assert low <= dropped <= high


def test_text_to_image_folder_runs_every_sd_workflow(sd_dir):
    config = read_config(sd_dir)
    assert config["kind"] == "stable-diffusion"
    assert config["scheduler"]["_class_name"] == "DDIMScheduler"
    sd = load_stable_diffusion(sd_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompt = "a big red circle on the left on a white background"
    images = sd(prompt, negative_prompt="blue", num_inference_steps=3, generator=generator, output_type="pt").images
    assert images.shape == (1, 3, RES, RES)
    init = images[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    from PIL import Image

    init = Image.fromarray(init)
    out = sd(prompt, image=init, strength=0.5, num_inference_steps=4, generator=generator, output_type="pt").images
    assert out.shape == (1, 3, RES, RES)
    mask = Image.new("L", (RES, RES), 0)
    mask.paste(255, (0, 0, RES // 2, RES))
    out = sd(prompt, image=init, mask_image=mask, num_inference_steps=3, generator=generator, output_type="pt").images
    assert out.shape == (1, 3, RES, RES)


def test_cli_errors(vae_dir, tmp_path, capsys):
    cases = [
        (["text-to-image", "--vae", str(tmp_path / "missing")], "missing"),
        (["text-to-image", "--vae", str(vae_dir), "--caption-dropout", "1"], "--caption-dropout"),
        (["text-to-image", "--vae", str(vae_dir), "--resolution", "64"], f"--resolution {RES}"),
        (["vae", "--resolution", "30"], "--resolution"),
    ]
    for argv, expected in cases:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert train.main([*argv, "--output-dir", str(out), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and "\n" not in err
        assert not out.exists()


def test_zero_terminal_snr_recipe(vae_dir, tmp_path):
    """--zero-terminal-snr: the folder records Lin et al.'s schedule (pure noise at t = T, v-prediction, trailing
    steps), and the loaded model samples from t = T with it."""
    out = tmp_path / "run"
    assert train.main(["text-to-image", "--vae", str(vae_dir), "--output-dir", str(out), "--zero-terminal-snr",
                       *FAST]) == 0
    scheduler = read_config(out / "model")["scheduler"]
    assert scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["timestep_spacing"] == "trailing"
    sd = load_stable_diffusion(out / "model", dtype=torch.float32)
    assert sd.scheduler.alphas_cumprod[-1] < 1e-6  # SD's own: 0.0047
    sd.scheduler.set_timesteps(4)
    assert int(sd.scheduler.timesteps[0]) == 999
    images = sd("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    assert images.shape == (1, 3, RES, RES) and torch.isfinite(images).all()
