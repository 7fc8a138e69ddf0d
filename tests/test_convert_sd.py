"""`python -m minidiff.convert` for Stable Diffusion and CLIP: diffusers pipeline folders, original single-file
checkpoints, transformers CLIP folders and open_clip state dicts -> minidiff folders -> load_stable_diffusion /
load_clip.

The hub files cannot be fetched here, so every source is built in the test: random-init models at the real
configs (tests/reference_configs) or tiny ones, saved by diffusers / transformers, or written in the original
LDM layout by inverting diffusers' own single-file converters (the inverse maps of test_unet_condition.py,
test_vae.py and test_clip.py; each test checks that diffusers maps the file back). Conversion moves tensors
without arithmetic, so every comparison of weights is exact (torch.equal); the CLIP outputs are compared with
ATOL = 1e-6, as in test_clip.py, where minidiff and transformers measure 0.0.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import transformers
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import PNDMScheduler as DiffusersPNDM
from diffusers import StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from helpers import assert_same_tensors
from safetensors import safe_open
from test_clip import to_open_clip
from test_tokenizer import REFERENCE_CONFIGS
from test_unet_condition import to_ldm as unet_to_ldm
from test_vae import to_ldm as vae_to_ldm

from minidiff.config import to_json_dict
from minidiff.convert import sd as convert_sd
from minidiff.convert.cli import main as convert_main
from minidiff.convert.keymaps.sd_unet import LDM_BUFFERS
from minidiff.loading.model_folder import load_stable_diffusion
from minidiff.models.clip import CLIPTextConfig
from minidiff.models.tokenizer import load_clip_bpe
from minidiff.models.unet_condition import UNet2DConditionConfig
from minidiff.models.vae import AutoencoderKLConfig

ATOL = 1e-6
CA_DOWN, CA_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
# SD in miniature. layers_per_block 2, as in SD, so that input_blocks.2.1 (where the model type is read) exists.
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=4, sample_size=8, down_block_types=(CA_DOWN, "DownBlock2D"),
                 up_block_types=("UpBlock2D", CA_UP))
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77)
# SD 2's text encoder: 23 of open_clip's 24 blocks (diffusers drops "resblocks.23" by that name)
TINY_SD2_TEXT = dict(TINY_CLIP_TEXT, num_hidden_layers=23, hidden_act="gelu")
SD15 = REFERENCE_CONFIGS / "runwayml__stable-diffusion-v1-5"
SD21 = REFERENCE_CONFIGS / "stabilityai__stable-diffusion-2-1"


def convert(src: Path, dst: Path, *options: str) -> Path:
    assert convert_main([str(src), str(dst), *options]) == 0
    return dst


def fails(capsys, src: Path, dst: Path, *options: str) -> str:
    """Run the converter expecting a clean failure: exit 2, nothing at dst, no partial folder; the message."""
    assert convert_main([str(src), str(dst), *options]) == 2
    assert not dst.exists() and not dst.with_name(f".{dst.name}.partial").exists()
    return capsys.readouterr().err


def hub_tokenizer(folder: Path, pad: str, vocab: dict | None = None) -> Path:
    """A tokenizer folder in the hub layout (vocab.json, merges.txt, tokenizer_config.json and a
    special_tokens_map.json whose pad token wins, as in SD 2.x's)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    clip_vocab, merges = load_clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab or clip_vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    return folder


def random_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give a module built on the meta device CPU storage of its own dtype, filled with seeded normal values."""
    module = module.to_empty(device="cpu").requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for tensor in module.state_dict().values():
        tensor.normal_(0, 0.02, generator=g) if tensor.is_floating_point() else tensor.zero_()
    return module


def tiny_pipeline(tmp: Path, unet: dict = TINY_UNET, text: dict = TINY_CLIP_TEXT, seed: int = 0):
    torch.manual_seed(seed)
    hub_tokenizer(tmp / "vocab", "<|endoftext|>")
    return StableDiffusionPipeline(
        unet=DiffusersUNet(**unet), vae=DiffusersVAE(**TINY_VAE),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp / "vocab"),
        scheduler=DiffusersPNDM(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)  # fmt: skip


def state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    pipe = tiny_pipeline(folder)
    pipe.save_pretrained(folder / "diffusers")
    return pipe, folder / "diffusers"


# ---- diffusers pipeline folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "bin", "fp16"])
def test_pipeline_folder_converts_and_loads(tiny, tmp_path, layout):
    pipe, src = tiny
    if layout == "fp16":  # hub repos' ".fp16." variant files
        pipe = tiny_pipeline(tmp_path).to(torch.float16)
        pipe.save_pretrained(src := tmp_path / "diffusers", variant="fp16")
        assert (src / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    if layout == "bin":  # pickles, and the hub's text_model. prefix (transformers 5 always writes safetensors)
        pipe.save_pretrained(src := tmp_path / "diffusers", safe_serialization=False)
        (src / "text_encoder" / "model.safetensors").unlink()
        torch.save({"text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()},
                   src / "text_encoder" / "pytorch_model.bin")
        assert (src / "unet" / "diffusion_pytorch_model.bin").is_file()
    dst = convert(src, tmp_path / "md")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "text_encoder.safetensors", "unet.safetensors",
                                                     "vae.safetensors"]  # CLIP's own vocabulary: no tokenizer/
    config = json.loads((dst / "config.json").read_text())
    assert config["kind"] == "stable-diffusion" and config["text_encoder"]["class"] == "CLIPTextModel"
    assert config["scheduler"] == json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    assert config["tokenizer"] == {"pad_token": "<|endoftext|>", "model_max_length": 77}
    ours = load_stable_diffusion(dst)
    for name, expected in state_dicts(pipe).items():
        assert_same_tensors(getattr(ours, name).state_dict(), expected)
    assert type(ours.scheduler).__name__ == "PNDMScheduler" and ours.scheduler.config.steps_offset == 1
    assert type(load_stable_diffusion(dst, scheduler="ddim").scheduler).__name__ == "DDIMScheduler"


def test_dtype_option_casts_every_component(tiny, tmp_path):
    pipe, src = tiny
    ours = load_stable_diffusion(convert(src, tmp_path / "md", "--dtype", "bf16"))
    for name, expected in state_dicts(pipe).items():
        assert_same_tensors(getattr(ours, name).state_dict(), {k: v.bfloat16() for k, v in expected.items()})


def test_sd2_tokenizer_scheduler_and_text_outputs(tiny, tmp_path):
    """SD 2.x's hub tokenizer folder: special_tokens_map.json's pad "!" wins over tokenizer_config.json's."""
    pipe, src = tiny
    shutil.copytree(src, tmp_path / "sd2")
    hub_tokenizer(tmp_path / "sd2" / "tokenizer", pad="!")
    scheduler = json.loads((SD21 / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "sd2" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    ours = load_stable_diffusion(convert(tmp_path / "sd2", tmp_path / "md"))
    assert ours.tokenizer.pad_token == "!" and ours.tokenizer.pad_token_id == 0
    assert type(ours.scheduler).__name__ == "DDIMScheduler" and ours.scheduler.config.prediction_type == "v_prediction"
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "sd2" / "tokenizer")
    prompts = ["a photo of an astronaut riding a horse", "a cat"]
    expected = theirs(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids = ours.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected) and (ids[1, 4:] == 0).all()
    with torch.no_grad():
        diff = (ours.text_encoder(ids).last_hidden_state - pipe.text_encoder(ids).last_hidden_state).abs().max()
    assert diff <= ATOL


def test_own_vocabulary_and_added_tokens_are_kept(tiny, tmp_path):
    """A vocabulary that is not CLIP's own is copied into DST/tokenizer/; a textual-inversion token is listed."""
    pipe, src = tiny
    shutil.copytree(src, tmp_path / "custom")
    vocab, _ = load_clip_bpe()
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(hub_tokenizer(tmp_path / "files", "!", vocab))
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(tmp_path / "custom" / "tokenizer")  # transformers 5: tokenizer.json only
    ours = load_stable_diffusion(convert(tmp_path / "custom", tmp_path / "md"))
    config = json.loads((tmp_path / "md" / "config.json").read_text())
    assert config["tokenizer"] == {"pad_token": "!", "model_max_length": 77, "added_tokens": ["<cat-toy>"]}
    assert sorted(p.name for p in (tmp_path / "md" / "tokenizer").iterdir()) == ["merges.txt", "vocab.json"]
    prompt = "a cat and a dog with <cat-toy>"
    assert ours.tokenizer(prompt, padding="max_length").input_ids == tokenizer(prompt, padding="max_length").input_ids
    assert ours.tokenizer.convert_tokens_to_ids("<cat-toy>") == 49408


# ---- original single-file checkpoints -----------------------------------------------------------------------------


def ldm_checkpoint(pipe, open_clip_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's tensors in the original LatentDiffusion layout, with LDM's bookkeeping buffers. SD 1.x keeps
    the text encoder in transformers' names; SD 2.x (open_clip_blocks) in open_clip's, with one more block
    (open_clip_blocks - 1 is what SD uses) and the unused text_projection and logit_scale."""
    unet, vae, text = state_dicts(pipe).values()
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, dict(pipe.unet.config)).items()}
    checkpoint |= vae_to_ldm(vae, len(pipe.vae.config.block_out_channels), prefix="first_stage_model.")
    if open_clip_blocks is None:
        checkpoint |= {"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()}
        checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        text = {"text_model." + k: v for k, v in text.items()}
        last = open_clip_blocks - 2
        text |= {k.replace(f".layers.{last}.", f".layers.{last + 1}."): v + 1 for k, v in text.items()
                 if f".layers.{last}." in k}  # the block SD 2 does not use: different values
        width = pipe.text_encoder.config.hidden_size
        text |= {"text_projection.weight": torch.ones(width, width), "logit_scale": torch.tensor(4.6)}
        checkpoint |= {"cond_stage_model.model." + k: v.contiguous() for k, v in to_open_clip(text).items()}
    schedule = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    checkpoint |= {name: schedule.float() for name in LDM_BUFFERS[:-2]}
    checkpoint |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}
    return checkpoint


def test_sd15_single_file_and_pipeline_folder_convert_to_identical_tensors(tmp_path):
    """The issue's check, at SD 1.5's real architecture (1.07B parameters, fp16 to halve the memory): a
    pipeline saved by diffusers (with the hub's config files) and the same weights as an original single file
    convert to identical tensors and the same config."""
    configs = {name: json.loads((SD15 / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        unet, vae = DiffusersUNet.from_config(configs["unet"]), DiffusersVAE.from_config(configs["vae"])
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(configs["text_encoder"]))
    pipe = StableDiffusionPipeline(
        unet=random_init(unet.half(), 0), vae=random_init(vae.half(), 1), text_encoder=random_init(text.half(), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(hub_tokenizer(tmp_path / "vocab", "<|endoftext|>")),
        scheduler=DiffusersPNDM.from_pretrained(SD15 / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)  # fmt: skip
    src = tmp_path / "stable-diffusion-v1-5"
    pipe.save_pretrained(src)
    for config in SD15.glob("**/*.json"):  # the hub's own config files, as a download has them
        shutil.copy(config, src / config.relative_to(SD15))
    shutil.copy(tmp_path / "vocab" / "vocab.json", src / "tokenizer")
    shutil.copy(tmp_path / "vocab" / "merges.txt", src / "tokenizer")
    (src / "tokenizer" / "tokenizer.json").unlink()

    checkpoint = ldm_checkpoint(pipe)
    assert infer_diffusers_model_type(checkpoint) == "v1"
    expected = state_dicts(pipe)
    assert_same_tensors(convert_ldm_unet_checkpoint(dict(checkpoint), configs["unet"]), expected["unet"])
    assert_same_tensors(convert_ldm_vae_checkpoint(dict(checkpoint), configs["vae"]), expected["vae"])
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(dict(checkpoint)).items()}
    assert_same_tensors({k: v for k, v in text.items() if k != "embeddings.position_ids"}, expected["text_encoder"])
    safetensors.torch.save_file(checkpoint, tmp_path / "v1-5.safetensors")
    del checkpoint, pipe

    from_folder = convert(src, tmp_path / "from-folder")
    from_file = convert(tmp_path / "v1-5.safetensors", tmp_path / "from-file")
    a, b = (json.loads((folder / "config.json").read_text()) for folder in (from_folder, from_file))
    hub_scheduler = {k: v for k, v in a.pop("scheduler").items() if k != "_diffusers_version"}
    assert b.pop("scheduler") == hub_scheduler and a.pop("source") != b.pop("source") and a == b
    for name, tensors in expected.items():
        with safe_open(from_folder / f"{name}.safetensors", "pt") as f, safe_open(
                from_file / f"{name}.safetensors", "pt") as g:
            assert sorted(f.keys()) == sorted(g.keys()) == sorted(tensors)
            assert all(torch.equal(f.get_tensor(k), tensors[k]) and torch.equal(g.get_tensor(k), tensors[k])
                       for k in tensors)


@pytest.fixture
def tiny_tables(monkeypatch):
    """SD_CONFIGS for SD in miniature: the tiny VAE and text encoder, head counts that fit the tiny UNet."""
    for name, table in convert_sd.SD_CONFIGS.items():
        unet = {**table["unet"], "attention_head_dim": [2, 4] if "v2" in name else 4}
        vae = {**TINY_VAE, "sample_size": table["vae"]["sample_size"]}
        text = {**table["text_encoder"], **(TINY_SD2_TEXT if "v2" in name else TINY_CLIP_TEXT)}
        monkeypatch.setitem(convert_sd.SD_CONFIGS, name, {**table, "unet": unet, "vae": vae, "text_encoder": text})


TINY_SD2_UNET = dict(TINY_UNET, cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True)


def test_sd2_single_file_v_prediction_open_clip_text(tmp_path, tiny_tables, capsys):
    pipe = tiny_pipeline(tmp_path, unet=TINY_SD2_UNET, text=TINY_SD2_TEXT)
    checkpoint = ldm_checkpoint(pipe, open_clip_blocks=24)
    assert infer_diffusers_model_type(checkpoint) == "v2"
    theirs = convert_open_clip_checkpoint(None, dict(checkpoint))  # diffusers drops the last block by name too
    assert_same_tensors({k.removeprefix("text_model."): v for k, v in theirs.items()}, pipe.text_encoder.state_dict())
    safetensors.torch.save_file(checkpoint, tmp_path / "v2.safetensors")
    ours = load_stable_diffusion(convert(tmp_path / "v2.safetensors", tmp_path / "md"))
    assert "detected 'v2'" in capsys.readouterr().out
    for name, expected in state_dicts(pipe).items():
        assert_same_tensors(getattr(ours, name).state_dict(), expected)
    config = json.loads((tmp_path / "md" / "config.json").read_text())
    assert config["scheduler"]["prediction_type"] == "v_prediction" and config["tokenizer"]["pad_token"] == "!"
    assert (config["unet"]["config"]["sample_size"], config["vae"]["config"]["sample_size"]) == (96, 768)
    assert config["unet"]["config"]["upcast_attention"] and config["text_encoder"]["config"]["num_hidden_layers"] == 23

    # The 512-px base model: a .ckpt whose global_step is 875000 (diffusers' tell), or the options
    torch.save({"state_dict": checkpoint, "global_step": 875000}, tmp_path / "512-base-ema.ckpt")
    convert(tmp_path / "512-base-ema.ckpt", tmp_path / "base")
    convert(tmp_path / "v2.safetensors", tmp_path / "options", "--prediction-type", "epsilon", "--image-size", "512",
            "--no-upcast-attention")
    for folder in ("base", "options"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        unet = config["unet"]["config"]
        assert config["scheduler"].get("prediction_type") == "epsilon" and not unet["upcast_attention"]
        assert unet["sample_size"] == 64
        assert_same_tensors(safetensors.torch.load_file(tmp_path / folder / "unet.safetensors"), pipe.unet.state_dict())


def test_ema_weights_and_inpainting(tmp_path, tiny_tables, capsys):
    pipe = tiny_pipeline(tmp_path, unet=dict(TINY_UNET, in_channels=9, cross_attention_dim=768),
                         text=dict(TINY_CLIP_TEXT))
    checkpoint = ldm_checkpoint(pipe)
    ema = {k: v + 1 for k, v in pipe.unet.state_dict().items()}
    for key, value in unet_to_ldm(ema, dict(pipe.unet.config)).items():  # LitEma: dots removed
        checkpoint["model_ema." + f"diffusion_model.{key}".replace(".", "")] = value
    assert infer_diffusers_model_type(checkpoint) == "inpainting"
    safetensors.torch.save_file(checkpoint, tmp_path / "inpainting.safetensors")
    plain = load_stable_diffusion(convert(tmp_path / "inpainting.safetensors", tmp_path / "plain"))
    assert "pass --ema" in capsys.readouterr().out
    assert_same_tensors(plain.unet.state_dict(), pipe.unet.state_dict())
    assert plain.unet.config.in_channels == 9 and type(plain.scheduler).__name__ == "DDIMScheduler"
    assert_same_tensors(load_stable_diffusion(convert(tmp_path / "inpainting.safetensors", tmp_path / "ema",
                                                      "--ema")).unet.state_dict(), ema)


@pytest.mark.parametrize("width, channels, expected", [(768, 4, "v1"), (768, 9, "inpainting"), (1024, 4, "v2"),
                                                       (1024, 9, "inpainting_v2")])
def test_model_type_detection_as_diffusers(width, channels, expected):
    checkpoint = {convert_sd.CONV_IN: torch.empty(320, channels, 3, 3, device="meta"),
                  convert_sd.CROSS_ATTENTION: torch.empty(320, width, device="meta")}
    assert convert_sd.detect_model_type(checkpoint) == infer_diffusers_model_type(checkpoint) == expected


def test_sd21_full_size_single_file_on_meta_tensors():
    """SD 2.1's real layout (a 24-block open_clip text tower, Linear projections) on meta tensors: detection, the
    whole-file bookkeeping and the configs, which must be the hub's own."""
    configs = {name: json.loads((SD21 / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        pipe = SimpleNamespace(unet=DiffusersUNet.from_config(configs["unet"]), vae=DiffusersVAE.from_config(
            configs["vae"]), text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(
                configs["text_encoder"])))  # fmt: skip
    checkpoint = ldm_checkpoint(pipe, open_clip_blocks=24)
    assert convert_sd.detect_model_type(checkpoint) == infer_diffusers_model_type(checkpoint) == "v2"
    config, components = convert_sd.single_file_components(checkpoint, "v2")
    for name, expected in state_dicts(pipe).items():
        assert {k: v.shape for k, v in components[name].items()} == {k: v.shape for k, v in expected.items()}
    readers = {"unet": UNet2DConditionConfig, "vae": AutoencoderKLConfig, "text_encoder": CLIPTextConfig}
    for name, reader in readers.items():
        assert config[name]["config"] == to_json_dict(reader.from_dict(configs[name])), name
    scheduler = json.loads((SD21 / "scheduler" / "scheduler_config.json").read_text())
    assert config["scheduler"] == {k: v for k, v in scheduler.items() if k != "_diffusers_version"}
    assert config["tokenizer"]["pad_token"] == "!"


BOOKKEEPING = {"architectures", "model_type", "torch_dtype", "transformers_version"}


@pytest.mark.parametrize("name", sorted(convert_sd.SD_CONFIGS))
def test_known_model_tables_are_the_hub_configs(name):
    table = convert_sd.SD_CONFIGS[name]
    hub = REFERENCE_CONFIGS / table["hub"].replace("/", "__")

    def read(path: str) -> dict:
        return {k: v for k, v in json.loads((hub / path).read_text()).items() if k[0] != "_" and k not in BOOKKEEPING}

    assert table["unet"] == read("unet/config.json") and table["vae"] == read("vae/config.json")
    assert table["text_encoder"] == read("text_encoder/config.json")
    scheduler = json.loads((hub / "scheduler" / "scheduler_config.json").read_text())
    assert table["scheduler"] == {k: v for k, v in scheduler.items() if k != "_diffusers_version"}
    assert table["tokenizer"] == {"pad_token": read("tokenizer/special_tokens_map.json")["pad_token"],
                                  "model_max_length": read("tokenizer/tokenizer_config.json")["model_max_length"]}
