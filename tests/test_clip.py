"""Parity of minidiff's CLIP with transformers 5.23, its strict key maps, textual-inversion files and the CLIP
image preprocessing.

Reference models are built on the meta device and filled with seeded random values: every parameter, LayerNorm
weights and biases included, so a swapped or dropped tensor shows in the outputs. Their state dicts go through
minidiff's converters (the key maps under test) into minidiff models, and fp32 CPU outputs are compared.

Tolerance: minidiff runs the same float32 operations in the same order as transformers (the same Linear,
LayerNorm and scaled_dot_product_attention calls on same-shaped tensors, the same boolean mask or is_causal
flag), so the outputs come out bit-identical: the measured max abs difference is 0.0 for every test here, tiny
configs and full-size ViT-L/14 (text, vision, logits), SD 1.x and SD 2.x text encoders alike, with outputs O(1)
(last hidden states up to ~4). ATOL = 1e-6 leaves room only for a harmless reordering of float32 sums; the
mistakes it must catch are far larger: on the SD 1.x encoder a LayerNorm eps of 1e-6 for 1e-5 moves the output
by 1.6e-2, gelu for quick_gelu by 6.5e-2, a dropped padding mask by ~4.
"""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
from helpers import max_diff
from PIL import Image
from torch import nn
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from minidiff.convert.keymaps.clip import (
    clip_from_open_clip,
    clip_from_transformers,
    text_encoder_from_sd,
)
from minidiff.loading.textual_inversion import load_textual_inversion
from minidiff.models import clip, clip_images

ATOL = 1e-6
# runwayml/stable-diffusion-v1-5 text_encoder/config.json, as the hub has it; stabilityai/stable-diffusion-2-1's
# has the same keys and differs in the values given in SD2_TEXT.
SD1_TEXT = json.loads("""{"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
  "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
  "transformers_version": "4.22.0.dev0", "vocab_size": 49408}""")
SD2_TEXT = {**SD1_TEXT, "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder", "hidden_act": "gelu",
            "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
            "projection_dim": 512, "transformers_version": "4.25.0.dev0"}
# openai/clip-vit-large-patch14 config.json, abridged: each section's ~40 generic generation/bookkeeping keys
# (all at their defaults) are left out but for a few; every key that shapes the model is as on the hub.
VIT_L14_JSON = """{"_name_or_path": "clip-vit-large-patch14/", "architectures": ["CLIPModel"],
  "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768,
  "torch_dtype": "float32", "transformers_version": null,
  "text_config": {"_name_or_path": "", "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_length": 20, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_beams": 1, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "top_k": 50,
    "transformers_version": "4.16.0.dev0", "vocab_size": 49408},
  "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768},
  "vision_config": {"_name_or_path": "", "attention_dropout": 0.0, "bos_token_id": null, "dropout": 0.0,
    "eos_token_id": null, "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 224,
    "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
    "num_hidden_layers": 24, "pad_token_id": null, "patch_size": 14, "projection_dim": 768},
  "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
    "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}"""
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=12)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                   patch_size=6, projection_dim=12)
BOS, EOS = 49406, 49407




def reference(cls, config, seed: int = 0, state_dict: dict | None = None) -> nn.Module:
    """A transformers model at `config`, every parameter seeded-random (LayerNorms around 1, the rest ~0.02), or
    holding the tensors of state_dict (no copy)."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [] if state_dict else model.modules():
            for name, p in module.named_parameters(recurse=False):
                centre = 1.0 if isinstance(module, nn.LayerNorm) and name == "weight" else 0.0
                p.normal_(centre, 0.1 if isinstance(module, nn.LayerNorm) else 0.02, generator=g)
        if state_dict:
            model.load_state_dict(state_dict, assign=True)
        for b in model.buffers():  # position_ids (not in state dicts: non-persistent)
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        if hasattr(model, "logit_scale") and not state_dict:
            model.logit_scale.fill_(2.6592)
    return model


def minidiff_model(cls, config, state_dict) -> nn.Module:
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state_dict, assign=True)  # share the reference's tensors: no copy, no init
    return model.eval()


def config_from(cls, ref_model):
    """minidiff config from the reference's own config dict, with no warning about unknown keys."""
    config_dict = ref_model.config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.from_dict(config_dict)


