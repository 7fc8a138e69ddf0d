"""Parity of minidiff's AutoencoderKL with diffusers', and its strict key maps (diffusers and original LDM).

Each parity test builds diffusers' AutoencoderKL with a seeded random init, hands its config (as diffusers
holds it, "_" keys included) to AutoencoderKLConfig.from_dict, converts its state dict and compares fp32 CPU
outputs: the posterior's mean, logvar, std and var, a seeded sample, the mode, the KL, and the decoded image.

Tolerance: minidiff runs the same float32 operations in the same order as diffusers (same GroupNorm, conv,
pad, interpolate and SDPA calls on same-shaped tensors), so the outputs come out bit-identical: the measured
max abs difference is 0.0 for every output here, including the full SD 1.5 VAE at 64x64 and 48x80 (outputs
are O(1): |mean| ~ 1, |decoded| ~ 2, KL ~ 15). ATOL = 1e-6 leaves room only for a harmless reordering of
float32 sums. It is tight on purpose: a GroupNorm eps of 1e-5 instead of the VAE's 1e-6 moves the SD 1.5
mean by 4.4e-5 and the decoded image by 2.3e-4; a symmetric pad, a wrong up-block order or a missing
logvar clamp move them by far more.
"""

import json
import re
from functools import partial

import helpers
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers import randn, seeded

from minidiff.convert.keymaps.vae import vae_from_diffusers, vae_from_ldm
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

ATOL = 1e-6

# runwayml/stable-diffusion-v1-5/vae/config.json as the hub has it (shared/reference_configs); the SD 2.x
# VAEs differ only in sample_size.
SD15_VAE_JSON = """{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"""
TINY = dict(
    block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=2, latent_channels=4, sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip
TINY3 = dict(TINY, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3)  # fmt: skip


make_pair = partial(helpers.make_pair, DiffusersAutoencoderKL, AutoencoderKL, AutoencoderKLConfig.from_dict,
                    vae_from_diffusers)


def assert_parity(reference: DiffusersAutoencoderKL, ours: AutoencoderKL, x: torch.Tensor) -> dict[str, float]:
    """Compare every output of encode and decode on image x; return the max abs difference of each."""
    with torch.no_grad():
        expected, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        pairs = {name: (getattr(expected, name), getattr(got, name)) for name in ("mean", "logvar", "std", "var")}
        pairs["mode"] = expected.mode(), got.mode()
        pairs["sample"] = expected.sample(seeded(7)), got.sample(seeded(7))  # same generator, same noise
        pairs["kl"] = expected.kl(), got.kl()
        z = randn(*got.mean.shape, seed=2)
        pairs["decode"] = reference.decode(z).sample, ours.decode(z).sample
    diffs = {}
    for name, (e, g) in pairs.items():
        assert g.shape == e.shape, name
        diffs[name] = (g - e).abs().max().item()
    assert max(diffs.values()) <= ATOL, diffs
    return diffs


def to_ldm(state_dict: dict, num_blocks: int, prefix: str = "") -> dict:
    """diffusers AutoencoderKL keys -> original LDM keys: the inverse of diffusers' convert_ldm_vae_checkpoint
    (test_ldm_layout_is_diffusers_own checks that diffusers maps the result back exactly)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def up(part: str):  # LDM numbers the decoder's blocks from the image up
        return lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.{part}."

    ldm = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", up("block"), key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", up("upsample"), key)
        key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
        match = re.search(r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", key)
        if match:
            key = key.replace(match[0], f".mid.attn_1.{attention[match[1]]}.")
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # LDM's projections are 1x1 convs
        ldm[prefix + key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")] = tensor
    return ldm


def to_legacy_names(state_dict: dict) -> dict:
    """Modern attention names -> those of VAEs saved before diffusers 0.14 (SD 1.x hub files)."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"(attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.")
    return {pattern.sub(lambda m: f"{m[1]}.{legacy[m[2]]}.", k): v for k, v in state_dict.items()}


# ---- the real SD 1.5 VAE (84M parameters) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return make_pair(**{k: v for k, v in json.loads(SD15_VAE_JSON).items() if k[0] != "_"})


def test_sd15_full_size(sd15):
    reference, ours = sd15
    assert ours.config == AutoencoderKLConfig.from_dict(json.loads(SD15_VAE_JSON))
    assert ours.config.scaling_factor == 0.18215  # not in the json: diffusers' default, which SD uses
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters()) == 83_653_863
    assert_parity(reference, ours, randn(1, 3, 64, 64))  # latents (1, 4, 8, 8)
    assert_parity(reference, ours, randn(1, 3, 48, 80))  # latents (1, 4, 6, 10)


def test_sd15_from_ldm_checkpoint(sd15):
    """A synthetic original SD checkpoint: the VAE under first_stage_model., beside keys of other components."""
    reference, ours = sd15
    expected = reference.state_dict()
    checkpoint = to_ldm(expected, 4, prefix="first_stage_model.")
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in checkpoint  # up_blocks.0, the 512-wide one
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    checkpoint |= {"model.diffusion_model.out.2.bias": torch.zeros(4), "cond_stage_model.x": torch.zeros(1)}
    converted = vae_from_ldm(checkpoint, ours.config)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    ours.load_state_dict(converted, assign=True)
    assert_parity(reference, ours, randn(1, 3, 32, 40))


# ---- tiny configs for the option matrix ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layers_per_block": 1},
        {"mid_block_add_attention": False},
        {"use_quant_conv": False},
        {"use_post_quant_conv": False},
        {"act_fn": "mish"},
        {"in_channels": 1, "out_channels": 2, "latent_channels": 8},
        {"block_out_channels": (32,), "down_block_types": ("DownEncoderBlock2D",),
         "up_block_types": ("UpDecoderBlock2D",)},  # one block: no down/upsampling
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "defaults",
)  # fmt: skip
def test_tiny_option_matrix(options):
    reference, ours = make_pair(**dict(TINY, **options))
    assert_parity(reference, ours, randn(2, reference.config.in_channels, 16, 16))


