"""from_pretrained with no convert step (minidiff/convert/pretrained.py, minidiff/loading/hf_cache.py): diffusers
pipeline and model folders, the flat google/ddpm-* layout, transformers CLIP folders, original single files and
hub ids in a simulated Hugging Face cache, each read in memory by the converters `python -m minidiff.convert` runs.

Every source is a seeded random tiny model saved by diffusers / transformers (tests/test_convert_sd.py's,
test_pixel_pipeline.py's and test_clip.py's). Each check holds the loaded model against the reference library's
on the same input, and against what the command line's convert + load gives. Conversion moves tensors without
arithmetic and both sides run the same float32 operations on CPU, so outputs are compared for equality
(max diff 0.0, as in the parity tests), weights byte for byte.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMPipeline
from diffusers import DDPMScheduler as DiffusersDDPM
from helpers import assert_same_tensors, max_diff, output_diff, randn
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from test_clip import TINY_TEXT, TINY_VISION, reference
from test_convert_sd import (
    TINY_UNET,
    hub_tokenizer,
    ldm_checkpoint,
    tiny_pipeline,
    tiny_tables,  # noqa: F401  (a fixture, used by name)
)
from test_pixel_pipeline import diffusers_unet, to_legacy_names

from minidiff.convert.cli import main as convert_main
from minidiff.convert.pretrained import load_model, load_pipeline, load_scheduler, load_tokenizer, save_model
from minidiff.loading.hf_cache import cache_dir, resolve
from minidiff.loading.model_folder import ModelFolderError, load_clip, load_pixel_pipeline, load_stable_diffusion
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["a photo of a cat", "a dog"]
SD_PARTS = ("unet", "vae", "text_encoder")


def convert(src: Path, dst: Path) -> Path:
    assert convert_main([str(src), str(dst)]) == 0
    return dst


def cache_repo(hub: Path, repo_id: str, src: Path, revision: str = "main", commit: str = COMMIT) -> Path:
    """src's files laid out as huggingface_hub downloads them: blobs/<sha256>, snapshots/<commit>/... linking to
    them, refs/<revision> holding the commit. Returns the snapshot folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache at $HF_HOME/hub, with no other variable pointing elsewhere."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home" / "hub"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny diffusers SD pipeline: (pipe, its folder, the folder python -m minidiff.convert makes of it)."""
    folder = tmp_path_factory.mktemp("sd")
    pipe = tiny_pipeline(folder)
    pipe.save_pretrained(folder / "diffusers")
    return pipe, folder / "diffusers", convert(folder / "diffusers", folder / "md")


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """A tiny diffusers DDPMPipeline (pipeline layout) and the same UNet in google/ddpm-*'s flat legacy layout."""
    folder = tmp_path_factory.mktemp("ddpm")
    pipe = DDPMPipeline(diffusers_unet(), DiffusersDDPM())
    pipe.save_pretrained(folder / "diffusers")
    flat = folder / "flat"
    flat.mkdir()
    torch.save(to_legacy_names(pipe.unet.state_dict()), flat / "diffusion_pytorch_model.bin")
    pipe.unet.save_config(flat)
    DiffusersDDPM(beta_schedule="linear", clip_sample=True, variance_type="fixed_small").save_config(flat)
    (flat / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers",
                                           "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return pipe, folder / "diffusers", flat


def token_ids(tokenizer, **options) -> torch.Tensor:
    """PROMPTS padded to the tokenizer's length, as the pipelines tokenize them (minidiff's or transformers')."""
    return tokenizer(PROMPTS, padding="max_length", return_tensors="pt", **options).input_ids


def unet_inputs(unet) -> tuple:
    config = unet.config
    x = randn(2, config.in_channels, config.sample_size, config.sample_size)
    context = randn(2, 5, config.cross_attention_dim, seed=2) if hasattr(config, "cross_attention_dim") else None
    return (x, 500) if context is None else (x, 500, context)


def assert_sd_parts_match(pipe, parts: dict, expected: object) -> None:
    """Each component gives the diffusers / transformers output exactly and holds `expected`'s tensors."""
    assert output_diff(pipe.unet, parts["unet"], *unet_inputs(pipe.unet)) == 0.0
    assert output_diff(pipe.vae, parts["vae"], randn(1, 3, 16, 16)) == 0.0
    ids = token_ids(parts["tokenizer"])
    assert torch.equal(ids, token_ids(pipe.tokenizer))
    with torch.no_grad():
        got, theirs = parts["text_encoder"](ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state
    assert max_diff(got, theirs) == 0.0
    for name in SD_PARTS:
        assert_same_tensors(parts[name].state_dict(), getattr(expected, name).state_dict())


# ---- the Hugging Face cache -----------------------------------------------------------------------------------


def test_cache_dir_follows_huggingface_hub(tmp_path, monkeypatch):
    """The same folder as huggingface_hub's constants.HF_HUB_CACHE under each variable, checked in a subprocess
    (the constants are read once, at import)."""
    cases = [{"HF_HUB_CACHE": "a", "HUGGINGFACE_HUB_CACHE": "b", "HF_HOME": "c"}, {"HUGGINGFACE_HUB_CACHE": "b",
             "HF_HOME": "c"}, {"HF_HOME": "c", "XDG_CACHE_HOME": "d"}, {"XDG_CACHE_HOME": "d"}, {}]
    names = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    script = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    for case in cases:
        env = {**os.environ, **{k: str(tmp_path / v) for k, v in case.items()}}
        theirs = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True).stdout
        with monkeypatch.context() as m:
            for k, v in case.items():
                m.setenv(k, str(tmp_path / v))
            assert cache_dir() == Path(theirs.strip()), case


def test_resolve_ids_revisions_and_errors(sd, hub, tmp_path):
    _, src, _ = sd
    snapshot = cache_repo(hub, "org/tiny-sd", src)
    fp16 = cache_repo(hub, "org/tiny-sd", src, revision="fp16", commit="f" * 40)
    assert try_to_load_from_cache("org/tiny-sd", "unet/config.json", cache_dir=hub) == str(snapshot / "unet" /
                                                                                            "config.json")
    assert resolve("org/tiny-sd") == snapshot and resolve("org/tiny-sd", revision=COMMIT) == snapshot
    assert resolve("org/tiny-sd", revision="fp16") == fp16
    assert resolve(src) == src  # a local folder wins
    with pytest.raises(ModelFolderError, match=r"not a local folder or file, and not in the Hugging Face cache") as e:
        resolve("org/missing")
    assert f"({hub})" in str(e.value) and "hf download org/missing" in str(e.value)
    with pytest.raises(ModelFolderError, match=r"not at revision v2 \(it has fp16, main\)"):
        resolve("org/tiny-sd", revision="v2")
    with pytest.raises(ModelFolderError, match="does not exist"):
        resolve(tmp_path / "missing")


# ---- pipelines ------------------------------------------------------------------------------------------------


def test_sd_pipeline_folder_and_hub_id(sd, hub):
    pipe, src, converted = sd
    expected = load_stable_diffusion(converted)
    kind, parts = load_pipeline(src)
    assert kind == "stable-diffusion" and type(parts["scheduler"]) is PNDMScheduler
    assert parts["scheduler"].config == expected.scheduler.config
    assert_sd_parts_match(pipe, parts, expected)
    assert not any(p.data_ptr() == 0 for p in parts["unet"].parameters())  # real storage, not meta
    cache_repo(hub, "org/tiny-sd", src)
    kind, parts = load_pipeline("org/tiny-sd", scheduler="ddim")
    assert type(parts["scheduler"]) is DDIMScheduler and parts["scheduler"].config.steps_offset == 1
    assert_sd_parts_match(pipe, parts, expected)


def test_pixel_pipeline_and_flat_layout(ddpm):
    pipe, src, flat = ddpm
    for folder in (src, flat):
        kind, parts = load_pipeline(folder)
        assert kind == "pixel" and type(parts["scheduler"]) is DDPMScheduler
        assert output_diff(pipe.unet, parts["unet"], *unet_inputs(pipe.unet)) == 0.0
        assert_same_tensors(parts["unet"].state_dict(), load_pixel_pipeline(convert(folder, folder.parent / (
            folder.name + "-md"))).unet.state_dict())  # fmt: skip
    assert parts["scheduler"].config.clip_sample and parts["scheduler"].config.variance_type == "fixed_small"


@pytest.mark.usefixtures("tiny_tables")
def test_single_file(tmp_path):
    pipe = tiny_pipeline(tmp_path, unet=dict(TINY_UNET, cross_attention_dim=768))  # 768: read as SD 1.x
    safetensors.torch.save_file(ldm_checkpoint(pipe), tmp_path / "v1.safetensors")
    kind, parts = load_pipeline(tmp_path / "v1.safetensors")
    expected = load_stable_diffusion(convert(tmp_path / "v1.safetensors", tmp_path / "md"))
    assert kind == "stable-diffusion" and type(parts["scheduler"]) is PNDMScheduler
    # tensors only: the weights do not tell norm_num_groups, so the tiny UNet's 8 becomes SD 1.5's 32 (both ways)
    assert parts["unet"].config == expected.unet.config
    for name in SD_PARTS:
        assert_same_tensors(parts[name].state_dict(), getattr(expected, name).state_dict())
        assert_same_tensors(parts[name].state_dict(), getattr(pipe, name).state_dict())
    unet = load_model("UNet2DConditionModel", tmp_path / "v1.safetensors")  # the one component of that class
    vae = load_model("AutoencoderKL", tmp_path / "v1.safetensors", subfolder="vae")
    assert_same_tensors(unet.state_dict(), pipe.unet.state_dict())
    assert_same_tensors(vae.state_dict(), pipe.vae.state_dict())
    scheduler = load_scheduler(DDIMScheduler, tmp_path / "v1.safetensors")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1


# ---- models, schedulers, tokenizers ---------------------------------------------------------------------------


def test_models_of_a_pipeline_folder_a_minidiff_folder_and_a_model_folder(sd, tmp_path):
    pipe, src, converted = sd
    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
    for name, class_name in classes.items():
        expected = getattr(pipe, name).state_dict()
        for source, subfolder in ((src, name), (src / name, None), (converted, name), (converted, None)):
            model = load_model(class_name, source, subfolder=subfolder)
            assert type(model).__name__ == class_name and not model.training
            assert_same_tensors(model.state_dict(), expected)
    unet = load_model("UNet2DConditionModel", src, subfolder="unet")
    assert output_diff(pipe.unet, unet, *unet_inputs(pipe.unet)) == 0.0
    save_model(unet, tmp_path / "unet")  # a lone model's save_pretrained, read back
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["kind"] == "model"
    assert_same_tensors(load_model("UNet2DConditionModel", tmp_path / "unet").state_dict(), pipe.unet.state_dict())


def test_schedulers_and_tokenizers(sd, ddpm):
    pipe, src, converted = sd
    for source, subfolder in ((src, "scheduler"), (src, None), (converted, None)):
        scheduler = load_scheduler(DDIMScheduler, source, subfolder=subfolder, clip_sample=True)
        assert scheduler.config.steps_offset == 1 and scheduler.config.clip_sample  # the override wins
    _, _, flat = ddpm  # DDIMScheduler.from_pretrained("google/ddpm-celebahq-256"): the root's scheduler_config.json
    ours, theirs = load_scheduler(DDIMScheduler, flat), DiffusersDDIM.from_pretrained(flat)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    expected = token_ids(pipe.tokenizer)
    for source, subfolder in ((src, "tokenizer"), (src / "tokenizer", None), (converted, None)):
        assert torch.equal(token_ids(load_tokenizer(source, subfolder=subfolder)), expected)
    with pytest.raises(ValueError, match='pass subfolder="tokenizer"'):
        load_tokenizer(src)


def test_transformers_clip_folder_and_its_towers(tmp_path):
    ref = reference(transformers.CLIPModel, transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION,
                                                                    projection_dim=12))
    ref.save_pretrained(tmp_path / "clip")
    theirs_tokenizer = transformers.CLIPTokenizer.from_pretrained(hub_tokenizer(tmp_path / "vocab", "<|endoftext|>"))
    theirs_tokenizer.save_pretrained(tmp_path / "clip")
    tokenizer = load_tokenizer(tmp_path / "clip")
    ids = token_ids(tokenizer)
    assert tokenizer.model_max_length == 16 and torch.equal(ids, token_ids(theirs_tokenizer, max_length=16))
    pixels = randn(2, 3, 30, 30, seed=3)
    with torch.no_grad():
        model = load_model("CLIPModel", tmp_path / "clip")
        assert max_diff(model(ids, pixels).logits_per_image, ref(input_ids=ids, pixel_values=pixels).logits_per_image
                        ) == 0.0  # fmt: skip
        # as transformers: CLIPTextModel.from_pretrained(a CLIPModel folder) takes the text tower
        text = load_model("CLIPTextModel", tmp_path / "clip")
        expected = transformers.CLIPTextModel.from_pretrained(tmp_path / "clip")(ids).last_hidden_state
        assert type(text).__name__ == "CLIPTextModel" and max_diff(text(ids).last_hidden_state, expected) == 0.0
        vision = load_model("CLIPVisionModelWithProjection", tmp_path / "clip")
        expected = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")(pixels).image_embeds
        assert max_diff(vision(pixels).image_embeds, expected) == 0.0
        from_minidiff = load_model("CLIPTextModel", convert(tmp_path / "clip", tmp_path / "md"))
        assert_same_tensors(from_minidiff.state_dict(), text.state_dict())
    assert_same_tensors(load_clip(tmp_path / "md")[0].state_dict(), model.state_dict())


