"""Parity of minidiff's text-conditional UNet with diffusers' UNet2DConditionModel, and its key maps.

Each parity test builds the diffusers model with a seeded random init, hands its config dict (as diffusers
holds it) to UNet2DConditionConfig.from_dict, converts its state dict and compares fp32 CPU outputs. The real SD 1.5
and SD 2.1 configs run once each at full size (860M parameters): minidiff's model is built on the meta
device and takes diffusers' tensors themselves (load_state_dict(assign=True)), so there is one copy.

Tolerance: minidiff runs the same float32 operations on same-shaped tensors in the same order as diffusers
(GroupNorm, conv, LayerNorm, Linear, SDPA on the same (B, heads, tokens, head_dim) views), so the outputs
are bit-identical: the measured max abs difference is 0.0 for every config here, tiny and full-size, and
also in bf16/fp16. Outputs are O(1); ATOL = 1e-6 leaves room only for a reordered float32 sum. A real
mistake is orders of magnitude larger: test_head_count_matters shows a wrong head count moving the output
by more than 1e-3.

LDM (single-file) conversion is checked against diffusers as the independent reference: an LDM-layout dict
is made by inverting diffusers' convert_ldm_unet_checkpoint (to_ldm below), diffusers must map it back
exactly, and minidiff's converter must give the same tensors under the same names.
"""

import gc
import json
import re
import warnings
from functools import partial

import helpers
import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from helpers import assert_same_tensors, output_diff

from minidiff.convert.keymaps.sd_unet import (
    LDM_BUFFERS,
    LDM_UNET_PREFIX,
    ldm_unet_config,
    ldm_unet_source_keys,
    unet_condition_from_diffusers,
    unet_condition_from_ldm,
)
from minidiff.models.unet_condition import UNSUPPORTED, UNet2DConditionConfig, UNet2DConditionModel

ATOL = 1e-6
CA_DOWN, CA_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"

# SD 1.x in miniature: 1x1-conv projections, one head count for all blocks. SD 2.x: Linear projections,
# heads per block, upcast_attention. Three levels so that odd latents take two uneven upsamplings.
TINY_SD1 = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=48, attention_head_dim=4,
                down_block_types=(CA_DOWN, CA_DOWN, "DownBlock2D"), up_block_types=("UpBlock2D", CA_UP, CA_UP))
TINY_SD2 = dict(TINY_SD1, cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                upcast_attention=True)


# unet/config.json of the hub repos (as in shared/reference_configs): SD 1.5 and SD 2.1 verbatim, the others
# differ from them only as written below.
SD15 = json.loads("""{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}""")
SD21 = json.loads("""{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true, "upcast_attention": true
}""")
SD21_BASE = {k: v for k, v in SD21.items() if k != "upcast_attention"} | {"sample_size": 64}
HUB = {
    "CompVis/stable-diffusion-v1-4": SD15 | {"_diffusers_version": "0.2.2"},
    "runwayml/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-inpainting": SD15 | {"_diffusers_version": "0.6.0.dev0", "in_channels": 9},
    "stabilityai/stable-diffusion-2-1-base": SD21_BASE,
    "stabilityai/stable-diffusion-2-1": SD21,
    "stabilityai/stable-diffusion-2-inpainting": {k: v for k, v in SD21_BASE.items()
                                                  if k not in ("only_cross_attention", "num_class_embeds")}
    | {"_diffusers_version": "0.8.0", "_name_or_path": "./hf-models/stable-diffusion-v2-inpainting/unet",
       "in_channels": 9},
}




make_pair = partial(helpers.make_pair, DiffusersUNet, UNet2DConditionModel, UNet2DConditionConfig.from_dict,
                    unet_condition_from_diffusers)


def inputs(config: dict, size: tuple[int, int], tokens: int = 77, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), *size, generator=g)
    return x, torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)


