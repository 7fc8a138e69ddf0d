"""Stable Diffusion 1.x / 2.x -> a minidiff "stable-diffusion" folder, from the two layouts users bring.

1. A diffusers pipeline folder (model_index.json; unet/, vae/, text_encoder/, tokenizer/, scheduler/): every
   component says its own config, so this is a matter of reading each and checking its weights strictly.
   safety_checker and feature_extractor are not part of minidiff's Stable Diffusion and are skipped by name.
2. An original single-file checkpoint (sd-v1-5.ckpt, v2-1_768-ema-pruned.safetensors, ...): the whole
   LatentDiffusion model under model.diffusion_model. (UNet), first_stage_model. (VAE) and cond_stage_model.
   (text encoder), plus training bookkeeping. The weights tell the architecture only in part (see
   minidiff/convert/keymaps/sd_unet.py:ldm_unet_config); the rest comes from SD_CONFIGS, the hub configs of the model
   the weights are detected to be, as diffusers does (loaders/single_file_utils.py: infer_diffusers_model_type,
   then the configs of DIFFUSERS_DEFAULT_PIPELINE_PATHS, which diffusers downloads and minidiff ships):

       cross-attention width (attn2.to_k)  UNet inputs  model            configs of
       768  (CLIP ViT-L/14 text)           4            "v1"             runwayml/stable-diffusion-v1-5
       768                                 9            "inpainting"     runwayml/stable-diffusion-inpainting
       1024 (open_clip ViT-H/14 text)      4            "v2"             stabilityai/stable-diffusion-2-1
       1024                                9            "inpainting_v2"  stabilityai/stable-diffusion-2-inpainting

   SD 2.x 768-px (v-prediction) and 512-px base (epsilon) checkpoints have the same weights layout: like
   diffusers, minidiff assumes the 768-v model unless the .ckpt's global_step is 875000 (512-base-ema.ckpt),
   and says so; --prediction-type, --image-size and --upcast-attention set those three explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minidiff.config import to_json_dict
from minidiff.convert.components import read_component
from minidiff.convert.keymaps.clip import SD1_PREFIX, SD2_PREFIX, text_encoder_from_sd
from minidiff.convert.keymaps.sd_unet import (
    LDM_BUFFERS,
    LDM_UNET_PREFIX,
    ldm_unet_config,
    ldm_unet_source_keys,
    unet_condition_from_ldm,
)
from minidiff.convert.keymaps.vae import vae_from_ldm
from minidiff.convert.sources import (
    ConversionError,
    Converted,
    read_checkpoint,
    read_json,
    read_tokenizer,
    with_source,
)
from minidiff.loading.model_folder import ModelFolder, Vocabulary
from minidiff.loading.strict import key_listing
from minidiff.models.clip import CLIPTextConfig
from minidiff.models.unet_condition import UNet2DConditionConfig
from minidiff.models.vae import AutoencoderKLConfig
from minidiff.schedulers import SCHEDULERS

# ---- the hub configs of the known models --------------------------------------------------------------------
# Copied from the hub repos' config files (byte-exact copies in tests/reference_configs, which
# tests/test_convert_sd.py compares with these), without the bookkeeping keys (_diffusers_version, _name_or_path,
# architectures, ...; the scheduler keeps _class_name, which names its class). Components keep their config.json
# field names, so each dict also builds the diffusers / transformers model.

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD1_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=_DOWN, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
    sample_size=64, up_block_types=_UP,
)  # fmt: skip
_SD2_UNET = dict(  # stabilityai/stable-diffusion-2-inpainting unet/config.json (in_channels 9 there)
    _SD1_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
    use_linear_projection=True,
)  # fmt: skip
_SD21_UNET = dict(_SD2_UNET, num_class_embeds=None, only_cross_attention=False)  # stable-diffusion-2-1-base's
_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json; the others differ in sample_size only
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip
_SD1_TEXT = dict(  # runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14's text)
    attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2, hidden_act="quick_gelu", hidden_size=768,
    initializer_factor=1.0, initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
    max_position_embeddings=77, num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768,
    vocab_size=49408,
)  # fmt: skip
_SD2_TEXT = dict(  # stabilityai/stable-diffusion-2-1 text_encoder/config.json: open_clip ViT-H/14 minus its last block
    _SD1_TEXT, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
    num_hidden_layers=23, projection_dim=512,
)  # fmt: skip
_SCHEDULE = dict(  # every SD 1.x/2.x scheduler_config.json; prediction_type is absent (epsilon) unless given
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)  # fmt: skip
_SD1_TOKENIZER = {"pad_token": "<|endoftext|>", "model_max_length": 77}  # special_tokens_map.json's pad token
_SD2_TOKENIZER = {"pad_token": "!", "model_max_length": 77}  # "!" (id 0): open_clip pads with zeros

SD_CONFIGS = {
    "v1": dict(hub="runwayml/stable-diffusion-v1-5", unet=_SD1_UNET, vae=_VAE, text_encoder=_SD1_TEXT,
               tokenizer=_SD1_TOKENIZER, scheduler={"_class_name": "PNDMScheduler", **_SCHEDULE}),
    "inpainting": dict(hub="runwayml/stable-diffusion-inpainting", unet=dict(_SD1_UNET, in_channels=9),
                       vae=dict(_VAE, sample_size=256), text_encoder=_SD1_TEXT, tokenizer=_SD1_TOKENIZER,
                       scheduler={"_class_name": "DDIMScheduler", **_SCHEDULE}),
    "v2": dict(hub="stabilityai/stable-diffusion-2-1", unet=dict(_SD21_UNET, sample_size=96, upcast_attention=True),
               vae=dict(_VAE, sample_size=768), text_encoder=_SD2_TEXT, tokenizer=_SD2_TOKENIZER,
               scheduler={"_class_name": "DDIMScheduler", **_SCHEDULE, "prediction_type": "v_prediction"}),
    "v2_base": dict(hub="stabilityai/stable-diffusion-2-1-base", unet=_SD21_UNET, vae=dict(_VAE, sample_size=768),
                    text_encoder=_SD2_TEXT, tokenizer=_SD2_TOKENIZER,
                    scheduler={"_class_name": "PNDMScheduler", **_SCHEDULE, "prediction_type": "epsilon"}),
    "inpainting_v2": dict(hub="stabilityai/stable-diffusion-2-inpainting", unet=dict(_SD2_UNET, in_channels=9),
                          vae=_VAE, text_encoder=_SD2_TEXT, tokenizer=_SD2_TOKENIZER,
                          scheduler={"_class_name": "PNDMScheduler", **_SCHEDULE}),
}
# What an LDM UNet's weights do not tell (minidiff/convert/keymaps/sd_unet.py:ldm_unet_config infers the rest).
UNET_NOT_IN_WEIGHTS = ("attention_head_dim", "sample_size", "upcast_attention")
# Where diffusers' single-file loader looks to tell the models apart (CHECKPOINT_KEY_NAMES).
CONV_IN = LDM_UNET_PREFIX + "input_blocks.0.0.weight"
CROSS_ATTENTION = LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' tell for stabilityai's 512-base-ema.ckpt (epsilon prediction)
# A diffusers SD pipeline's components and the classes model_index.json may name (any scheduler: see below).
PIPELINE_COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                       "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "scheduler": ()}
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor")  # diffusers pipeline parts minidiff does not use


def _sd_config(source: str, unet: UNet2DConditionConfig, vae: AutoencoderKLConfig, text: CLIPTextConfig,
               tokenizer: dict, scheduler: dict) -> dict:
    return {
        "kind": "stable-diffusion",
        "source": source,
        "unet": {"class": "UNet2DConditionModel", "config": to_json_dict(unet)},
        "vae": {"class": "AutoencoderKL", "config": to_json_dict(vae)},
        "text_encoder": {"class": "CLIPTextModel", "config": to_json_dict(text)},
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _converted(config: dict, components: dict[str, dict[str, torch.Tensor]], vocabulary: Vocabulary | None,
               location: str, notes: list[str]) -> Converted:
    sizes = ", ".join(f"{name} {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M"
                      for name, tensors in components.items())
    return Converted(ModelFolder(config, components, vocabulary, location), f"Stable Diffusion ({sizes} parameters)",
                     notes)


# ---- 1. diffusers pipeline folders ---------------------------------------------------------------------------


def is_sd_pipeline(index: dict) -> bool:
    """Whether a model_index.json describes a text-to-image latent diffusion pipeline (not a pixel DDPM)."""
    return "text_encoder" in index or "vae" in index


def read_sd_pipeline(src: Path, variant: str | None = None) -> Converted:
    """A diffusers Stable Diffusion pipeline folder, converted in memory; `variant` picks e.g. the ".fp16."
    weights files."""
    index = read_json(src / "model_index.json")
    for name, value in index.items():  # {"unet": ["diffusers", "UNet2DConditionModel"], "_class_name": ..., ...}
        if name.startswith("_") or not isinstance(value, list) or value[-1] is None or name in IGNORED_COMPONENTS:
            continue
        if name not in PIPELINE_COMPONENTS:
            raise ConversionError(f"{src}/model_index.json: component {name} ({value[-1]}) is not part of "
                                  "Stable Diffusion 1.x/2.x as minidiff implements it")
        if PIPELINE_COMPONENTS[name] and value[-1] not in PIPELINE_COMPONENTS[name]:
            raise ConversionError(f"{src}/model_index.json: {name} is a {value[-1]}, not the "
                                  f"{PIPELINE_COMPONENTS[name][0]} of Stable Diffusion 1.x/2.x")
    missing = [f"{name}/" for name in PIPELINE_COMPONENTS if not (src / name).is_dir()]
    if missing:
        raise ConversionError(f"{src}: no {', '.join(missing)} folder: not a whole Stable Diffusion pipeline")

    parts = {name: read_component(src / name, PIPELINE_COMPONENTS[name][0], variant)
             for name in ("unet", "vae", "text_encoder")}
    text_config = parts["text_encoder"].config
    tokenizer, vocabulary = read_tokenizer(src / "tokenizer", text_config.max_position_embeddings)
    scheduler = read_json(src / "scheduler" / "scheduler_config.json")
    config = _sd_config(str(src.resolve()), parts["unet"].config, parts["vae"].config, text_config, tokenizer,
                        scheduler)
    vocabulary_note = "its own vocabulary (copied)" if vocabulary else "CLIP's vocabulary"
    notes = [f"scheduler {scheduler.get('_class_name')}; tokenizer pads with {tokenizer['pad_token']!r}, "
             f"{vocabulary_note}"]
    if scheduler.get("_class_name") not in {cls.__name__ for cls in SCHEDULERS.values()}:
        notes.append(f"minidiff has no {scheduler.get('_class_name')}: load with scheduler= one of "
                     f"{', '.join(SCHEDULERS)} (the folder's noise schedule is kept)")
    components = {name: part.state_dict for name, part in parts.items()}
    return _converted(config, components, vocabulary, str(src), notes)


# ---- 2. original single-file checkpoints ---------------------------------------------------------------------


def detect_model_type(checkpoint: dict[str, torch.Tensor], global_step: object = None) -> str:
    """The SD_CONFIGS entry an original single-file checkpoint is, from its weights (diffusers'
    infer_diffusers_model_type for SD 1.x/2.x); a ValueError naming what it holds if it is none of them."""
    if CONV_IN not in checkpoint or CROSS_ATTENTION not in checkpoint:
        prefixes = sorted({k.split(".")[0] + "." for k in checkpoint if "." in k}) or sorted(checkpoint)[:5]
        hint = ""
        if any(k.startswith(("transformer.resblocks.", "visual.")) for k in checkpoint):
            hint = " (it looks like an open_clip / OpenAI CLIP state dict: pass --clip-config)"
        raise ValueError(f"not a Stable Diffusion checkpoint minidiff knows (SD 1.x, 2.x and their inpainting "
                         f"models): it has no {CROSS_ATTENTION}; its keys start with {', '.join(prefixes)}{hint}")
    width, in_channels = checkpoint[CROSS_ATTENTION].shape[-1], checkpoint[CONV_IN].shape[1]
    if width not in (768, 1024) or in_channels not in (4, 9):
        raise ValueError(f"not a Stable Diffusion checkpoint minidiff knows: cross-attention width {width} (SD 1.x: "
                         f"768, SD 2.x: 1024), {in_channels} UNet input channels (4, or 9 for inpainting)")
    if in_channels == 9:
        return "inpainting_v2" if width == 1024 else "inpainting"
    if width == 1024:
        return "v2_base" if global_step == SD2_BASE_GLOBAL_STEP else "v2"
    return "v1"


def single_file_components(
    checkpoint: dict[str, torch.Tensor],
    model_type: str,
    prediction_type: str | None = None,
    image_size: int | None = None,
    upcast_attention: bool | None = None,
    use_ema: bool = False,
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """An original single-file checkpoint -> ({unet, vae, text_encoder, tokenizer, scheduler} config sections,
    {component: minidiff state dict}), with the configs of SD_CONFIGS[model_type] and the three overrides.

    Strict over the whole file: every tensor is used (UNet, VAE, text encoder) or dropped by name (the UNet's
    EMA copies unless use_ema, LDM_BUFFERS, SD 2's last text block and text_projection); any other key is a
    ValueError that lists it."""
    known = SD_CONFIGS[model_type]
    unet_known = {k: known["unet"][k] for k in UNET_NOT_IN_WEIGHTS if k in known["unet"]}
    vae_json, scheduler = dict(known["vae"]), dict(known["scheduler"])
    if image_size is not None:
        unet_known["sample_size"], vae_json["sample_size"] = image_size // 8, image_size
    if upcast_attention is not None:
        unet_known["upcast_attention"] = upcast_attention
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type

    accounted = {*ldm_unet_source_keys(checkpoint), *LDM_BUFFERS}
    accounted |= {k for k in checkpoint if k.startswith(("first_stage_model.", SD1_PREFIX, SD2_PREFIX))}
    unknown = [k for k in checkpoint if k not in accounted]
    if unknown:
        raise ValueError(f"{len(unknown)} tensors that are not part of an SD UNet, VAE or text encoder, nor "
                         f"bookkeeping minidiff drops by name:{key_listing(unknown)}")
    where = f"with the configs of {known['hub']}"
    unet_config = with_source(f"the UNet {where}", lambda: ldm_unet_config(checkpoint, **unet_known))
    vae_config = AutoencoderKLConfig.from_dict(vae_json)
    text_config = CLIPTextConfig.from_dict(known["text_encoder"])
    components = {
        "unet": with_source(f"the UNet {where}", unet_condition_from_ldm, checkpoint, unet_config, use_ema),
        "vae": with_source(f"the VAE (first_stage_model.*) {where}", vae_from_ldm, checkpoint, vae_config),
        "text_encoder": with_source(f"the text encoder (cond_stage_model.*) {where}", text_encoder_from_sd, checkpoint,
                                 text_config),
    }
    return _sd_config("", unet_config, vae_config, text_config, dict(known["tokenizer"]), scheduler), components


def read_single_file(
    path: Path,
    prediction_type: str | None = None,
    image_size: int | None = None,
    upcast_attention: bool | None = None,
    use_ema: bool = False,
) -> Converted:
    """An original single-file SD checkpoint (.safetensors, or a .ckpt read weights-only), converted in memory;
    the notes say which model the weights were taken to be and what was assumed."""
    if image_size is not None and (image_size <= 0 or image_size % 8):
        raise ConversionError(f"--image-size {image_size}: must be a positive multiple of 8 (512, 768)")
    checkpoint, others = read_checkpoint(path)
    model_type = with_source(str(path), detect_model_type, checkpoint, others.get("global_step"))
    config, components = with_source(str(path), single_file_components, checkpoint, model_type, prediction_type,
                                     image_size, upcast_attention, use_ema)
    hub = SD_CONFIGS[model_type]["hub"]
    config["source"] = f"{path.resolve()} (original single-file checkpoint; configs of {hub})"

    unet = config["unet"]["config"]
    notes = [f"detected {model_type!r} from the weights, so the configs of {hub}: "
             f"{config['scheduler'].get('prediction_type', 'epsilon')} prediction, {unet['sample_size'] * 8} px, "
             f"upcast_attention {unet['upcast_attention']}, tokenizer pads with {config['tokenizer']['pad_token']!r}"]
    if model_type in ("v2", "v2_base"):
        notes.append("SD 2.x 768-v and 512-base checkpoints look alike: for the other one pass --prediction-type, "
                     "--image-size and --[no-]upcast-attention")
    has_ema = any(k.startswith("model_ema.") and k not in LDM_BUFFERS for k in checkpoint)
    if has_ema:
        notes.append("UNet: the EMA weights" if use_ema else "the file also holds EMA weights: pass --ema to use them")
    return _converted(config, components, None, str(path), notes)
