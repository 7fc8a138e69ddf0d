"""`python -m minidiff.convert` for CLIP: transformers CLIP folders and open_clip / OpenAI state dicts -> minidiff
"clip" folders -> load_clip, compared with transformers.

The models are test_clip.py's tiny ones (seeded random init, CLIP's 49,408-token vocabulary, 16 positions).
Tolerance: ATOL = 1e-6 as in test_clip.py, where minidiff and transformers measure 0.0 on the same tensors.
"""

import json

import pytest
import safetensors.torch
import torch
import transformers
from helpers import max_diff
from test_clip import TINY_TEXT, TINY_VISION, reference, to_open_clip
from test_convert_sd import fails, hub_tokenizer
from test_tokenizer import REFERENCE_CONFIGS

from minidiff.convert.cli import main as convert_main
from minidiff.convert.clip import CLIP_CONFIGS
from minidiff.loading.model_folder import load_clip
from minidiff.models import clip

ATOL = 1e-6
TINY_CLIP = dict(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=12)
PROMPTS = ["a photo of a cat", "a dog"]


def pixels(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


CLASSES = {
    "CLIPModel": lambda: transformers.CLIPConfig(**TINY_CLIP),
    "CLIPTextModelWithProjection": lambda: transformers.CLIPTextConfig(**TINY_TEXT),
    "CLIPVisionModel": lambda: transformers.CLIPVisionConfig(**TINY_VISION),
}


@pytest.mark.parametrize("class_name", sorted(CLASSES))
def test_transformers_folder_converts_and_matches(tmp_path, class_name):
    ref = reference(getattr(transformers, class_name), CLASSES[class_name]())
    ref.save_pretrained(tmp_path / "src")
    theirs = None
    if class_name != "CLIPVisionModel":  # text models come with a tokenizer; 77 long, capped to the 16 positions
        theirs = transformers.CLIPTokenizer.from_pretrained(hub_tokenizer(tmp_path / "vocab", "<|endoftext|>"))
        theirs.save_pretrained(tmp_path / "src")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "md")]) == 0
    config = json.loads((tmp_path / "md" / "config.json").read_text())
    assert config["kind"] == "clip" and config["clip"]["class"] == class_name
    ours, tokenizer = load_clip(tmp_path / "md")
    assert type(ours).__name__ == class_name and (tokenizer is None) == (theirs is None)
    with torch.no_grad():
        if class_name == "CLIPVisionModel":
            assert max_diff(ours(pixels()).pooler_output, ref(pixel_values=pixels()).pooler_output) <= ATOL
            return
        ids = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
        assert tokenizer.model_max_length == 16 and torch.equal(ids, theirs(
            PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids)  # fmt: skip
        if class_name == "CLIPModel":
            a, b = ref(input_ids=ids, pixel_values=pixels()), ours(ids, pixels())
            assert max_diff(a.logits_per_image, b.logits_per_image) <= ATOL
        else:
            assert max_diff(ours(ids).text_embeds, ref(ids).text_embeds) <= ATOL


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dict_with_clip_config(tmp_path, monkeypatch, capsys, suffix):
    ref = reference(transformers.CLIPModel, transformers.CLIPConfig(**TINY_CLIP))
    state_dict = {k: v.contiguous() for k, v in to_open_clip(ref.state_dict()).items()}
    state_dict |= {"input_resolution": torch.tensor(30), "context_length": torch.tensor(16),
                   "vocab_size": torch.tensor(49408)}  # OpenAI's state dicts hold these too
    path = tmp_path / f"open_clip_model{suffix}"
    safetensors.torch.save_file(state_dict, path) if suffix == ".safetensors" else torch.save(state_dict, path)
    assert "pass --clip-config" in fails(capsys, path, tmp_path / "md")
    monkeypatch.setitem(CLIP_CONFIGS, "tiny", TINY_CLIP)
    assert convert_main([str(path), str(tmp_path / "md"), "--clip-config", "tiny"]) == 0
    ours, tokenizer = load_clip(tmp_path / "md")
    ids = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert tokenizer.pad_token_id == 0 and (ids[1, 4:] == 0).all()  # open_clip's tokenize pads with zeros
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels()).logits_per_image
        assert max_diff(ours(ids, pixels()).logits_per_image, expected) <= ATOL


def test_known_architectures():
    """ViT-L-14 is openai/clip-vit-large-patch14's config.json; ViT-B-32 is transformers' default CLIPConfig,
    which is openai/clip-vit-base-patch32's architecture."""
    vit_l14 = json.loads((REFERENCE_CONFIGS / "openai__clip-vit-large-patch14" / "config.json").read_text())
    assert clip.CLIPConfig.from_dict(CLIP_CONFIGS["ViT-L-14"]) == clip.CLIPConfig.from_dict(vit_l14)
    vit_b32 = transformers.CLIPConfig().to_dict()
    assert clip.CLIPConfig.from_dict(CLIP_CONFIGS["ViT-B-32"]) == clip.CLIPConfig.from_dict(vit_b32)
    with torch.device("meta"):
        ours = clip.CLIPModel(clip.CLIPConfig.from_dict(CLIP_CONFIGS["ViT-B-32"]))
        theirs = transformers.CLIPModel(transformers.CLIPConfig())
    assert ours.state_dict().keys() == theirs.state_dict().keys() - {"text_model.embeddings.position_ids",
                                                                     "vision_model.embeddings.position_ids"}
    assert all(v.shape == theirs.state_dict()[k].shape for k, v in ours.state_dict().items())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archive_is_refused(tmp_path, capsys):
    torch.jit.script(torch.nn.Linear(2, 2)).save(tmp_path / "ViT-B-32.pt")  # as OpenAI's clip package ships models
    assert "a TorchScript archive" in fails(capsys, tmp_path / "ViT-B-32.pt", tmp_path / "md", "--clip-config",
                                            "ViT-B-32")