@pytest.mark.parametrize("config, size, tokens, t", [
    (TINY_SD1, (8, 8), 77, 999),
    (TINY_SD1, (9, 9), 154, 499.5),
    (TINY_SD1, (8, 12), 77, torch.tensor([1, 500])),
    (TINY_SD2, (9, 9), 77, torch.tensor(250.0)),
    (TINY_SD2, (8, 12), 154, torch.tensor([981])),
    (dict(TINY_SD1, in_channels=9), (9, 9), 77, 10),  # SD 1.5 inpainting
    (dict(TINY_SD2, in_channels=9), (8, 12), 77, 10.25),  # SD 2 inpainting
    (dict(TINY_SD1, attention_head_dim=3, transformer_layers_per_block=(1, 2, 1), mid_block_scale_factor=2.0),
     (9, 9), 77, 7),  # 3 heads of 10 channels: the blocks are 30 wide inside a 32-channel map
    (dict(TINY_SD1, layers_per_block=1, mid_block_type=None, freq_shift=1, flip_sin_to_cos=False, act_fn="mish",
          center_input_sample=True, time_embedding_dim=96), (8, 8), 77, 3),
])  # fmt: skip
def test_tiny_matrix(config, size, tokens, t):
    reference, ours = make_pair(**config)
    x, context = inputs(config, size, tokens)
    assert output_diff(reference, ours, x, t, context) <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches(dtype):
    """upcast_attention is ignored by both (SDPA keeps the softmax in float32), so half precision agrees too."""
    reference, ours = make_pair(**TINY_SD2)
    reference.to(dtype)
    ours.load_state_dict(reference.state_dict(), assign=True)
    x, context = (v.to(dtype) for v in inputs(TINY_SD2, (9, 9)))
    assert output_diff(reference, ours, x, 500, context) == 0.0


@pytest.mark.parametrize("config, size", [(SD15, (16, 16)), (SD21, (8, 8))], ids=["sd15", "sd21"])
def test_full_size(config, size):
    """The real configs (SD 2.1: v-prediction, upcast_attention, Linear projections, heads [5, 10, 20, 20]), batch
    2 as under classifier-free guidance, at a small latent to stay fast."""
    torch.manual_seed(0)
    reference = DiffusersUNet.from_config(config).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config)).eval()
    ours.load_state_dict(unet_condition_from_diffusers(reference.state_dict(), ours.config), assign=True)
    x, context = inputs(config, size)
    try:
        assert output_diff(reference, ours, x, torch.tensor([981, 981]), context) <= ATOL
    finally:
        del reference, ours  # 3.4 GB; the suite shares the machine
        gc.collect()