def converted(ref_class, ref_config, seed: int = 0):
    """(transformers model, the minidiff model of the same name converted from its state dict, minidiff config)."""
    ref = reference(ref_class, ref_config, seed)
    config = config_from(getattr(clip, type(ref_config).__name__), ref)
    ours_class = getattr(clip, ref_class.__name__)
    return ref, minidiff_model(ours_class, config, clip_from_transformers(ref.state_dict(), ours_class, config)), config


def token_ids(length: int, rows: int = 3, seed: int = 0) -> torch.Tensor:
    """SD-style rows: BOS, words, EOS, then pads of 49407 (SD 1.x), of 0 (SD 2.x), or no room for pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(300, 40000, (rows, length), generator=g)
    ids[:, 0] = BOS
    for row, (n_words, pad) in enumerate([(5, EOS), (length // 2, 0), (length - 2, None)][:rows]):
        ids[row, n_words + 1] = EOS
        if pad is not None:
            ids[row, n_words + 2:] = pad
    return ids


def assert_text_parity(ours, ref, ids, mask=None, skips=(1, 2)):
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, output_hidden_states=True)
        b = ours(ids, mask, output_hidden_states=True)
    assert len(b.hidden_states) == ours.config.num_hidden_layers + 1 == len(a.hidden_states)
    diffs = [max_diff(a.last_hidden_state, b.last_hidden_state), max_diff(a.pooler_output, b.pooler_output)]
    diffs += [max_diff(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True)]
    for k in skips:  # clip skip k, built by hand as diffusers' encode_prompt intends
        diffs.append(max_diff(ref.final_layer_norm(a.hidden_states[-(k + 1)]),
                              ours.final_layer_norm(b.hidden_states[-(k + 1)])))
    assert max(diffs) <= ATOL, diffs
    return b


@pytest.mark.parametrize("eos_token_id", [2, EOS])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_new"])
def test_text_model_parity(hidden_act, eos_token_id):
    ref, ours, config = converted(transformers.CLIPTextModel, transformers.CLIPTextConfig(
        **TINY_TEXT, hidden_act=hidden_act, eos_token_id=eos_token_id))
    assert (config.hidden_act, config.eos_token_id) == (hidden_act, eos_token_id)
    ids = token_ids(16)
    right_padding = (torch.arange(16) <= (ids == EOS).int().argmax(-1, keepdim=True)).long()
    left_padding = torch.ones_like(ids)
    left_padding[0, :3] = 0  # queries 0-2 of row 0 see no key at all: SDPA gives them zeros, as in transformers
    for mask in (None, right_padding, left_padding, torch.ones_like(ids)):
        out = assert_text_parity(ours, ref, ids, mask)
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output  # transformers-style indexing


def test_added_token_and_pooling_rule():
    """add_token_embedding matches transformers with the same row appended; with the legacy eos_token_id 2 the
    pooled state sits at the largest id (the new token), with 49407 at the first EOS."""
    vector = torch.randn(TINY_TEXT["hidden_size"], generator=torch.Generator().manual_seed(1))
    ids = token_ids(16, rows=2)
    ids[:, 3] = TINY_TEXT["vocab_size"]  # the id the new row gets
    pooled = {}
    for eos_token_id in (2, EOS):
        ref, ours, _ = converted(transformers.CLIPTextModel,
                                 transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=eos_token_id))
        assert ours.add_token_embedding(vector) == TINY_TEXT["vocab_size"] == ours.config.vocab_size - 1
        table = ref.embeddings.token_embedding
        table.weight = nn.Parameter(torch.cat([table.weight.detach(), vector[None]]))
        pooled[eos_token_id] = assert_text_parity(ours, ref, ids).pooler_output
        assert torch.equal(ours.token_embeddings(ids)[0, 3], vector)
    with torch.no_grad():
        last = ours(ids).last_hidden_state
    first_eos = (ids == EOS).int().argmax(-1)
    assert torch.equal(pooled[2], last[:, 3]) and torch.equal(pooled[EOS], last[torch.arange(2), first_eos])


def test_inputs_embeds_encode_and_blend():
    """The Deep Dive's moves: swap one token's embedding for another's, encode embeddings that already hold their
    positions, mix two prompts' outputs."""
    ref, ours, _ = converted(transformers.CLIPTextModel, transformers.CLIPTextConfig(**TINY_TEXT))
    ids = token_ids(16, rows=2)
    swapped = ids.clone()
    swapped[:, 2] = 1234
    with torch.no_grad():
        embeds = ours.token_embeddings(ids)
        embeds[:, 2] = ours.token_embeddings(torch.tensor([1234]))[0]
        out = ours(swapped, inputs_embeds=embeds)
        expected = ref(swapped)
        encoded = ours.encode(ours.token_embeddings(ids) + ours.position_embeddings(16)).last_hidden_state
        plain = ours(ids)
        no_pool = ours(inputs_embeds=embeds)
    assert max_diff(out.last_hidden_state, expected.last_hidden_state) <= ATOL
    assert max_diff(out.pooler_output, expected.pooler_output) <= ATOL
    assert torch.equal(encoded, plain.last_hidden_state) and no_pool.pooler_output is None
    mixed = clip.blend_embeddings(plain.last_hidden_state, out.last_hidden_state, 0.35)
    assert torch.equal(mixed, plain.last_hidden_state * 0.35 + out.last_hidden_state * (1 - 0.35))
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        ours(torch.full((1, 17), BOS))


