"""Parity of minidiff's pixel UNet with diffusers' UNet2DModel, and the strict converter around it.

Each parity test builds the diffusers model with a seeded random init at a real or tiny config, hands its
config dict (as diffusers holds it, "_" keys included) to UNet2DConfig.from_dict, converts its state dict with
minidiff.convert.keymaps.unet and compares fp32 CPU outputs.

Tolerance: minidiff runs the same float32 operations in the same order as diffusers (same GroupNorm, conv,
SDPA and matmul calls on same-shaped tensors), so the outputs come out bit-identical: the measured max abs
difference is 0.0 for every config here, from the 28x28 digits model to ddpm-celebahq-256 at 256x256
(outputs are O(1)). ATOL = 1e-6 leaves room only for a harmless reordering of float32 sums (~1e-7 relative
per op). It is far tighter than 1e-4 on purpose: a wrong GroupNorm eps (1e-5 instead of ddpm's 1e-6) moves
the cifar10 output by just 1.1e-4; a swapped sin/cos, a wrong freq_shift or padding, a wrong head count or a
timestep off by one move it by 3e-2 to 0.7.
"""

import json
import math
import re
from functools import partial

import helpers
import pytest
import torch
from diffusers import UNet2DModel as DiffusersUNet2DModel
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D
from helpers import output_diff, randn
from torch import nn

from minidiff.convert.keymaps.unet import check_state_dict, class_conditioned_from_course, unet2d_from_diffusers
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.models.layers import Attention, ResnetBlock, timestep_embedding
from minidiff.models.unet import UNet2DConfig, UNet2DModel

ATOL = 1e-6

# google/ddpm-celebahq-256 and google/ddpm-cifar10-32, as reconstructed in shared/reference_configs.
CELEBAHQ_256 = dict(
    sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)  # fmt: skip
CIFAR10_32 = dict(
    sample_size=32, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)  # fmt: skip