@pytest.mark.parametrize("name", HUB)
def test_hub_configs_build_diffusers_architecture(name):
    """Every SD hub config.json as it is: same parameter names and shapes as diffusers (on meta, no memory)."""
    config = HUB[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys
        ours_config = UNet2DConditionConfig.from_dict(config)
    assert ours_config.heads == ((8,) * 4 if config["cross_attention_dim"] == 768 else (5, 10, 20, 20))
    with torch.device("meta"):
        theirs, ours = DiffusersUNet.from_config(config), UNet2DConditionModel(ours_config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_head_count_matters():
    """Same weights, other head count: the naming bug is worth a test. 4 heads vs 2 moves the output by far more
    than ATOL, and num_attention_heads (which diffusers 0.42 refuses) overrides attention_head_dim."""
    reference, _ = make_pair(**TINY_SD1)
    x, context = inputs(TINY_SD1, (8, 8))
    for override in (dict(attention_head_dim=2), dict(attention_head_dim=2, num_attention_heads=4)):
        with torch.device("meta"):
            other = UNet2DConditionModel(UNet2DConditionConfig(**{**TINY_SD1, **override})).eval()
        other.load_state_dict(reference.state_dict(), assign=True)
        diff = output_diff(reference, other, x, 500, context)
        assert diff <= ATOL if "num_attention_heads" in override else diff > 1e-3
    with pytest.raises(ValueError, match="num_attention_heads"):
        DiffusersUNet(**TINY_SD1, num_attention_heads=4)


# --- original single-file (LDM) checkpoints -------------------------------------------------------------------

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def to_ldm(state_dict: dict, config: dict) -> dict:
    """diffusers UNet keys -> LDM keys (without the prefix): convert_ldm_unet_checkpoint run backwards."""
    slots = config["layers_per_block"] + 1
    out = {}
    for key, value in state_dict.items():
        path, param = key.rsplit(".", 1)
        if path in FIXED_TO_LDM:
            out[f"{FIXED_TO_LDM[path]}.{param}"] = value
            continue
        m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         key) or re.fullmatch(r"(mid_block)\.()(resnets|attentions)\.(\d+)\.(.+)", key)
        where, b, kind, l, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
        if kind == "resnets":
            name, rest = rest.split(".", 1)
            rest = f"{RESNET_TO_LDM[name]}.{rest}"
        if where == "mid_block":
            out[f"middle_block.{2 * l if kind == 'resnets' else 1}.{rest}"] = value
        elif where == "down_blocks":
            i = 1 + b * slots + (slots - 1 if kind == "downsamplers" else l)
            j = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[kind]
            out[f"input_blocks.{i}.{j}.{rest.removeprefix('conv.') if kind == 'downsamplers' else rest}"] = value
        else:
            i = b * slots + (slots - 1 if kind == "upsamplers" else l)
            j = {"resnets": 0, "attentions": 1, "upsamplers": 2 if config["up_block_types"][b] == CA_UP else 1}[kind]
            out[f"output_blocks.{i}.{j}.{rest}"] = value
    return out


def single_file(unet: dict, ema: dict | None = None) -> dict:
    """A whole LatentDiffusion checkpoint around LDM-layout UNet tensors: VAE, text encoder, buffers, EMA."""
    checkpoint = {LDM_UNET_PREFIX + k: v for k, v in unet.items()}
    checkpoint |= {"first_stage_model.decoder.conv_in.weight": torch.zeros(2),
                   "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    checkpoint |= {name: torch.zeros(1) for name in LDM_BUFFERS}
    for k, v in (ema or {}).items():  # LitEma: "model_ema." + the key inside LatentDiffusion.model, dots removed
        checkpoint["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v
    return checkpoint


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2, dict(TINY_SD1, in_channels=9)])
def test_ldm_checkpoint_roundtrip_and_outputs(config):
    reference, _ = make_pair(**config)
    theirs = dict(reference.config)
    checkpoint = single_file(to_ldm(reference.state_dict(), theirs))
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, theirs), reference.state_dict())  # the inverse holds
    ours_config = UNet2DConditionConfig.from_dict(theirs)
    converted = unet_condition_from_ldm(checkpoint, ours_config)
    assert_same_tensors(converted, reference.state_dict())
    with torch.device("meta"):
        ours = UNet2DConditionModel(ours_config).eval()
    ours.load_state_dict(converted, assign=True)
    x, context = inputs(config, (9, 9))
    assert output_diff(reference, ours, x, 500, context) <= ATOL


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_ldm_roundtrip_full_size_layout(config):
    """The real key layout (12 input and 12 output blocks, upsamplers at .1.conv and .2.conv), on meta tensors."""
    with torch.device("meta"):
        reference = DiffusersUNet.from_config(config)
    checkpoint = single_file(to_ldm(reference.state_dict(), config))
    assert len(checkpoint) - len(LDM_BUFFERS) - 2 == len(reference.state_dict()) == 686
    expected = convert_ldm_unet_checkpoint(checkpoint, config)
    assert sorted(expected) == sorted(reference.state_dict())
    converted = unet_condition_from_ldm(checkpoint, UNet2DConditionConfig.from_dict(config))
    assert all(converted[k] is v for k, v in expected.items()) and len(converted) == len(expected)


