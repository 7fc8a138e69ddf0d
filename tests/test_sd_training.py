"""train.py dreambooth and textual-inversion (minidiff/training/personalize.py) end to end on a tiny random Stable
Diffusion: what each mode trains and what it leaves bit-identical, the saved model sampled by sample.py, Dreambooth's
class images and prior-preservation loss, the textual-inversion file loaded back, exact resume, and bad input.

The model is test_sample_cli.py's tiny_stable_diffusion (VAE factor 2, so 16x16 images give 8x8 latents); runs
are a few steps, in-process through train.py's main([...]).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample_cli import TINY, save_random_model, tiny_stable_diffusion

from minidiff.loading.model_folder import load_stable_diffusion, save_stable_diffusion
from minidiff.loading.safetensors import load_file
from minidiff.loading.textual_inversion import load_textual_inversion_into
from minidiff.training import loop as training
from minidiff.training.checkpoint import load_checkpoint
from minidiff.training.personalize import LatentDenoisingLoss, generate_class_images, load_sd_model

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train, sample = load_script("train"), load_script("sample")
FAST = ["--max-steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--learning-rate", "1e-3",
        "--sample-steps", "2"]  # fmt: skip
PRIOR = ["--with-prior-preservation", "--class-prompt", "a photo of a dog", "--num-class-images", "3"]
PROMPT = "a photo of <cat-toy>"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-training")
    save_stable_diffusion(root / "sd", tiny_stable_diffusion(), source="a tiny random test model")
    write_images(root / "dog", 4, size=(18, 16))  # resized and centre-cropped to 16x16
    return root


def write_images(folder: Path, count: int, size: tuple[int, int] = (16, 16), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def dreambooth(root: Path, out: Path, *extra: str) -> list[str]:
    return ["dreambooth", "--model", str(root / "sd"), "--data", str(root / "dog"), "--instance-prompt",
            "a photo of sks dog", "--output-dir", str(out), *FAST, *extra]  # fmt: skip


def textual_inversion(root: Path, out: Path, *extra: str) -> list[str]:
    return ["textual-inversion", "--model", str(root / "sd"), "--data", str(root / "dog"), "--placeholder-token",
            "<cat-toy>", "--initializer-token", "toy", "--output-dir", str(out), *FAST, *extra]  # fmt: skip


def component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{name}.safetensors")


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def fresh_tokenizer_id(word: str) -> int:
    from minidiff.models.tokenizer import CLIPTokenizer

    (token_id,) = CLIPTokenizer().encode(word)
    return token_id


def sample_ok(model: Path, out: Path, prompt: str) -> None:
    assert sample.main(["--model", str(model), "--prompt", prompt, "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_dreambooth_trains_the_unet_and_the_model_samples(root, tmp_path, train_text_encoder):
    out = tmp_path / "run"
    assert train.main(dreambooth(root, out, *["--train-text-encoder"] * train_text_encoder, "--random-flip",
                                 "--sample-every", "4")) == 0  # fmt: skip
    start, model = root / "sd", out / "model"
    assert not identical(component(model, "unet"), component(start, "unet"))
    assert identical(component(model, "vae"), component(start, "vae"))
    config = json.loads((model / "config.json").read_text())
    assert config["scheduler"] == json.loads((start / "config.json").read_text())["scheduler"]  # as it was
    assert identical(component(model, "text_encoder"), component(start, "text_encoder")) != train_text_encoder
    state = load_checkpoint(out / "checkpoint.pt")  # the checkpoint holds what trains, and nothing else
    prefixes = {k.split(".")[0] for k in state["model"]}
    assert prefixes == ({"unet", "text_encoder"} if train_text_encoder else {"unet"})
    assert Image.open(out / "samples" / "step-000004.png").size == (32, 32)  # 4 images of 16x16
    sample_ok(model, tmp_path / "sks.png", "a photo of sks dog")


def test_class_images_are_generated_deterministically(root, tmp_path):
    model = load_sd_model(root / "sd")
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        assert generate_class_images(model, tmp_path / name, "a photo of a dog", 3, 16, seed, steps=2) == 3
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["class-00000.png", "class-00001.png", "class-00002.png"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    assert Image.open(tmp_path / "a" / files[0]).text["prompt"] == "a photo of a dog"
    # A folder that holds some images gets only the missing ones, under the first free names, each image the
    # same as a fresh fill's image of that name.
    (tmp_path / "a" / "class-00001.png").rename(tmp_path / "d.png")
    write_images(tmp_path / "e", 1)
    assert generate_class_images(model, tmp_path / "a", "a photo of a dog", 3, 16, 1, steps=2) == 1
    assert (tmp_path / "a" / "class-00001.png").read_bytes() == (tmp_path / "b" / "class-00001.png").read_bytes()
    assert generate_class_images(model, tmp_path / "e", "a photo of a dog", 2, 16, 1, steps=2) == 1
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["00.png", "class-00000.png"]
    assert (tmp_path / "e" / "class-00000.png").read_bytes() == (tmp_path / "b" / "class-00000.png").read_bytes()


def test_prior_loss_is_instance_plus_weighted_class_loss(root):
    model = load_sd_model(root / "sd")
    ids = model.sd.tokenizer(["a photo of sks dog", "a photo of a dog"], padding="max_length", truncation=True,
                             return_tensors="pt")["input_ids"]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def loss(weight: float, class_images: torch.Tensor = images[2:]) -> float:
        batch = {"images": images[:2], "input_ids": ids[[0, 0]], "class_images": class_images,
                 "class_input_ids": ids[[1, 1]]}  # fmt: skip
        with torch.no_grad():
            return LatentDenoisingLoss(model, weight)(batch, [torch.Generator().manual_seed(s) for s in (3, 4)]).item()

    instance, one, three = loss(0.0), loss(1.0), loss(3.0)
    class_term = one - instance
    assert class_term > 0 and three == pytest.approx(instance + 3 * class_term, rel=1e-6)
    # The instance term does not see the class images, and the class term does.
    assert loss(0.0, -images[2:]) == instance and loss(1.0, -images[2:]) != one


def test_dreambooth_with_prior_preservation_end_to_end(root, tmp_path):
    out, classes = tmp_path / "run", tmp_path / "dogs"
    assert train.main(dreambooth(root, out, *PRIOR, "--class-data-dir", str(classes))) == 0
    assert len(list(classes.glob("class-*.png"))) == 3
    assert all(Image.open(p).size == (16, 16) for p in classes.iterdir())
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    assert run["num_class_images"] == 3 and run["prior_loss_weight"] == 1.0 and run["examples"] == 4
    assert "prior preservation" in json.loads((out / "model" / "config.json").read_text())["source"]
    before = {p.name: p.read_bytes() for p in classes.iterdir()}
    assert train.main(dreambooth(root, tmp_path / "again", *PRIOR, "--class-data-dir", str(classes))) == 0
    assert {p.name: p.read_bytes() for p in classes.iterdir()} == before  # a full folder is used as it is
    assert losses(tmp_path / "again") == losses(out)


def test_textual_inversion_learns_one_row_and_its_file_loads_back(root, tmp_path):
    out = tmp_path / "run"
    assert train.main(textual_inversion(root, out, "--sample-every", "4", "--mixed-precision", "bf16",
                                        "--gradient-checkpointing")) == 0  # fmt: skip
    start, model = root / "sd", out / "model"
    for name in ("unet", "vae"):
        assert identical(component(model, name), component(start, name))
    before, after = component(start, "text_encoder"), component(model, "text_encoder")
    table = "embeddings.token_embedding.weight"
    assert identical({k: v for k, v in after.items() if k != table}, {k: v for k, v in before.items() if k != table})
    assert after[table].shape == (49409, 32) and torch.equal(after[table][:49408], before[table])
    assert not torch.equal(after[table][49408], before[table][fresh_tokenizer_id("toy")])  # it moved from "toy"
    assert load_checkpoint(out / "checkpoint.pt")["model"].keys() == {"placeholder_embedding"}
    learned = load_file(out / "learned_embeds.safetensors")
    assert learned.keys() == {"<cat-toy>"} and torch.equal(learned["<cat-toy>"], after[table][49408:])
    # The file, loaded into the untouched model, gives the trained model's text embeddings.
    fresh, trained = load_stable_diffusion(start), load_stable_diffusion(model)
    assert load_textual_inversion_into(fresh, out / "learned_embeds.safetensors") == ["<cat-toy>"]
    with torch.no_grad():
        assert torch.equal(fresh._encode_prompt(PROMPT, None, 1, True), trained._encode_prompt(PROMPT, None, 1, True))
    with pytest.raises(ValueError, match="already in the vocabulary"):
        load_textual_inversion_into(fresh, out / "learned_embeds.safetensors")
    sample_ok(model, tmp_path / "toy.png", PROMPT)


@pytest.mark.parametrize("mode", ["dreambooth", "textual-inversion"])
def test_interrupted_run_resumes_exactly(root, tmp_path, monkeypatch, mode):
    args = ["--max-steps", "6", "--random-flip", "--ema-decay", "0.9", "--lr-schedule", "cosine"]
    if mode == "dreambooth":
        args += [*PRIOR, "--class-data-dir", str(tmp_path / "dogs"), "--train-text-encoder"]
    make = dreambooth if mode == "dreambooth" else textual_inversion
    assert train.main(make(root, tmp_path / "reference", *args)) == 0
    real_step = training.Trainer.train_step

    def crash_at_step_5(self):  # after the checkpoint of step 4, and one step more
        if self.step == 5:
            raise RuntimeError("power cut")
        return real_step(self)

    out = tmp_path / "run"
    monkeypatch.setattr(training.Trainer, "train_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="power cut"):
        train.main(make(root, out, *args))
    monkeypatch.setattr(training.Trainer, "train_step", real_step)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4 and len(losses(out)) == 5
    assert train.main(make(root, out, *args, "--resume")) == 0
    assert (out / "loss.jsonl").read_bytes() == (tmp_path / "reference" / "loss.jsonl").read_bytes()
    for name in ("unet", "text_encoder"):
        assert identical(component(out / "model", name), component(tmp_path / "reference" / "model", name))


def test_bad_input_is_one_line_and_exit_code_2(root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    save_random_model(tmp_path / "pixel", TINY)
    classes = ["--class-data-dir", str(tmp_path / "dogs")]
    cases = [
        (dreambooth(root, tmp_path / "o") + ["--model", str(tmp_path / "pixel")], "not Stable Diffusion"),
        (dreambooth(root, tmp_path / "o") + ["--data", str(tmp_path / "empty")], "no images in"),
        (dreambooth(root, tmp_path / "o", "--with-prior-preservation", *classes), "needs --class-prompt"),
        (dreambooth(root, tmp_path / "o", "--class-prompt", "a dog"), "add --with-prior-preservation"),
        (dreambooth(root, tmp_path / "o", *PRIOR, *classes, "--num-class-images", "0"), "at least 1"),
        (dreambooth(root, tmp_path / "o", "--resolution", "12"), "multiple of 8"),
        (textual_inversion(root, tmp_path / "o", "--placeholder-token", "toy"), "already in the vocabulary"),
        (textual_inversion(root, tmp_path / "o", "--initializer-token", "teddy bear"), "is 2 tokens"),
    ]
    for args, message in cases:
        assert train.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "dogs").exists()


def test_gradient_checkpointing_and_bf16(root, tmp_path):
    runs = {"plain": [], "recompute": ["--gradient-checkpointing"], "bf16": ["--mixed-precision", "bf16"]}
    for name, extra in runs.items():
        assert train.main(dreambooth(root, tmp_path / name, *extra)) == 0
    plain, unet = losses(tmp_path / "plain"), component(tmp_path / "plain" / "model", "unet")
    assert losses(tmp_path / "recompute") == plain and identical(component(tmp_path / "recompute" / "model", "unet"),
                                                                  unet)  # fmt: skip
    assert losses(tmp_path / "bf16") != plain  # the forward pass ran in bfloat16 ...
    np.testing.assert_allclose(losses(tmp_path / "bf16"), plain, rtol=0.05)  # ... to bfloat16's precision


def test_ddp_two_processes_match_one_process(root, tmp_path):
    # As in test_training.py: Adam's eps 1e-4 keeps float summation-order noise in the gradients from being
    # amplified into +-lr steps, so the two runs agree to 1e-6.
    args = [*PRIOR, "--train-text-encoder", "--random-flip", "--adam-epsilon", "1e-4", "--max-steps", "3"]
    assert train.main(dreambooth(root, tmp_path / "one", *args, "--class-data-dir", str(tmp_path / "dogs1"))) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *dreambooth(root, tmp_path / "two", *args, "--class-data-dir",
                                                   str(tmp_path / "dogs2"), "--batch-size", "1")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.read_bytes() for p in sorted((tmp_path / "dogs2").iterdir())] == [
        p.read_bytes() for p in sorted((tmp_path / "dogs1").iterdir())]  # drawn once, by the main process
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    for name in ("unet", "text_encoder"):
        a, b = component(tmp_path / "two" / "model", name), component(tmp_path / "one" / "model", name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