def test_projection_heads_and_vision_model_parity():
    ref, ours, _ = converted(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig(**TINY_TEXT))
    assert "text_model.embeddings.token_embedding.weight" in ref.state_dict()  # the prefix is stripped
    with torch.no_grad():
        a, b = ref(token_ids(16)), ours(token_ids(16))
    assert max(max_diff(a.text_embeds, b.text_embeds), max_diff(a.last_hidden_state, b.last_hidden_state)) <= ATOL

    ref, ours, config = converted(transformers.CLIPVisionModelWithProjection,
                                  transformers.CLIPVisionConfig(**TINY_VISION))
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(pixels, output_hidden_states=True), ours(pixels, output_hidden_states=True)
    diffs = [max_diff(a.image_embeds, b.image_embeds), max_diff(a.last_hidden_state, b.last_hidden_state)]
    diffs += [max_diff(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True)]
    assert max(diffs) <= ATOL, diffs
    # The bare tower, from a flattened in-memory state dict and from a hub file's prefixed keys alike.
    tower = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items() if k.startswith("vision_model.")}
    hub = {"vision_model." + k: v for k, v in tower.items()}
    hub["vision_model.embeddings.position_ids"] = torch.arange(26)[None]  # older hub files hold this constant
    with torch.no_grad():
        pooled = ref.vision_model(pixels).pooler_output
        for source in (tower, hub):
            bare = minidiff_model(clip.CLIPVisionModel, config, clip_from_transformers(source, clip.CLIPVisionModel,
                                                                                       config))
            assert max_diff(bare(pixels).pooler_output, pooled) <= ATOL
    with pytest.raises(ValueError, match="30x30"):
        ours(torch.zeros(1, 3, 32, 32))


def tiny_clip_model(seed: int = 0):
    config = transformers.CLIPConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), projection_dim=12)
    return reference(transformers.CLIPModel, config, seed)