def test_ldm_ema_weights():
    reference, _ = make_pair(**TINY_SD1)
    config, unet = dict(reference.config), to_ldm(reference.state_dict(), dict(reference.config))
    ema = {k: v + 1 for k, v in unet.items()}
    checkpoint = single_file(unet, ema)
    ours_config = UNet2DConditionConfig.from_dict(config)
    assert_same_tensors(unet_condition_from_ldm(checkpoint, ours_config, use_ema=True),
                        convert_ldm_unet_checkpoint(checkpoint, config, extract_ema=True))
    assert_same_tensors(unet_condition_from_ldm(checkpoint, ours_config), reference.state_dict())
    # Everything in the file is accounted for: UNet (+EMA), VAE, text encoder, buffers dropped by name.
    others = {k for k in checkpoint if k.startswith(("first_stage_model.", "cond_stage_model."))}
    assert set(ldm_unet_source_keys(checkpoint)) | others | set(LDM_BUFFERS) == set(checkpoint)
    del checkpoint["model_ema.diffusion_modelout2bias"]
    with pytest.raises(ValueError, match=r"(?s)use_ema: 1 of \d+ UNet weights have no EMA copy.*modelout2bias"):
        unet_condition_from_ldm(checkpoint, ours_config, use_ema=True)


def ldm_yaml(model_channels, channel_mult, attention_resolutions, in_channels, context_dim, *, num_heads=None,
             num_head_channels=None, linear=False) -> dict:
    """The parts of an LDM v1-inference.yaml / v2-inference(-v).yaml that diffusers reads."""
    unet = dict(in_channels=in_channels, out_channels=4, model_channels=model_channels, num_res_blocks=2,
                attention_resolutions=attention_resolutions, channel_mult=channel_mult, transformer_depth=1,
                context_dim=context_dim, use_spatial_transformer=True, use_linear_in_transformer=linear)
    unet |= dict(num_heads=num_heads) if num_heads else dict(num_head_channels=num_head_channels)
    vae = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}
    return {"model": {"params": {"unet_config": {"params": unet}, "first_stage_config": {"params": vae}}}}


SD1_YAML = ldm_yaml(320, [1, 2, 4, 4], [4, 2, 1], 4, 768, num_heads=8)
SD2_YAML = ldm_yaml(320, [1, 2, 4, 4], [4, 2, 1], 4, 1024, num_head_channels=64, linear=True)


@pytest.mark.parametrize("config, yaml, known", [
    (SD15, SD1_YAML, dict(attention_head_dim=8, sample_size=64)),
    (SD21, SD2_YAML,
     dict(attention_head_dim=[5, 10, 20, 20], sample_size=96, upcast_attention=True)),
    (HUB["runwayml/stable-diffusion-inpainting"], ldm_yaml(320, [1, 2, 4, 4], [4, 2, 1], 9, 768, num_heads=8),
     dict(attention_head_dim=8, sample_size=64)),
    (dict(TINY_SD1, norm_num_groups=32), ldm_yaml(32, [1, 2, 2], [1, 2], 4, 48, num_heads=4),
     dict(attention_head_dim=4, sample_size=64)),
    (dict(TINY_SD2, norm_num_groups=32, in_channels=9), ldm_yaml(32, [1, 2, 2], [1, 2], 9, 64, num_head_channels=16,
     linear=True), dict(attention_head_dim=(2, 4, 4), sample_size=64, upcast_attention=True)),
])  # fmt: skip
def test_ldm_config_inference(config, yaml, known):
    """ldm_unet_config reads from the weights what diffusers reads from the yaml, and with the head counts etc.
    given, it equals diffusers' create_unet_diffusers_config_from_ldm and the model's own config."""
    with torch.device("meta"):
        reference = DiffusersUNet.from_config(config)
    checkpoint = single_file(to_ldm(reference.state_dict(), dict(reference.config)))
    ours = ldm_unet_config(checkpoint, **known)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes for image_size / upcast_attention
        theirs = create_unet_diffusers_config_from_ldm(yaml, checkpoint, image_size=8 * known["sample_size"],
                                                       upcast_attention=known.get("upcast_attention"))
    for key, value in theirs.items():
        if key in UNSUPPORTED:
            assert value in UNSUPPORTED[key], key
        else:
            assert getattr(ours, key) == (tuple(value) if isinstance(value, list) else value), key
    assert ours == UNet2DConditionConfig.from_dict({**config, "sample_size": known["sample_size"]})


