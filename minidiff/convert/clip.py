"""CLIP -> a minidiff "clip" folder (clip.safetensors + config.json), from the two layouts users bring.

1. A transformers folder (config.json naming CLIPModel, CLIPTextModel(WithProjection) or
   CLIPVisionModel(WithProjection); model.safetensors or pytorch_model.bin; tokenizer files if present):
   the config says everything.
2. An open_clip / OpenAI state dict (a .pt/.bin/.safetensors file with transformer.resblocks.* and visual.*
   keys; e.g. open_clip_model.safetensors): the weights do not say the head counts or the activation, so
   --clip-config names the architecture, one of CLIP_CONFIGS. The course's CLIP guidance uses open_clip's
   "ViT-B-32" with OpenAI's weights (open_clip then switches to QuickGELU, as here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minidiff.config import to_json_dict
from minidiff.convert.components import CONFIG_READERS, read_component, transformers_clip_class
from minidiff.convert.keymaps.clip import clip_from_open_clip
from minidiff.convert.sources import ConversionError, Converted, read_json, read_state_dict, read_tokenizer
from minidiff.loading.model_folder import ModelFolder, Vocabulary
from minidiff.models import clip
from minidiff.models.tokenizer import EOS

# transformers CLIPConfig dicts. ViT-B-32: openai/clip-vit-base-patch32 (values as reconstructed in the
# project's shared/reference_configs/RECONSTRUCTED.md); ViT-L-14: openai/clip-vit-large-patch14 config.json.
CLIP_CONFIGS = {
    "ViT-B-32": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=512),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", projection_dim=512),
        projection_dim=512, logit_scale_init_value=2.6592,
    ),
    "ViT-L-14": dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        projection_dim=768, logit_scale_init_value=2.6592,
    ),
}


def _converted(class_name: str, config, state_dict: dict[str, torch.Tensor], tokenizer: dict | None,
               vocabulary: Vocabulary | None, source: str, location: str) -> Converted:
    folder_config = {"kind": "clip", "source": source, "clip": {"class": class_name, "config": to_json_dict(config)}}
    if tokenizer is not None:
        folder_config["tokenizer"] = tokenizer
    n = sum(t.numel() for t in state_dict.values())
    pad = f", tokenizer pads with {tokenizer['pad_token']!r}" if tokenizer else ""
    return Converted(ModelFolder(folder_config, {"clip": state_dict}, vocabulary, location),
                     f"{class_name}, {n / 1e6:.1f}M parameters{pad}")


def read_clip_folder(src: Path, variant: str | None = None) -> Converted:
    """A transformers CLIP folder, converted in memory."""
    config_json = read_json(src / "config.json")
    class_name = transformers_clip_class(config_json)
    if class_name is None:
        raise ConversionError(f"{src}/config.json: architectures {config_json.get('architectures')} name no CLIP "
                              f"class minidiff implements ({', '.join(CONFIG_READERS)})")
    model = read_component(src, class_name, variant)
    tokenizer, vocabulary = None, None
    text_config = model.config.text_config if isinstance(model.config, clip.CLIPConfig) else model.config
    if isinstance(text_config, clip.CLIPTextConfig):
        positions = text_config.max_position_embeddings
        if (src / "vocab.json").is_file() or (src / "tokenizer.json").is_file():
            tokenizer, vocabulary = read_tokenizer(src, positions)
        else:  # transformers' CLIP tokenizers pad with EOS
            tokenizer = {"pad_token": EOS, "model_max_length": positions}
    return _converted(class_name, model.config, model.state_dict, tokenizer, vocabulary, str(src.resolve()), str(src))


def read_open_clip(path: Path, architecture: str) -> Converted:
    """An open_clip / OpenAI CLIP state dict file with the config CLIP_CONFIGS[architecture], converted in memory."""
    config = clip.CLIPConfig.from_dict(CLIP_CONFIGS[architecture])
    try:
        state_dict = clip_from_open_clip(read_state_dict(path), config)
    except ValueError as e:
        raise ConversionError(f"{path}: as open_clip {architecture}: {e}") from None
    # open_clip's and OpenAI's tokenize() pad with zeros: token "!"
    tokenizer = {"pad_token": "!", "model_max_length": config.text_config.max_position_embeddings}
    source = f"{path.resolve()} (open_clip / OpenAI state dict, architecture {architecture})"
    return _converted("CLIPModel", config, state_dict, tokenizer, None, source, str(path))
