"""CLIP key maps: transformers, open_clip / OpenAI and Stable Diffusion checkpoints to minidiff/models/clip.py's names,
strictly (see minidiff/loading/strict.py).

minidiff's CLIP modules carry transformers' names, so a transformers state dict loads by identity once two
things are handled: the `text_model.` / `vision_model.` prefix (hub files of CLIPTextModel and CLIPVisionModel
carry it; transformers 5 in-memory models, flattened, do not; the *WithProjection classes and CLIPModel keep it)
and the `position_ids` buffers (constants, dropped by name). A tower class also loads from a bigger model's
weights, as in transformers (CLIPTextModel.from_pretrained("openai/clip-vit-large-patch14") takes a CLIPModel's
text tower): clip_tower.

open_clip and OpenAI CLIP name things differently and store two things in another layout:

    open_clip / OpenAI                          minidiff CLIPModel
    token_embedding.weight                      text_model.embeddings.token_embedding.weight
    positional_embedding                        text_model.embeddings.position_embedding.weight
    transformer.resblocks.N.ln_1 / ln_2         text_model.encoder.layers.N.layer_norm1 / layer_norm2
    transformer.resblocks.N.attn.in_proj_*      text_model.encoder.layers.N.self_attn.q_proj / k_proj / v_proj:
                                                    one fused (3D, D) matrix, split by rows into q, k, v
    transformer.resblocks.N.attn.out_proj       text_model.encoder.layers.N.self_attn.out_proj
    transformer.resblocks.N.mlp.c_fc / c_proj   text_model.encoder.layers.N.mlp.fc1 / fc2
    ln_final                                    text_model.final_layer_norm
    text_projection (D, P), used as x @ P       text_projection.weight (P, D): transposed (nn.Linear is x @ W.T)
    visual.conv1                                vision_model.embeddings.patch_embedding
    visual.class_embedding                      vision_model.embeddings.class_embedding
    visual.positional_embedding                 vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post              vision_model.pre_layrnorm / post_layernorm
    visual.transformer.resblocks.N.*            vision_model.encoder.layers.N.* (as for the text tower)
    visual.proj (D, P)                          visual_projection.weight (P, D): transposed
    logit_scale                                 logit_scale

Stable Diffusion single-file checkpoints (reference: diffusers 0.42 loaders/single_file_utils.py):
- SD 1.x: cond_stage_model.transformer.* is a transformers CLIPTextModel state dict (with or without text_model.).
- SD 2.x: cond_stage_model.model.* is open_clip ViT-H/14's text tower. SD 2 conditions on the penultimate
  layer's output followed by ln_final, so the last block (resblocks.23) is dropped by name and the encoder has
  23 layers (diffusers: convert_open_clip_checkpoint, SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); text_projection and
  logit_scale are unused by SD and dropped by name too.
"""

import re
from collections.abc import Mapping

import torch
from torch import nn

from minidiff.loading.strict import check_state_dict, key_listing, rename_keys
from minidiff.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