def test_ldm_config_inference_needs_heads_and_rejects_contradictions():
    with torch.device("meta"):
        reference = DiffusersUNet(**TINY_SD1)
    checkpoint = single_file(to_ldm(reference.state_dict(), dict(reference.config)))
    with pytest.raises(ValueError, match=r"attention_head_dim=8 for SD 1.x.*\[5, 10, 20, 20\] for SD 2.x"):
        ldm_unet_config(checkpoint)
    with pytest.raises(ValueError, match=r"in_channels: the weights say 4, given 9"):
        ldm_unet_config(checkpoint, attention_head_dim=4, in_channels=9)


# --- strictness and errors ------------------------------------------------------------------------------------


def test_converters_are_strict():
    reference, ours = make_pair(**TINY_SD1)
    state_dict = reference.state_dict()
    bad = dict(state_dict, extra=torch.zeros(1))
    del bad["conv_in.bias"]
    bad["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError) as error:
        unet_condition_from_diffusers(bad, ours.config)
    message = str(error.value)
    assert "1 missing" in message and "conv_in.bias" in message and "1 unexpected" in message and "extra" in message
    assert "conv_out.weight: checkpoint (4, 32, 1, 1), model (4, 32, 3, 3)" in message

    checkpoint = single_file(to_ldm(state_dict, dict(reference.config)))
    checkpoint[LDM_UNET_PREFIX + "input_blocks.1.2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)1 unexpected.*\n +model\.diffusion_model\.input_blocks\.1\.2\.weight"):
        unet_condition_from_ldm(checkpoint, ours.config)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*conv_in\.weight: checkpoint \(32, 4, 3, 3\), model "):
        unet_condition_from_ldm(single_file(to_ldm(state_dict, dict(reference.config))),
                                UNet2DConditionConfig(**{**TINY_SD1, "in_channels": 9}))
    with pytest.raises(ValueError, match="not an original Stable Diffusion checkpoint"):
        unet_condition_from_ldm(state_dict, ours.config)


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("num_class_embeds", 10),
    ("time_cond_proj_dim", 256), ("dual_cross_attention", True), ("only_cross_attention", [False, True, False]),
    ("resnet_time_scale_shift", "scale_shift"), ("cross_attention_norm", "group_norm"), ("encoder_hid_dim", 1024),
    ("time_embedding_type", "fourier"), ("attention_type", "gated"), ("conv_in_kernel", 7),
])  # fmt: skip
def test_from_dict_rejects_unsupported_features(key, value):
    with pytest.raises(ValueError, match=f"{key}={re.escape(repr(value))} is not supported"):
        UNet2DConditionConfig.from_dict({**SD15, key: value})


@pytest.mark.parametrize("change, fragment", [
    (dict(attention_head_dim=[5, 10]), "attention_head_dim must be a positive int or a list of 3"),
    (dict(attention_head_dim=65), r"more attention heads than channels .*\(32, 65\)"),
    (dict(down_block_types=("AttnDownBlock2D", CA_DOWN, "DownBlock2D")), "unsupported block type 'AttnDownBlock2D'"),
    (dict(layers_per_block=[2, 2, 2]), r"layers_per_block=\[2, 2, 2\] is not an int"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type='UNetMidBlock2DSimple.* is not one of"),
    (dict(norm_num_groups=24), r"block_out_channels \[32, 64, 64\] are not divisible by norm_num_groups 24"),
])  # fmt: skip
def test_config_validation(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        UNet2DConditionConfig(**{**TINY_SD1, **change})


def test_forward_errors_name_the_problem():
    _, ours = make_pair(**TINY_SD1)
    x, context = inputs(TINY_SD1, (8, 8))
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(2, 77, 768\).*\(2, tokens, 48\)"):
        ours(x, 1, torch.zeros(2, 77, 768))
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(1, 77, 48\)"):
        ours(x, 1, context[:1])
    with pytest.raises(ValueError, match=r"sample has shape \(2, 9, 8, 8\); this UNet takes \(B, 4, h, w\)"):
        ours(torch.zeros(2, 9, 8, 8), 1, context)
    with pytest.raises(ValueError, match="got 3 timesteps for a batch of 2"):
        ours(x, torch.tensor([1, 2, 3]), context)