# anton-l/ddpm-butterflies-128/unet/config.json, byte for byte as the hub has it.
BUTTERFLIES_128_JSON = """{
  "_class_name": "UNet2DModel", "_diffusers_version": "0.11.1", "act_fn": "silu", "add_attention": true,
  "attention_head_dim": 8, "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                       "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 3, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 3,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]
}"""
TINY = dict(
    sample_size=16, block_out_channels=(32, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)  # fmt: skip
TINY3 = dict(TINY, block_out_channels=(32, 32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))  # fmt: skip


make_pair = partial(helpers.make_pair, DiffusersUNet2DModel, UNet2DModel, UNet2DConfig.from_dict, unet2d_from_diffusers)


def to_legacy_names(state_dict: dict) -> dict:
    """Modern diffusers names -> the attention names of old hub checkpoints: the inverse of diffusers'
    ModelMixin._fix_state_dict_keys_on_load (every UNet2DModel Attention is a _from_deprecated_attn_block)."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"(attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.")
    return {pattern.sub(lambda m: f"{m[1]}.{legacy[m[2]]}.", k): v for k, v in state_dict.items()}


# ---- the real configs ----------------------------------------------------------------------------------


def test_celebahq_256_full_size_and_legacy_names():
    reference, ours = make_pair(**CELEBAHQ_256)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = randn(2, 3, 64, 64)  # a 256 model at 64 px: each level is smaller, the bottom is 2x2
    assert output_diff(reference, ours, x, torch.tensor([10, 990])) <= ATOL
    assert output_diff(reference, ours, randn(1, 3, 256, 256), 500) <= ATOL

    # The hub files of google/ddpm-* carry the old attention names; diffusers renames them on load.
    legacy = to_legacy_names({k: v.clone() for k, v in reference.state_dict().items()})
    assert "down_blocks.4.attentions.0.proj_attn.weight" in legacy
    assert reference._fix_state_dict_keys_on_load(dict(legacy)).keys() == reference.state_dict().keys()
    with torch.no_grad():
        before = ours(x, 10).sample
        ours.load_state_dict(unet2d_from_diffusers(legacy, ours.config), assign=True)
        assert torch.equal(ours(x, 10).sample, before)


def test_cifar10_32():
    reference, ours = make_pair(**CIFAR10_32)
    assert output_diff(reference, ours, randn(2, 3, 32, 32), torch.tensor([0, 999])) <= ATOL


def test_butterflies_128_from_hub_config_json():
    reference, ours = make_pair(**{k: v for k, v in json.loads(BUTTERFLIES_128_JSON).items() if k[0] != "_"})
    assert ours.config == UNet2DConfig.from_dict(json.loads(BUTTERFLIES_128_JSON))
    assert output_diff(reference, ours, randn(1, 3, 64, 64), 321) <= ATOL


# ---- tiny configs for the option matrix ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"attention_head_dim": None},
        {"attention_head_dim": 16},
        {"attention_head_dim": 24},  # does not divide 64: 2 heads, q/k/v 48 wide
        {"downsample_padding": 0},
        {"flip_sin_to_cos": False, "freq_shift": 1},
        {"flip_sin_to_cos": True, "freq_shift": 1},
        {"flip_sin_to_cos": False, "freq_shift": 0},
        {"act_fn": "swish"},
        {"act_fn": "mish"},
        {"act_fn": "gelu"},
        {"act_fn": "relu"},
        {"center_input_sample": True},
        {"mid_block_scale_factor": math.sqrt(2)},
        {"add_attention": False},
        {"mid_block_type": None},
        {"attn_norm_num_groups": 4},
        {"time_embedding_dim": 96},
        {"layers_per_block": 1, "norm_eps": 1e-6},
        {"dropout": 0.1},  # eval mode: dropout off on both sides
        {"in_channels": 1, "out_channels": 2},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "defaults",
)
def test_tiny_option_matrix(options):
    reference, ours = make_pair(**dict(TINY, **options))
    x = randn(2, reference.config.in_channels, 16, 16)
    assert output_diff(reference, ours, x, torch.tensor([3, 700])) <= ATOL


@pytest.mark.parametrize(
    "timestep",
    [7, 999, 10.0, torch.tensor(42), torch.tensor(42.75), torch.tensor([1, 500, 999]),
     torch.tensor([0.5, 250.25, 998.0]), torch.tensor([17])],
    ids=["int", "int999", "float10.0", "0d-int", "0d-float", "batch-int", "batch-float", "one-elem"],
)  # fmt: skip
def test_timestep_forms(timestep):
    reference, ours = make_pair(**TINY)
    assert output_diff(reference, ours, randn(3, 3, 16, 16), timestep) <= ATOL


def test_python_float_timestep_is_not_truncated():
    """Deliberate difference: diffusers' UNet2DModel casts a Python scalar to long, so 499.5 becomes 499;
    minidiff embeds 499.5 (what a tensor timestep gives in both)."""
    reference, ours = make_pair(**TINY)
    x = randn(2, 3, 16, 16)
    with torch.no_grad():
        ours_out = ours(x, 499.5).sample
        assert torch.allclose(ours_out, reference(x, torch.tensor(499.5)).sample, rtol=0, atol=ATOL)
        assert (ours_out - reference(x, 499.5).sample).abs().max() > 1e-4
        assert torch.equal(reference(x, 499.5).sample, reference(x, 499).sample)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("size", [(28, 28), (24, 16), (12, 20)])
def test_sizes_other_than_sample_size(size, padding):
    """Non-square and non-power-of-two sizes that every level halves exactly: parity with diffusers."""
    reference, ours = make_pair(**dict(TINY3, downsample_padding=padding))
    assert output_diff(reference, ours, randn(1, 3, *size), 5) <= ATOL


@pytest.mark.parametrize("padding", [0, 1])
def test_odd_sizes_run_where_diffusers_raises(padding):
    """30 -> 15 -> 8: diffusers' UNet2DModel upsamples 8 to 16 and fails to concatenate the 15-pixel skip;
    minidiff upsamples to the skip's size (as diffusers' UNet2DConditionModel does)."""
    reference, ours = make_pair(**dict(TINY3, downsample_padding=padding))
    x = randn(2, 3, 30, 26)
    with pytest.raises(RuntimeError):
        reference(x, 5)
    with torch.no_grad():
        assert ours(x, 5).sample.shape == (2, 3, 30, 26)


# ---- class conditioning --------------------------------------------------------------------------------


@pytest.mark.parametrize("class_embed_type", [None, "timestep", "identity"])
def test_diffusers_class_conditioning(class_embed_type):
    reference, ours = make_pair(**TINY, class_embed_type=class_embed_type, num_class_embeds=10)
    x = randn(3, 3, 16, 16)
    labels = {None: torch.tensor([0, 3, 9]), "timestep": torch.tensor([0.0, 3.0, 9.0]),
              "identity": randn(3, 128, seed=5)}[class_embed_type]  # fmt: skip
    assert output_diff(reference, ours, x, torch.tensor([5, 50, 500]), class_labels=labels) <= ATOL
    with torch.no_grad():
        assert not torch.allclose(ours(x, 5, labels).sample, ours(x, 5, labels.flip(0)).sample)
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 5)


def test_unconditional_unet_rejects_labels():
    _, ours = make_pair(**TINY)
    with pytest.raises(ValueError, match="no class embedding"):
        ours(randn(1, 3, 16, 16), 5, class_labels=torch.tensor([1]))


class CourseClassConditionedUnet(nn.Module):
    """The course notebook's model (Unit 2, class-conditioned diffusion), verbatim but for comments."""

    def __init__(self, num_classes=10, class_emb_size=4):
        super().__init__()
        self.class_emb = nn.Embedding(num_classes, class_emb_size)
        self.model = DiffusersUNet2DModel(
            sample_size=28,
            in_channels=1 + class_emb_size,
            out_channels=1,
            layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, x, t, class_labels):
        bs, ch, w, h = x.shape
        class_cond = self.class_emb(class_labels)
        class_cond = class_cond.view(bs, class_cond.shape[1], 1, 1).expand(bs, class_cond.shape[1], w, h)
        net_input = torch.cat((x, class_cond), 1)
        return self.model(net_input, t).sample