_TRANSFORMERS_PREFIX = {
    CLIPTextModel: "text_model.", CLIPTextModelWithProjection: "text_model.",
    CLIPVisionModel: "vision_model.", CLIPVisionModelWithProjection: "vision_model.", CLIPModel: "",
}  # fmt: skip
_POSITION_IDS = [f"{tower}embeddings.position_ids" for tower in ("", "text_model.", "vision_model.")]  # constants
# Whole-name renames, open_clip -> minidiff CLIPModel. The transformer blocks follow _OPEN_CLIP_BLOCK.
_OPEN_CLIP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(ln_1|ln_2|attn\.in_proj|attn\.out_proj|"
                              r"mlp\.c_fc|mlp\.c_proj)[._](weight|bias)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.in_proj": "self_attn.in_proj",
                "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# OpenAI's CLIP stores three hyperparameters as tensors among the weights (clip/model.py build_model drops them).
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
SD1_PREFIX, SD2_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."


def checked_against(model_class: type[nn.Module], config, converted: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # the model only for its key names and shapes: no memory, no init
        check_state_dict(model_class(config), converted)
    return converted


def _without(state_dict: Mapping[str, torch.Tensor], dropped) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k not in dropped}


def clip_from_transformers(
    state_dict: Mapping[str, torch.Tensor],
    model_class: type[nn.Module],
    config: CLIPTextConfig | CLIPVisionConfig | CLIPConfig,
) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection
    or CLIPModel state dict (hub file or in-memory model) -> keys of the minidiff class of the same name."""
    if model_class not in _TRANSFORMERS_PREFIX:
        raise ValueError(f"model_class must be one of {[c.__name__ for c in _TRANSFORMERS_PREFIX]}")
    prefix = _TRANSFORMERS_PREFIX[model_class]
    converted = rename_keys(_without(state_dict, _POSITION_IDS), lambda key: key.removeprefix(prefix))
    return checked_against(model_class, config, converted)


# The bigger CLIP models whose weights hold each tower class's
TOWER_SOURCES = {
    CLIPTextModel: (CLIPTextModelWithProjection, CLIPModel), CLIPTextModelWithProjection: (CLIPModel,),
    CLIPVisionModel: (CLIPVisionModelWithProjection, CLIPModel), CLIPVisionModelWithProjection: (CLIPModel,),
}  # fmt: skip
_TOWERS = (("text_model.", "text_projection.weight"), ("vision_model.", "visual_projection.weight"))  # in CLIPModel


def clip_tower(
    state_dict: Mapping[str, torch.Tensor],
    source_class: type[nn.Module],
    target_class: type[nn.Module],
    config: CLIPTextConfig | CLIPVisionConfig,
) -> dict[str, torch.Tensor]:
    """A bigger CLIP model's minidiff state dict (one of TOWER_SOURCES[target_class]) -> the keys of
    `target_class`, whose `config` is its tower's. The tower is taken (a CLIPModel keeps it under text_model. /
    vision_model.) and the rest dropped by name: the other tower, a projection the target lacks, logit_scale."""
    if source_class not in TOWER_SOURCES.get(target_class, ()):
        raise ValueError(f"a {target_class.__name__} is not part of a {source_class.__name__}")
    text = issubclass(target_class, CLIPTextModel)
    (tower, projection), (other, other_projection) = _TOWERS if text else _TOWERS[::-1]
    keeps_projection = target_class in (CLIPTextModelWithProjection, CLIPVisionModelWithProjection)
    dropped = set() if keeps_projection else {projection}
    if source_class is CLIPModel:
        dropped |= {k for k in state_dict if k.startswith(other)} | {other_projection, "logit_scale"}
    picked = rename_keys(_without(state_dict, dropped), lambda key: key.removeprefix(tower))
    return checked_against(target_class, config, picked)


def _open_clip_key(key: str) -> str:
    """One open_clip / OpenAI name -> the minidiff CLIPModel name. Fused attention projections become
    self_attn.in_proj.*, which _open_clip_layout splits."""
    if key in _OPEN_CLIP_NAMES:
        return _OPEN_CLIP_NAMES[key]
    m = _OPEN_CLIP_BLOCK.fullmatch(key)
    return f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}.{_BLOCK_PARTS[m[3]]}.{m[4]}"


def _rename_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unknown = [k for k in state_dict if k not in _OPEN_CLIP_NAMES and not _OPEN_CLIP_BLOCK.fullmatch(k)]
    if unknown:
        raise ValueError(f"not open_clip / OpenAI CLIP weight names ({len(unknown)}):{key_listing(unknown)}")
    return _open_clip_layout(rename_keys(state_dict, _open_clip_key))


def _open_clip_layout(renamed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split the fused in_proj (3D, ...) by rows into q, k, v (nn.MultiheadAttention's order); transpose the
    projection matrices (x @ P in open_clip, x @ W.T in nn.Linear)."""
    out = {}
    for key, tensor in renamed.items():
        if ".self_attn.in_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
                out[key.replace("in_proj", name)] = part
        elif key in ("text_projection.weight", "visual_projection.weight"):
            out[key] = tensor.T
        else:
            out[key] = tensor
    return out


def clip_from_open_clip(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """An open_clip or OpenAI CLIP state dict (both towers) -> minidiff CLIPModel keys. The config is needed
    for what the weights do not say: head counts, hidden_act (OpenAI: quick_gelu; open_clip ViT-H: gelu), eps."""
    return checked_against(CLIPModel, config, _rename_open_clip(_without(state_dict, _OPENAI_SCALARS)))


def text_encoder_from_sd(checkpoint: Mapping[str, torch.Tensor], config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """The text encoder of an original Stable Diffusion single-file checkpoint -> minidiff CLIPTextModel keys.

    Reads the keys under cond_stage_model.transformer. (SD 1.x) or cond_stage_model.model. (SD 2.x); the others
    belong to the UNet and the VAE. SD 2.x: config.num_hidden_layers = 23 drops the 24th block (see above)."""
    sd1 = {k.removeprefix(SD1_PREFIX): v for k, v in checkpoint.items() if k.startswith(SD1_PREFIX)}
    sd2 = {k.removeprefix(SD2_PREFIX): v for k, v in checkpoint.items() if k.startswith(SD2_PREFIX)}
    if bool(sd1) == bool(sd2):
        found = "both" if sd1 else "neither"
        raise ValueError(f"expected the text encoder under {SD1_PREFIX}* (SD 1.x) or {SD2_PREFIX}* (SD 2.x); "
                         f"the checkpoint has {found}")
    if sd1:
        return clip_from_transformers(sd1, CLIPTextModel, config)
    last_block = f"transformer.resblocks.{config.num_hidden_layers}."
    dropped = {k for k in sd2 if k.startswith(last_block)} | {"text_projection", "logit_scale"}
    converted = {k.removeprefix("text_model."): v for k, v in _rename_open_clip(_without(sd2, dropped)).items()}
    return checked_against(CLIPTextModel, config, converted)