@pytest.mark.parametrize("size", [(32, 24), (16, 40), (26, 38)])
def test_sizes(size):
    """Non-square sizes, and one that is not a multiple of 4: the right/bottom pad rounds up (26 -> 13 -> 7)."""
    reference, ours = make_pair(**TINY3)
    assert_parity(reference, ours, randn(1, 3, *size))


def test_forward_sample_and_generator_lists():
    reference, ours = make_pair(**TINY)
    x = randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x).sample, reference(x).sample)  # through the mode
        assert torch.equal(ours(x, sample_posterior=True, generator=seeded(3)).sample,
                           reference(x, sample_posterior=True, generator=seeded(3)).sample)
        posterior, expected = ours.encode(x).latent_dist, reference.encode(x).latent_dist
        assert torch.equal(posterior.sample([seeded(4), seeded(5)]), expected.sample([seeded(4), seeded(5)]))
        assert not torch.equal(posterior.sample(seeded(4)), posterior.sample(seeded(5)))


def test_diagonal_gaussian_clamps_logvar_as_diffusers():
    logvar = torch.tensor([-80.0, -30.5, 0.0, 25.0]).view(1, 4, 1, 1).expand(2, 4, 3, 3)  # two outside [-30, 20]
    parameters = torch.cat([randn(2, 4, 3, 3), logvar], dim=1)  # (B, 2 * latent, h, w): mean, then logvar
    ours, expected = DiagonalGaussian(parameters), DiagonalGaussianDistribution(parameters)
    assert ours.logvar.amin() == -30.0 and ours.logvar.amax() == 20.0
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(expected, name))
    assert torch.equal(ours.kl(), expected.kl())
    assert torch.equal(ours.sample(seeded(0)), expected.sample(seeded(0)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_diffusers(dtype):
    reference, ours = make_pair(**TINY)
    reference, ours = reference.to(dtype), ours.to(dtype)
    x = randn(1, 3, 16, 16).to(dtype)
    with torch.no_grad():
        posterior = ours.encode(x).latent_dist
        assert posterior.sample(seeded(1)).dtype == dtype
        assert torch.equal(posterior.sample(seeded(1)), reference.encode(x).latent_dist.sample(seeded(1)))
        assert torch.equal(ours.decode(posterior.mean).sample, reference.decode(posterior.mean).sample)


# ---- key maps ------------------------------------------------------------------------------------------


def test_ldm_layout_is_diffusers_own():
    """to_ldm really inverts diffusers' converter, and vae_from_ldm agrees with that converter key for key."""
    reference, ours = make_pair(**TINY3)
    expected = reference.state_dict()
    checkpoint = to_ldm(expected, 3, prefix="first_stage_model.")
    by_diffusers = convert_ldm_vae_checkpoint(dict(checkpoint), dict(reference.config))
    assert by_diffusers.keys() == expected.keys()
    assert all(torch.equal(by_diffusers[k], expected[k]) for k in expected)
    ours_converted = vae_from_ldm(checkpoint, ours.config)
    assert ours_converted.keys() == by_diffusers.keys()
    assert all(torch.equal(ours_converted[k], by_diffusers[k]) for k in by_diffusers)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae.", ""])
def test_ldm_prefixes_and_training_keys(prefix):
    """SD checkpoints keep the VAE under first_stage_model. (some under vae.); a standalone VAE checkpoint has
    bare keys and may carry its training loss and EMA tensors, which are dropped by name."""
    reference, ours = make_pair(**TINY)
    checkpoint = to_ldm(reference.state_dict(), 2, prefix)
    training = ["loss.logvar", "loss.discriminator.main.0.weight", "model_ema.decay", "model_ema.encoderconv_inweight"]
    checkpoint |= {prefix + key: randn(2) for key in training}
    converted = vae_from_ldm(checkpoint, ours.config)
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())


def test_legacy_attention_names():
    reference, ours = make_pair(**TINY)
    legacy = to_legacy_names(reference.state_dict())
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert reference._fix_state_dict_keys_on_load(dict(legacy)).keys() == reference.state_dict().keys()
    converted = vae_from_diffusers(legacy, ours.config)
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())