def test_class_conditioned_unet_matches_course_notebook():
    torch.manual_seed(0)
    course = CourseClassConditionedUnet().eval()
    ours = ClassConditionedUNet().eval()
    assert ours.config.unet == UNet2DConfig.from_dict(dict(course.model.config))
    ours.load_state_dict(class_conditioned_from_course(course.state_dict(), ours.config))
    x, t, labels = randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 7, 9])
    with torch.no_grad():
        got = ours(x, t, labels).sample
        assert got.shape == (4, 1, 28, 28)
        assert (got - course(x, t, labels)).abs().max().item() <= ATOL
        # The same noisy digit asked for as a different class gets a different prediction.
        assert (ours(x, t, labels.roll(1)).sample - got).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_class_conditioned_config_checks_channels():
    with pytest.raises(ValueError, match="in_channels"):
        ClassConditionedConfig(class_emb_size=4, unet=UNet2DConfig(**TINY))  # in_channels 3 <= 4
    config = ClassConditionedConfig(num_classes=3, class_emb_size=2, unet=dict(TINY, in_channels=5))
    assert ClassConditionedUNet(config)(randn(2, 3, 16, 16), 5, torch.tensor([0, 2])).sample.shape == (2, 3, 16, 16)


# ---- building blocks the VAE and the text-conditional UNet reuse ----------------------------------------


@pytest.mark.parametrize("dim", [32, 33])
@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timestep_embedding(dim, flip, shift):
    t = torch.tensor([0, 1, 17.5, 999])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(timestep_embedding(t, dim, flip, shift), expected)