# ---- dtypes, variants, training -----------------------------------------------------------------------------


def test_torch_dtype_and_variant(tmp_path):
    unet = diffusers_unet()
    unet.save_pretrained(tmp_path / "unet")
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    reference = diffusers_unet().state_dict()
    full = load_model("UNet2DModel", tmp_path / "unet")
    half = load_model("UNet2DModel", tmp_path / "unet", variant="fp16")
    bf16 = load_model("UNet2DModel", tmp_path / "unet", torch_dtype=torch.bfloat16)
    assert_same_tensors(full.state_dict(), reference)
    assert_same_tensors(half.state_dict(), {k: v.half() for k, v in reference.items()})
    assert_same_tensors(bf16.state_dict(), {k: v.bfloat16() for k, v in reference.items()})
    with pytest.raises(ValueError, match=r"looked for diffusion_pytorch_model\.ema\.safetensors"):
        load_model("UNet2DModel", tmp_path / "unet", variant="ema")


def test_loaded_models_train(sd):
    """As from diffusers: eval() mode, every parameter requiring grad, and a step of training changes them."""
    _, src, _ = sd
    unet = load_model("UNet2DConditionModel", src, subfolder="unet")
    assert not unet.training and all(p.requires_grad for p in unet.parameters())
    text_encoder = load_model("CLIPTextModel", src, subfolder="text_encoder")
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    loss = text_encoder(token_ids(load_tokenizer(src, "tokenizer"))).last_hidden_state.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in text_encoder.parameters())
    torch.optim.SGD(text_encoder.parameters(), lr=0.1).step()
    assert not torch.equal(text_encoder.final_layer_norm.weight, before["final_layer_norm.weight"])
    assert torch.equal(load_model("CLIPTextModel", src, subfolder="text_encoder").final_layer_norm.weight,
                       before["final_layer_norm.weight"])  # the file is untouched (copy-on-write map)