def test_key_maps_are_strict():
    reference, ours = make_pair(**TINY)
    state_dict = reference.state_dict()
    bad = {k: v for k, v in state_dict.items() if k != "decoder.conv_in.bias"}
    bad["encoder.extra.weight"] = torch.zeros(1)
    bad["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ValueError) as error:
        vae_from_diffusers(bad, ours.config)
    message = str(error.value)
    assert "1 missing" in message and "decoder.conv_in.bias" in message
    assert "1 unexpected" in message and "encoder.extra.weight" in message
    assert "quant_conv.weight: checkpoint (8, 8, 3, 3), model (8, 8, 1, 1)" in message
    with pytest.raises(ValueError, match=r"(?s)given twice.*attentions.0.query.weight"):  # legacy and modern
        vae_from_diffusers({**state_dict, **to_legacy_names(state_dict)}, ours.config)
    with pytest.raises(ValueError, match="shape mismatches"):  # a checkpoint for another config
        vae_from_diffusers(state_dict, AutoencoderKLConfig.from_dict({**TINY, "latent_channels": 8}))

    ldm = to_ldm(state_dict, 2)
    with pytest.raises(ValueError, match=r"unexpected[^\n]*\n +encoder.down_blocks.0.resnets.0.temb_proj.weight"):
        vae_from_ldm({**ldm, "encoder.down.0.block.0.temb_proj.weight": torch.zeros(1)}, ours.config)
    with pytest.raises(ValueError, match=r"decoder.mid_block.attentions.0.to_q.weight: checkpoint \(64, 64, 3, 3\)"):
        vae_from_ldm({**ldm, "decoder.mid.attn_1.q.weight": torch.zeros(64, 64, 3, 3)}, ours.config)
    unreversed = {re.sub(r"^decoder\.up\.(\d)", lambda m: f"decoder.up.{1 - int(m[1])}", k): v for k, v in ldm.items()}
    with pytest.raises(ValueError, match="shape mismatches"):  # up blocks numbered like diffusers', not like LDM's
        vae_from_ldm(unreversed, ours.config)


# ---- AutoencoderKLConfig.from_dict ---------------------------------------------------------------------


def test_from_dict_takes_config_json_as_is():
    config = AutoencoderKLConfig.from_dict(json.loads(SD15_VAE_JSON))  # no warning for "_" keys
    assert config.block_out_channels == (128, 256, 512, 512) and config.sample_size == 512
    with pytest.warns(UserWarning, match=r"\['my_extra_key'\]"):
        AutoencoderKLConfig.from_dict({**TINY, "my_extra_key": 1})
    modern = dict(DiffusersAutoencoderKL(**TINY).config)  # every field a modern save_pretrained writes
    assert AutoencoderKLConfig.from_dict(modern).latents_mean is None
    assert AutoencoderKLConfig.from_dict({"scaling_factor": 0.13025}).scaling_factor == 0.13025


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "DownEncoderBlock2D"),
        ("up_block_types", ["UpDecoderBlock2D"], "same length"),
        ("norm_num_groups", 12, "divisible"),
        ("act_fn", "tanh", "act_fn"),
        ("latent_channels", 0, "latent_channels"),
        ("layers_per_block", 1.5, "layers_per_block"),
        ("scaling_factor", 0, "scaling_factor"),
        ("shift_factor", "0.1", "shift_factor"),
        ("latents_mean", [0.0, 1.0], "latents_mean"),
        ("sample_size", [64], "sample_size"),
        ("use_quant_conv", 1, "use_quant_conv"),
    ],
)
def test_from_dict_rejects_bad_values(key, value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        AutoencoderKLConfig.from_dict({**TINY, key: value})
