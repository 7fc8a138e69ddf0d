"""A simulated Hugging Face cache holding every hub id the course notebooks load, as tiny random-init models.

Each repository is laid out as huggingface_hub leaves a download (huggingface_hub file_download.py):

    <HF_HOME>/hub/models--ORG--NAME/
        refs/main                     the 40-hex commit hash "main" points at
        snapshots/<commit>/<files>    symlinks into blobs/, named as in the repository
        blobs/<sha256 or git sha1>    the file contents (sha256 for weight files, stored in LFS; git's blob sha1 else)

The files are what diffusers' and transformers' save_pretrained write (config.json, *.safetensors), with the
real repositories' model_index.json, scheduler_config.json and tokenizer configs (tests/reference_configs, byte
for byte) and CLIP's real 49,408-token vocabulary (minidiff's shipped BPE, equal to open_clip's:
tests/test_tokenizer.py). The model configs are the real ones with their sizes shrunk (TINY_* below) so that a
notebook runs in seconds on a CPU; every other key (flip_sin_to_cos, freq_shift, use_linear_projection, hidden_act,
...) stays as the hub has it. The google/ddpm and johnowhitaker repositories are flat, as on the hub: the UNet's
and the scheduler's files sit at the root next to model_index.json (unit 2 cell 22 uploads a pipeline that way).

With HF_HOME pointing here and HF_HUB_OFFLINE=1, diffusers and transformers read these repositories by
themselves, and minidiff's from_pretrained reads the same folders (minidiff/loading/hf_cache.py).
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

from minidiff.models.tokenizer import load_clip_bpe

REFERENCE_CONFIGS = Path(__file__).resolve().parent.parent / "reference_configs"

# google/ddpm-celebahq-256's flags (tests/reference_configs/RECONSTRUCTED.md) on one level of 8 channels, with
# the mid block's single-head attention. sample_size 8, not 256: DDPMPipeline.__call__ samples at sample_size for
# 1000 steps by default (unit 2 cell 6), and a call to this UNet costs ~8 ms however small it is.
TINY_DDPM_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8,),
    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=4,
)  # fmt: skip
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True, variance_type="fixed_small", prediction_type="epsilon")
# Two levels (cross-attention on the lower one), so a notebook's 64x64 latents cost ~30 ms per UNet call.
TINY_SD_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
# Four levels, as SD's: 8x smaller latents per side, so the notebooks' `height // 8` latents decode to their images.
TINY_VAE = dict(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
# SD 2.x keeps its 1024-wide text embeddings: unit 3 cell 12 feeds the UNet torch.randn(1, 77, 1024).
TINY_TEXT_SD2 = dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=32)
# A CLIPImageProcessor as SD's feature_extractor/preprocessor_config.json has it (OpenAI's CLIP preprocessing).
PREPROCESSOR = dict(crop_size=224, do_center_crop=True, do_convert_rgb=True, do_normalize=True, do_resize=True,
                    feature_extractor_type="CLIPFeatureExtractor", image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)


def build(hf_home: Path) -> Path:
    """Write every repository the notebooks load under hf_home/hub; returns hf_home."""
    stage = hf_home / "stage"
    ddpm_repo(stage / "celebahq", seed=0)
    install(hf_home, "google/ddpm-celebahq-256", stage / "celebahq")
    ddpm_repo(stage / "wikiart", seed=1)
    install(hf_home, "johnowhitaker/sd-class-wikiart-from-bedrooms", stage / "wikiart")
    sd_repo(stage / "sd21base", "stabilityai__stable-diffusion-2-1-base", TINY_TEXT_SD2, seed=2)
    install(hf_home, "stabilityai/stable-diffusion-2-1-base", stage / "sd21base")
    sd_repo(stage / "inpainting", "runwayml__stable-diffusion-inpainting", TINY_TEXT, seed=3, unet=dict(sample_size=8))
    install(hf_home, "runwayml/stable-diffusion-inpainting", stage / "inpainting")
    sd_repo(stage / "sd14", "CompVis__stable-diffusion-v1-4", TINY_TEXT, seed=4, parts=("unet", "vae", "scheduler"))
    install(hf_home, "CompVis/stable-diffusion-v1-4", stage / "sd14")
    clip_repo(stage / "clip", seed=5)
    install(hf_home, "openai/clip-vit-large-patch14", stage / "clip")
    shutil.rmtree(stage)
    return hf_home


# ---------------------------------------------------------------------------------------------- repositories


def ddpm_repo(folder: Path, seed: int) -> None:
    """The flat layout: config.json, diffusion_pytorch_model.safetensors, scheduler_config.json, model_index.json."""
    torch.manual_seed(seed)
    UNet2DModel(**TINY_DDPM_UNET).save_pretrained(folder)
    DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(folder)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.0.4",
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def sd_repo(folder: Path, reference: str, text: dict, seed: int, unet: dict | None = None,
            parts=("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")):
    """A Stable Diffusion repository: the real model_index.json, scheduler and tokenizer configs; tiny models."""
    real = REFERENCE_CONFIGS / reference
    index = json.loads((real / "model_index.json").read_text())
    folder.mkdir(parents=True)
    shutil.copy(real / "model_index.json", folder / "model_index.json")
    torch.manual_seed(seed)
    text_config = read(real / "text_encoder" / "config.json") if (real / "text_encoder").is_dir() else {}
    width = text.get("hidden_size", 32)
    if "unet" in parts:
        config = read(real / "unet" / "config.json")
        heads = config["attention_head_dim"]
        config.update(TINY_SD_UNET, cross_attention_dim=width, **(unet or {}),
                      attention_head_dim=[2, 2] if isinstance(heads, list) else 2)
        UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    if "vae" in parts:
        AutoencoderKL.from_config({**read(real / "vae" / "config.json"), **TINY_VAE}).save_pretrained(folder / "vae")
    if "text_encoder" in parts:
        config = transformers.CLIPTextConfig(**{**text_config, **text})
        transformers.CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    if "tokenizer" in parts:
        tokenizer_files(real / "tokenizer", folder / "tokenizer")
    if "scheduler" in parts:
        shutil.copytree(real / "scheduler", folder / "scheduler")
    if "safety_checker" in parts and index["safety_checker"][0] is not None:
        # A random CLIP vision tower: its cosine scores stay below the concept thresholds, so it flags nothing.
        config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
        StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker")
    if "feature_extractor" in parts:
        (folder / "feature_extractor").mkdir()
        (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))


def clip_repo(folder: Path, seed: int) -> None:
    """openai/clip-vit-large-patch14: a whole CLIPModel (CLIPTextModel.from_pretrained takes its text half)."""
    real = REFERENCE_CONFIGS / "openai__clip-vit-large-patch14"
    text_config = read(real / "config.json")["text_config"]
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config={**text_config, **TINY_TEXT}, vision_config=TINY_VISION,
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer_files(real, folder)


def tokenizer_files(configs: Path, folder: Path) -> None:
    """vocab.json and merges.txt as transformers writes them, next to the repository's own tokenizer configs."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(configs / name, folder / name)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ the cache


def install(hf_home: Path, repo_id: str, files: Path) -> Path:
    """Move a folder's files into the cache as one commit of `repo_id`; returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex name: a stand-in for the hub's commit
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / blob_name(path.name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def blob_name(name: str, data: bytes) -> str:
    """LFS files (weights) are stored under their sha256, others under git's blob sha1."""
    if name.endswith((".safetensors", ".bin")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