def test_the_course_calls_reach_these_loaders(sd, ddpm, hub):
    """The notebooks' from_pretrained calls (the classes' doors into this module) on hub ids in the cache."""
    from minidiff import CLIPTokenizer, DDIMScheduler, DDPMPipeline, StableDiffusionPipeline, UNet2DConditionModel

    sd_pipe, src, _ = sd
    cache_repo(hub, "org/tiny-sd", src)
    cache_repo(hub, "google/ddpm-tiny", ddpm[2])  # the flat layout, as google/ddpm-celebahq-256
    pipe = StableDiffusionPipeline.from_pretrained("org/tiny-sd", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16} and type(pipe.scheduler) is PNDMScheduler
    unet = UNet2DConditionModel.from_pretrained("org/tiny-sd", subfolder="unet")
    assert output_diff(sd_pipe.unet, unet, *unet_inputs(sd_pipe.unet)) == 0.0
    assert torch.equal(token_ids(CLIPTokenizer.from_pretrained("org/tiny-sd", subfolder="tokenizer")),
                       token_ids(sd_pipe.tokenizer))
    assert DDIMScheduler.from_pretrained("google/ddpm-tiny").config.clip_sample
    assert type(DDPMPipeline.from_pretrained("google/ddpm-tiny").scheduler) is DDPMScheduler


