"""`python -m minidiff.convert` when it cannot convert: exit status 2, one clear message (a list of keys where
keys are the problem), nothing written at DST, no partial folder left beside it, and no code from a checkpoint
ever run. The sources are test_convert_sd.py's tiny models.
"""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_convert_sd import TINY_UNET, fails, ldm_checkpoint, tiny_pipeline

from minidiff.convert.cli import main as convert_main


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny SD pipeline folder saved by diffusers."""
    folder = tmp_path_factory.mktemp("sd")
    tiny_pipeline(folder).save_pretrained(folder / "diffusers")
    return folder / "diffusers"


@pytest.fixture(scope="module")
def v1_file(tmp_path_factory):
    """A tiny SD 1.x-layout single file (768-wide cross-attention: what the detection reads)."""
    folder = tmp_path_factory.mktemp("v1")
    checkpoint = ldm_checkpoint(tiny_pipeline(folder, unet=dict(TINY_UNET, cross_attention_dim=768)))
    safetensors.torch.save_file(checkpoint, folder / "v1.safetensors")
    return folder / "v1.safetensors"


def test_not_a_stable_diffusion_checkpoint(tmp_path, capsys):
    safetensors.torch.save_file({"encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    err = fails(capsys, tmp_path / "vae.safetensors", tmp_path / "md")
    assert "not a Stable Diffusion checkpoint minidiff knows" in err and "start with encoder." in err
    safetensors.torch.save_file({"visual.conv1.weight": torch.zeros(2)}, tmp_path / "clip.safetensors")
    assert "pass --clip-config" in fails(capsys, tmp_path / "clip.safetensors", tmp_path / "md")


def test_unknown_keys_are_listed(v1_file, tmp_path, capsys):
    checkpoint = safetensors.torch.load_file(v1_file)
    extra = ["lora_unet_down.alpha", "model_ema.unrelated", "cond_stage_model.extra"]
    checkpoint |= {key: torch.zeros(1) for key in extra}
    safetensors.torch.save_file(checkpoint, tmp_path / "extra.safetensors")
    err = fails(capsys, tmp_path / "extra.safetensors", tmp_path / "md")
    assert "3 tensors that are not part of an SD UNet" in err
    assert all(f"\n    {key}" in err for key in extra)


def leave_marker(path: str) -> None:
    Path(path).touch()


class RunsCodeWhenLoaded:
    """What a malicious (or merely Lightning-pickled) checkpoint holds: loading it calls a function."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return leave_marker, (self.marker,)


def test_pickle_that_needs_code_is_refused_without_running_it(v1_file, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": safetensors.torch.load_file(v1_file), "callbacks": RunsCodeWhenLoaded(marker)},
               tmp_path / "model.ckpt")
    err = fails(capsys, tmp_path / "model.ckpt", tmp_path / "md")
    assert "loading it would run code (test_convert_errors.leave_marker)" in err and err.count("\n") == 1
    assert not marker.exists()
    torch.load(tmp_path / "model.ckpt", weights_only=False)  # the test's premise: a full unpickle runs it
    assert marker.exists()


def test_existing_destination_is_left_untouched(v1_file, pipeline_folder, tmp_path, capsys):
    dst = tmp_path / "md"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    for src in (v1_file, pipeline_folder):
        assert convert_main([str(src), str(dst)]) == 2
        assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["md"]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(v1_file, tmp_path, capsys, suffix):
    path = tmp_path / f"v1{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": safetensors.torch.load_file(v1_file), "global_step": 1}, path)
    else:
        shutil.copy(v1_file, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = fails(capsys, path, tmp_path / "md")
    assert err.startswith(f"error: {path}:") and err.count("\n") == 1


def test_options_and_folders_that_do_not_fit(pipeline_folder, tmp_path, capsys):
    src = pipeline_folder
    for option in ("--prediction-type=epsilon", "--no-upcast-attention", "--clip-config=ViT-B-32"):
        assert "only for a single checkpoint file" in fails(capsys, src, tmp_path / "md", option)
    assert "no such file or folder" in fails(capsys, tmp_path / "missing", tmp_path / "md")
    shutil.copytree(src, tmp_path / "partial", ignore=shutil.ignore_patterns("vae"))
    assert "no vae/ folder" in fails(capsys, tmp_path / "partial", tmp_path / "md")
    shutil.copytree(src, tmp_path / "controlnet")
    index = json.loads((src / "model_index.json").read_text()) | {"controlnet": ["diffusers", "ControlNetModel"]}
    (tmp_path / "controlnet" / "model_index.json").write_text(json.dumps(index))
    assert "component controlnet (ControlNetModel) is not part of" in fails(capsys, tmp_path / "controlnet",
                                                                           tmp_path / "md")