def assert_clip_parity(ours, ref, ids, pixels, features: bool = True):
    """Logits and unit embeddings; with features, also get_text_features / get_image_features (two more runs)."""
    with torch.no_grad():
        a, b = ref(input_ids=ids, pixel_values=pixels), ours(ids, pixels)
        diffs = [max_diff(a.logits_per_image, b.logits_per_image), max_diff(a.logits_per_text, b.logits_per_text),
                 max_diff(a.text_embeds, b.text_embeds), max_diff(a.image_embeds, b.image_embeds)]
        if features:  # transformers 5 returns the projected vector as .pooler_output
            diffs += [max_diff(ref.get_text_features(ids).pooler_output, ours.get_text_features(ids)),
                      max_diff(ref.get_image_features(pixels).pooler_output, ours.get_image_features(pixels))]
    assert max(diffs) <= ATOL, diffs
    return b


def test_clip_model_parity_and_open_clip_layout():
    ref = tiny_clip_model()
    config = config_from(clip.CLIPConfig, ref)
    hub = {**ref.state_dict(), "text_model.embeddings.position_ids": torch.arange(16)[None],
           "vision_model.embeddings.position_ids": torch.arange(26)[None]}  # as hub files hold them
    from_transformers = clip_from_transformers(hub, clip.CLIPModel, config)
    openai_scalars = {"input_resolution": torch.tensor(30), "context_length": torch.tensor(16),
                      "vocab_size": torch.tensor(49408)}  # OpenAI CLIP's state dict holds these too
    from_open_clip = clip_from_open_clip({**to_open_clip(ref.state_dict()), **openai_scalars}, config)
    assert from_open_clip.keys() == from_transformers.keys()
    ids, pixels = token_ids(16), torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    for state_dict in (from_transformers, from_open_clip):
        out = assert_clip_parity(minidiff_model(clip.CLIPModel, config, state_dict), ref, ids, pixels)
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_image.abs().max() > 0.1