def test_resnet_block_without_time_input_and_attention_blocks():
    torch.manual_seed(0)
    reference = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=None, groups=8, eps=1e-6).eval()
    ours = ResnetBlock(32, 64, groups=8, eps=1e-6).eval()
    ours.load_state_dict(reference.state_dict())
    x = randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x, None))
    reference = DiffusersAttention(64, heads=1, dim_head=64, norm_num_groups=8, eps=1e-6, bias=True,
                                   residual_connection=True, rescale_output_factor=2.0, upcast_softmax=True)
    ours = Attention(64, None, groups=8, eps=1e-6, rescale_output_factor=2.0)
    ours.load_state_dict(reference.state_dict())
    x = randn(2, 64, 4, 6)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


# ---- the strict checker and the converter --------------------------------------------------------------


def test_check_state_dict_names_every_kind_of_problem():
    _, ours = make_pair(**TINY)
    good = ours.state_dict()
    check_state_dict(ours, good)
    bad = dict(good)
    del bad["conv_in.bias"]
    bad["up_blocks.0.attentions.0.extra.weight"] = torch.zeros(1)
    bad["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(ValueError) as error:
        check_state_dict(ours, bad)
    message = str(error.value)
    assert "1 missing" in message and "conv_in.bias" in message
    assert "1 unexpected" in message and "up_blocks.0.attentions.0.extra.weight" in message
    assert "1 shape mismatches" in message
    assert "conv_out.weight: checkpoint (3, 32, 1, 1), model (3, 32, 3, 3)" in message


def test_check_state_dict_caps_long_lists():
    _, ours = make_pair(**TINY)
    with pytest.raises(ValueError) as error:
        check_state_dict(ours, {})
    total = len(ours.state_dict())
    assert f"{total} missing" in str(error.value) and f"and {total - 10} more" in str(error.value)
    assert str(error.value).count("\n    ") == 11  # ten keys and the "... more" line


def test_converter_is_strict():
    reference, ours = make_pair(**TINY)
    state_dict = reference.state_dict()
    with pytest.raises(ValueError, match="time_embedding.linear_3.weight"):
        unet2d_from_diffusers({**state_dict, "time_embedding.linear_3.weight": torch.zeros(1)}, ours.config)
    with pytest.raises(ValueError, match=r"(?s)given twice.*attentions.0.query.weight"):  # legacy and modern
        legacy = {k: v for k, v in to_legacy_names(state_dict).items() if "query" in k}
        unet2d_from_diffusers({**state_dict, **legacy}, ours.config)
    with pytest.raises(ValueError, match="shape mismatches"):  # a checkpoint for another config
        unet2d_from_diffusers(state_dict, UNet2DConfig.from_dict({**TINY, "in_channels": 4}))


# ---- UNet2DConfig.from_dict ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("time_embedding_type", "fourier", "positional"),
        ("resnet_time_scale_shift", "scale_shift", "default"),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"], "CrossAttnDownBlock2D"),
        ("up_block_types", ["UpBlock2D"], "same length"),
        ("act_fn", "tanh", "act_fn"),
        ("downsample_type", "resnet", "downsample_type"),
        ("downsample_padding", 2, "downsample_padding"),
        ("class_embed_type", "projection", "class_embed_type"),
        ("norm_num_groups", 12, "divisible"),
        ("attention_head_dim", 128, "attention_head_dim"),
        ("layers_per_block", 0, "layers_per_block"),
        ("flip_sin_to_cos", "yes", "flip_sin_to_cos"),
        ("norm_eps", -1.0, "norm_eps"),
        ("mid_block_type", "UNetMidBlock2DCrossAttn", "mid_block_type"),
    ],
)
def test_from_dict_rejects_bad_values(key, value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        UNet2DConfig.from_dict({**TINY, key: value})


def test_from_dict_takes_config_json_as_is():
    with pytest.warns(UserWarning, match=r"\['my_extra_key'\]"):
        config = UNet2DConfig.from_dict({**TINY, "my_extra_key": 1, "_class_name": "UNet2DModel"})
    assert config.block_out_channels == (32, 64) and config.attention_head_dim == 8  # missing key: default
    old = UNet2DConfig.from_dict({**TINY, "down_block_types": ["UNetResDownBlock2D", "UNetResAttnDownBlock2D"]})
    assert old.down_block_types == TINY["down_block_types"]  # diffusers' old block names