# ---- errors ---------------------------------------------------------------------------------------------------


def test_one_clear_error_for_what_does_not_fit(sd, tmp_path):
    pipe, src, converted = sd
    cases = [
        (lambda: load_model("UNet2DModel", src, subfolder="unet"), "holds a UNet2DConditionModel, not a UNet2DModel"),
        (lambda: load_model("UNet2DModel", converted), "holds no UNet2DModel (it holds unet (UNet2DConditionModel)"),
        (lambda: load_model("UNet2DConditionModel", src), "a diffusers pipeline folder: pass subfolder="),
        (lambda: load_model("UNet2DConditionModel", converted, subfolder="prior"), "has no prior component"),
        (lambda: load_model("CLIPModel", src, subfolder="text_encoder"), "holds a CLIPTextModel, not a CLIPModel"),
        (lambda: load_model("ControlNetModel", src), "is not a minidiff model class"),
        (lambda: load_pipeline(src / "unet"), "a UNet2DConditionModel folder, not a pipeline"),
    ]
    controlnet = tmp_path / "controlnet"
    controlnet.mkdir()
    (controlnet / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    cases.append((lambda: load_model("UNet2DConditionModel", controlnet), "a model minidiff does not implement"))
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


# ---- sample.py ------------------------------------------------------------------------------------------------


def test_sample_py_reads_diffusers_folders_and_hub_ids(sd, ddpm, hub, tmp_path):
    pipe, src, converted = sd
    for model, out in ((src, "direct.png"), (converted, "converted.png")):
        assert sample.main(["--model", str(model), "--prompt", "a cat", "--steps", "2", "--out",
                            str(tmp_path / out)]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "direct.png")),
                          np.asarray(Image.open(tmp_path / "converted.png")))
    cache_repo(hub, "org/tiny-ddpm", ddpm[1])
    command = [sys.executable, str(ROOT / "sample.py"), "--model", "org/tiny-ddpm", "--steps", "2", "--out",
               str(tmp_path / "hub.png")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "hub.png").size == (16, 16)
    image = Image.open(tmp_path / "hub.png")
    assert image.text["model"] == "org/tiny-ddpm" and image.text["scheduler"] == "DDPMScheduler"
    result = subprocess.run([*command[:3], "org/missing", *command[4:]], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(hub) in result.stderr