def to_open_clip(state_dict: dict) -> dict:
    """transformers CLIPModel keys -> an OpenAI / open_clip state dict: the text tower by inverting diffusers'
    own map (DIFFUSERS_TO_LDM_MAPPING["openclip"]), the vision tower from open_clip's module names."""
    whole_names = {**DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"],  # transformers name -> open_clip name
                   "visual_projection.weight": "visual.proj", "logit_scale": "logit_scale"}
    block_names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."),
                   (".self_attn", ".attn")]  # the "transformer" half of the same map, inverted
    vision = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
              "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.": "ln_pre.",
              "post_layernorm.": "ln_post.", "encoder.layers.": "transformer.resblocks."}
    out = {}
    for key, tensor in state_dict.items():
        if key in whole_names:
            name = whole_names[key]
        elif key.startswith("vision_model."):
            name = key.removeprefix("vision_model.")
            for new, old in vision.items():
                name = name.replace(new, old)
            name = "visual." + name
        else:
            name = key.replace("text_model.encoder.layers.", "transformer.resblocks.")
        for new, old in block_names:
            name = name.replace(new, old) if "resblocks" in name else name
        out[name] = tensor.T if name in ("text_projection", "visual.proj") else tensor
    for key in [k for k in out if ".attn.q_proj." in k]:  # fuse q, k, v into in_proj_weight / in_proj_bias
        parts = [out.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[key.replace(".q_proj.", ".in_proj_")] = torch.cat(parts)
    return out


def sd2_checkpoint(text_model: dict) -> dict:
    """An SD 2.x single-file checkpoint around a transformers CLIPTextModel state dict (in open_clip layout)."""
    clip_keys = {"text_model." + k: v for k, v in text_model.items()}
    width = text_model["final_layer_norm.weight"].shape[0]
    clip_keys["text_projection.weight"] = torch.randn(width, width)
    clip_keys["logit_scale"] = torch.tensor(4.6)
    return {"model.diffusion_model.conv_in.weight": torch.zeros(4),
            **{"cond_stage_model.model." + k: v for k, v in to_open_clip(clip_keys).items()}}


def test_sd2_text_encoder_matches_diffusers_and_is_penultimate():
    """diffusers drops resblocks.23 by name: a narrow model with SD 2's 24 blocks gives it what it expects."""
    ref_24 = reference(transformers.CLIPTextModel,
                       transformers.CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": 24}, hidden_act="gelu"))
    checkpoint = sd2_checkpoint(ref_24.state_dict())
    config = clip.CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": 23}, hidden_act="gelu")
    ours = text_encoder_from_sd(checkpoint, config)
    theirs = convert_open_clip_checkpoint(None, checkpoint)
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model = minidiff_model(clip.CLIPTextModel, config, ours)
    ids = token_ids(16)
    with torch.no_grad():
        a = ref_24(ids, output_hidden_states=True)
        b = model(ids)
    assert max_diff(ref_24.final_layer_norm(a.hidden_states[-2]), b.last_hidden_state) <= ATOL


def test_sd1_text_encoder_both_layouts_match_diffusers():
    ref = reference(transformers.CLIPTextModel, transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=2))
    config = config_from(clip.CLIPTextConfig, ref)
    other = {"model.diffusion_model.conv_in.weight": torch.zeros(4), "first_stage_model.conv_in.bias": torch.zeros(4)}
    for inner in ("text_model.", ""):
        checkpoint = {**other, **{f"cond_stage_model.transformer.{inner}{k}": v for k, v in ref.state_dict().items()}}
        checkpoint[f"cond_stage_model.transformer.{inner}embeddings.position_ids"] = torch.arange(16)[None]
        ours = text_encoder_from_sd(checkpoint, config)
        theirs = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
        assert ours.keys() == theirs.keys() - {"embeddings.position_ids"}
        assert_text_parity(minidiff_model(clip.CLIPTextModel, config, ours), ref, token_ids(16))


def test_conversion_is_strict():
    ref = tiny_clip_model()
    config = config_from(clip.CLIPConfig, ref)
    good = ref.state_dict()
    bad = dict(good)
    del bad["text_model.final_layer_norm.bias"]
    bad["text_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(1)
    bad["vision_model.embeddings.class_embedding"] = torch.zeros(5)
    with pytest.raises(ValueError) as error:
        clip_from_transformers(bad, clip.CLIPModel, config)
    message = str(error.value)
    for expected in ["1 missing", "text_model.final_layer_norm.bias", "1 unexpected",
                     "text_model.encoder.layers.7.mlp.fc1.weight", "1 shape mismatches",
                     "vision_model.embeddings.class_embedding: checkpoint (5,), model (32,)"]:
        assert expected in message, message
    text = {k: v for k, v in good.items() if k.startswith("text_model.")}
    both = {**text, **{k.removeprefix("text_model."): v for k, v in text.items()}}
    with pytest.raises(ValueError, match="given twice"):
        clip_from_transformers(both, clip.CLIPTextModel, config.text_config)
    with pytest.raises(ValueError, match="not open_clip / OpenAI CLIP weight names \\(1\\):\n    visual.extra"):
        clip_from_open_clip({**to_open_clip(good), "visual.extra": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="neither"):
        text_encoder_from_sd({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, config.text_config)
    sd2 = sd2_checkpoint(reference(transformers.CLIPTextModel, transformers.CLIPTextConfig(**TINY_TEXT)).state_dict())
    with pytest.raises(ValueError, match="16 unexpected.*\n    encoder.layers.2"):  # block 1 dropped, 2 left over
        text_encoder_from_sd(sd2, clip.CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": 1}))


def test_configs_from_hub_json():
    sd1 = clip.CLIPTextConfig.from_dict(dict(SD1_TEXT))
    sd2 = clip.CLIPTextConfig.from_dict(dict(SD2_TEXT))
    assert (sd1.hidden_size, sd1.num_hidden_layers, sd1.hidden_act, sd1.eos_token_id) == (768, 12, "quick_gelu", 2)
    assert (sd2.hidden_size, sd2.num_hidden_layers, sd2.hidden_act, sd2.eos_token_id) == (1024, 23, "gelu", 2)
    # A CLIPModel config: text_config_dict overrides text_config as a full config, so eos_token_id becomes 49407.
    ours = clip.CLIPConfig.from_dict(json.loads(VIT_L14_JSON))
    theirs = transformers.CLIPConfig.from_dict(json.loads(VIT_L14_JSON))
    for mine, ref in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
        assert all(getattr(mine, f) == getattr(ref, f) for f in vars(mine)), (mine, ref)
    assert ours.text_config.eos_token_id == EOS and ours.projection_dim == 768
    assert clip.CLIPTextConfig.from_dict(json.loads(VIT_L14_JSON)) == ours.text_config
    assert clip.CLIPVisionConfig.from_dict(json.loads(VIT_L14_JSON)) == ours.vision_config
    with pytest.warns(UserWarning, match="unknown keys.*'use_flash'"):
        clip.CLIPTextConfig.from_dict({**dict(SD1_TEXT), "use_flash": True})
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextConfig(hidden_act="swish")


def test_textual_inversion_formats(tmp_path):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    files = {
        "learned_embeds.bin": {"<cat-toy>": vectors[0]},  # sd-concepts-library
        "learned_embeds.safetensors": {"<cat-toy>": vectors[:2].contiguous()},
        "bad-hands.pt": {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "bad-hands-5",
                         "step": 1000, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5-pruned"},  # A1111
    }
    for name, content in files.items():
        path = tmp_path / name
        safetensors.torch.save_file(content, path) if name.endswith(".safetensors") else torch.save(content, path)
        [(token, loaded)] = load_textual_inversion(path).items()
        [theirs_token], [theirs] = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings(
            [None], [content], SimpleNamespace(get_vocab=dict))  # a tokenizer with nothing added yet
        assert token == theirs_token and torch.equal(loaded, theirs.reshape(-1, 32))
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "easynegative.safetensors")
    assert load_textual_inversion(tmp_path / "easynegative.safetensors").keys() == {"easynegative"}
    assert load_textual_inversion(vectors, token="<x>")["<x>"].shape == (3, 32)
    assert load_textual_inversion(files["learned_embeds.bin"], token="<y>").keys() == {"<y>"}
    with pytest.raises(ValueError, match="pass token="):
        load_textual_inversion(vectors)
    with pytest.raises(ValueError, match="not a textual-inversion"):
        load_textual_inversion({"a": vectors, "b": vectors})
    # Round trip into a text encoder: one new row per vector.
    model = clip.CLIPTextModel(clip.CLIPTextConfig(**TINY_TEXT))
    new_ids = [model.add_token_embedding(v) for v in load_textual_inversion(tmp_path / "bad-hands.pt")["bad-hands-5"]]
    assert new_ids == [49408, 49409, 49410] and torch.equal(model.token_embeddings(torch.tensor(new_ids)), vectors)
    model.set_token_embedding(new_ids[0], vectors[2])
    assert torch.equal(model.token_embeddings(torch.tensor(new_ids[:1]))[0], vectors[2])


def test_preprocess_images_is_identical_to_transformers():
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 250), (97, 513), (224, 224), (50, 80), (225, 1000)]]
    images.append(Image.fromarray(rng.integers(0, 256, (180, 301, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (257, 259), dtype=np.uint8), "L"))
    palette = Image.fromarray(rng.integers(0, 16, (120, 90), dtype=np.uint8), "P")
    palette.info["transparency"] = 3
    images.append(palette)
    ours = clip_images.preprocess_images(images)
    theirs = CLIPImageProcessorPil()(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == (8, 3, 224, 224) and ours.dtype == torch.float32 and torch.equal(ours, theirs)

    # The differentiable path on smooth images (a photo more than noise): within ~2 levels of 8 bits of the PIL
    # path (measured max 0.023, mean 0.0045 after normalization, i.e. x 0.27 in [0, 1] units), not identical: PIL
    # resizes in fixed point and rounds to 8 bits. (On white noise PIL's clipping of bicubic overshoot shows: 0.46.)
    smooth = [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
              for size in [(480, 640), (80, 50)]]
    for image in smooth:
        rgb = (torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 255).requires_grad_()
        approx = clip_images.preprocess_tensor(rgb)
        difference = (approx - clip_images.preprocess_images([image])).abs()
        assert difference.max() < 0.03 and difference.mean() < 0.006, (difference.max(), difference.mean())
        approx.sum().backward()
    assert rgb.grad.abs().sum() > 0


def test_full_size_vit_l14_and_sd1_text_encoder():
    """openai/clip-vit-large-patch14 (428M parameters, built once): CLIPModel; then its text tower as the SD 1.x
    text encoder (that config has eos_token_id 2), read from an SD 1.x checkpoint."""
    vit_l14 = reference(transformers.CLIPModel, transformers.CLIPConfig.from_dict(json.loads(VIT_L14_JSON)))
    config = clip.CLIPConfig.from_dict(json.loads(VIT_L14_JSON))
    ours = minidiff_model(clip.CLIPModel, config, clip_from_transformers(vit_l14.state_dict(), clip.CLIPModel, config))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert_clip_parity(ours, vit_l14, token_ids(77, rows=2), pixels, features=False)  # ViT-L runs are slow

    text = {k: v for k, v in vit_l14.state_dict().items() if k.startswith("text_model.")}
    ref = reference(transformers.CLIPTextModel, transformers.CLIPTextConfig.from_dict(dict(SD1_TEXT)),
                    state_dict={k.removeprefix("text_model."): v for k, v in text.items()})
    checkpoint = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    config = clip.CLIPTextConfig.from_dict(dict(SD1_TEXT))
    ours = minidiff_model(clip.CLIPTextModel, config, text_encoder_from_sd(checkpoint, config))
    assert_text_parity(ours, ref, token_ids(77, rows=2))


def test_full_size_sd2_text_encoder():
    """SD 2.x: open_clip ViT-H/14's text tower; the checkpoint has 24 blocks, the last one is dropped."""
    ref = reference(transformers.CLIPTextModel, transformers.CLIPTextConfig.from_dict(dict(SD2_TEXT)))
    text = ref.state_dict()
    g = torch.Generator().manual_seed(7)
    text.update({k.replace(".22.", ".23."): torch.randn(v.shape, generator=g) * 0.02
                 for k, v in ref.state_dict().items() if ".layers.22." in k})  # a 24th block, to be dropped
    config = clip.CLIPTextConfig.from_dict(dict(SD2_TEXT))
    ours = minidiff_model(clip.CLIPTextModel, config, text_encoder_from_sd(sd2_checkpoint(text), config))
    assert_text_parity(ours, ref, token_ids(77, rows=2))


def test_full_size_vit_b32_through_the_open_clip_layout():
    """openai/clip-vit-base-patch32 (151M parameters; the model of the course's CLIP guidance, which loads it
    with open_clip: config reconstructed in tests/reference_configs/RECONSTRUCTED.md). transformers' model,
    rewritten in the open_clip / OpenAI layout, converts to the same CLIPModel."""
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  patch_size=32, image_size=224, hidden_act="quick_gelu")
    ref = reference(transformers.CLIPModel, transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                    projection_dim=512))
    config = config_from(clip.CLIPConfig, ref)
    ours = minidiff_model(clip.CLIPModel, config, clip_from_open_clip(to_open_clip(ref.state_dict()), config))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    assert_clip_parity(ours, ref, token_ids(77, rows=2), pixels)
