"""Declarative configs (minidiff/config.py): every real hub config loads unchanged, and absurd or mistyped values
are refused by the config itself, with a message naming the field, before any model or schedule is built."""

import dataclasses
import json
import re
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest

from minidiff.config import setting, to_json_dict, validate
from minidiff.loading.model_folder import MODEL_CLASSES
from minidiff.models.class_conditioned import ClassConditionedConfig
from minidiff.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from minidiff.models.unet import UNet2DConfig
from minidiff.models.unet_condition import UNet2DConditionConfig
from minidiff.models.vae import AutoencoderKLConfig
from minidiff.schedulers import SCHEDULERS
from minidiff.schedulers.ddim import DDIMConfig
from minidiff.schedulers.ddpm import DDPMConfig
from minidiff.schedulers.pndm import PNDMConfig

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference_configs"  # the hub repos' config files, copied verbatim
HUB = sorted(p for p in REFERENCE.glob("*/**/*config.json") if p.name != "tokenizer_config.json")
SHIPPED = sorted((ROOT / "weights").glob("*/config.json"))
READERS = {"UNet2DModel": UNet2DConfig.from_dict, "UNet2DConditionModel": UNet2DConditionConfig.from_dict,
           "AutoencoderKL": AutoencoderKLConfig.from_dict, "CLIPTextModel": CLIPTextConfig.from_dict,
           "CLIPModel": CLIPConfig.from_dict}
CONFIGS = [UNet2DConfig, UNet2DConditionConfig, AutoencoderKLConfig, CLIPTextConfig, CLIPVisionConfig, CLIPConfig,
           ClassConditionedConfig, DDPMConfig, DDIMConfig, PNDMConfig]
UNETS = [UNet2DConfig, UNet2DConditionConfig]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def same(config, d: dict) -> None:
    """Every key of config.json `d` that is a field of `config` holds the file's value (lists as tuples)."""
    for key, value in d.items():
        if key in {f.name for f in dataclasses.fields(config)}:
            assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value), key


# --- every real config loads, value for value ------------------------------------------------------------------


def test_reference_configs_are_all_here():
    assert len(HUB) == 27 and {"unet", "vae", "text_encoder", "scheduler"} <= {p.parent.name for p in HUB}


@pytest.mark.parametrize("path", HUB, ids=lambda p: str(p.parent.relative_to(REFERENCE)))
def test_every_hub_config_loads(path):
    d = read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in a hub file is unknown to minidiff
        if path.parent.name == "scheduler":
            for scheduler_class in SCHEDULERS.values():  # its own class and every swap
                scheduler = scheduler_class.from_config(d)
                for key in {f.name for f in dataclasses.fields(scheduler.settings)} & d.keys():
                    assert scheduler.config[key] == d[key], key
            return
        if path.parent.name == "text_encoder" or "text_config" in d:
            config = CLIPTextConfig.from_dict(d)
            same(config, d.get("text_config_dict", d))
            if "vision_config" in d:
                same(CLIPVisionConfig.from_dict(d), d.get("vision_config_dict", d["vision_config"]))
                assert CLIPConfig.from_dict(d).text_config == config
            return
        same(READERS[d["_class_name"]](d), d)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_model_folders_load(path):
    d = read(path)
    for name, section in d.items():
        if name == "scheduler":
            SCHEDULERS[section["_class_name"].removesuffix("Scheduler").lower()].from_config(section)
        elif isinstance(section, dict) and "class" in section:
            config = MODEL_CLASSES[section["class"]][1](section["config"])
            assert to_json_dict(config) == section["config"], name  # a round trip changes nothing


# --- absurd sizes are refused by the config, before anything is allocated --------------------------------------

ABSURD = [
    (UNet2DConfig, dict(layers_per_block=10**6)),
    (UNet2DConfig, dict(sample_size=10**9)),
    (UNet2DConfig, dict(sample_size=[64, 10**9])),
    (UNet2DConfig, dict(block_out_channels=(10**7,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))),
    (UNet2DConfig, dict(block_out_channels=[32] * 10**6)),
    (UNet2DConfig, dict(in_channels=10**9)),
    (UNet2DConfig, dict(time_embedding_dim=10**9)),
    (UNet2DConfig, dict(num_class_embeds=10**12)),
    (UNet2DConditionConfig, dict(layers_per_block=10**6)),
    (UNet2DConditionConfig, dict(sample_size=10**9)),
    (UNet2DConditionConfig, dict(block_out_channels=(10**7,) * 4)),
    (UNet2DConditionConfig, dict(cross_attention_dim=10**9)),
    (UNet2DConditionConfig, dict(transformer_layers_per_block=(1, 1, 1, 10**6))),
    (UNet2DConditionConfig, dict(attention_head_dim=10**9)),
    (AutoencoderKLConfig, dict(layers_per_block=10**6)),
    (AutoencoderKLConfig, dict(sample_size=10**9)),
    (AutoencoderKLConfig, dict(block_out_channels=(10**7,))),
    (AutoencoderKLConfig, dict(latent_channels=10**9)),
    (CLIPTextConfig, dict(vocab_size=10**12)),
    (CLIPTextConfig, dict(max_position_embeddings=10**9)),
    (CLIPTextConfig, dict(hidden_size=2**40, num_attention_heads=1)),
    (CLIPTextConfig, dict(intermediate_size=10**9)),
    (CLIPTextConfig, dict(num_hidden_layers=10**6)),
    (CLIPVisionConfig, dict(image_size=10**9)),
    (CLIPVisionConfig, dict(num_hidden_layers=10**6)),
    (ClassConditionedConfig, dict(num_classes=10**9)),
    (ClassConditionedConfig, dict(class_emb_size=10**9)),
] + [(scheduler.config_class, dict(num_train_timesteps=10**9)) for scheduler in SCHEDULERS.values()] + [
    (scheduler.config_class, dict(steps_offset=10**30)) for scheduler in SCHEDULERS.values()
]  # fmt: skip


@pytest.mark.parametrize("config_class, values", ABSURD, ids=lambda x: x.__name__ if isinstance(x, type) else
                         ",".join(x))
def test_absurd_sizes_are_refused(config_class, values):
    """Each of these would ask for gigabytes to terabytes; the config says which field, what it got and the
    range it takes. (Nothing else runs first: the config is the first thing a model or a scheduler builds.)"""
    name = next(iter(values))
    with pytest.raises(ValueError, match=rf"^{config_class.__name__}: {name}=.*(out of range|at most)"):
        config_class(**values)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_schedulers_refuse_long_schedules_before_computing_betas(scheduler_class):
    for schedule in ("linear", "squaredcos_cap_v2"):  # the cosine betas are a Python loop over T
        config = {"num_train_timesteps": 10**9, "beta_schedule": schedule}
        with pytest.raises(ValueError, match=r"num_train_timesteps=1000000000 is out of range: need 1 <= "
                                             r"num_train_timesteps <= 100000"):
            scheduler_class.from_config(config)


def test_messages_say_the_range():
    with pytest.raises(ValueError, match=re.escape("UNet2DConfig: layers_per_block=1000000 is out of range: need 1 <= "
                                                   "layers_per_block <= 16")):
        UNet2DConfig(layers_per_block=10**6)
    with pytest.raises(ValueError, match=re.escape("AutoencoderKLConfig: block_out_channels=(10000000,) has 10000000, "
                                                   "which is out of range: need 1 <= each entry <= 8192")):
        AutoencoderKLConfig(block_out_channels=(10**7,))
    with pytest.raises(ValueError, match=re.escape("has 13 entries; at most 12 are allowed")):
        AutoencoderKLConfig(block_out_channels=(32,) * 13)
    with pytest.raises(ValueError, match=re.escape("UNet2DConfig: dropout=1.0 is out of range: need 0 <= dropout < 1")):
        UNet2DConfig(dropout=1.0)
    long = r"UNet2DConfig: block_out_channels=\[32, 32, .{,100}\.\.\.\] has 1000000 entries"  # not printed whole
    with pytest.raises(ValueError, match=long):
        UNet2DConfig(block_out_channels=[32] * 10**6)


# --- wrong types are refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class, values, words", [
    (UNet2DConfig, dict(sample_size="28"), "is not an int, a list of 2 ints or null"),
    (UNet2DConfig, dict(sample_size=28.5), "is not an int, a list of 2 ints or null"),
    (UNet2DConfig, dict(sample_size=[64]), "is not an int, a list of 2 ints or null"),
    (UNet2DConfig, dict(in_channels=True), "is not an int"),
    (UNet2DConfig, dict(in_channels=3.0), "is not an int"),
    (UNet2DConfig, dict(block_out_channels=()), "is not a non-empty list of ints"),
    (UNet2DConfig, dict(block_out_channels="32,64"), "is not a non-empty list of ints"),
    (UNet2DConfig, dict(norm_eps=float("inf")), "is not a finite number"),
    (UNet2DConfig, dict(center_input_sample="false"), "is not true or false"),
    (UNet2DConfig, dict(mid_block_type=0), "is not a string or null"),
    (UNet2DConditionConfig, dict(attention_head_dim=8.0), "is not an int or a non-empty list of ints"),
    (UNet2DConditionConfig, dict(cross_attention_dim=None), "is not an int"),
    (AutoencoderKLConfig, dict(use_quant_conv=1), "is not true or false"),
    (AutoencoderKLConfig, dict(latents_mean=[0.0, "1", 0.0, 0.0]), "is not a non-empty list of finite numbers or null"),
    (CLIPTextConfig, dict(eos_token_id=[2]), "is not an int"),
    (CLIPTextConfig, dict(layer_norm_eps=float("nan")), "is not a finite number"),
    (CLIPConfig, dict(text_config={}, vision_config=CLIPVisionConfig()), "is not a CLIPTextConfig"),
    (ClassConditionedConfig, dict(classifier_free=1), "is not true or false"),
    (DDPMConfig, dict(num_train_timesteps="1000"), "is not an int"),
    (DDIMConfig, dict(trained_betas="0.1"),
     "is not a non-empty list of finite numbers, a numpy.ndarray, a torch.Tensor or null"),
    (PNDMConfig, dict(beta_start=True), "is not a finite number"),
])  # fmt: skip
def test_wrong_types_are_refused(config_class, values, words):
    key, value = next(iter(values.items()))
    with pytest.raises(ValueError, match=re.escape(f"{config_class.__name__}: {key}={value!r} {words}")):
        config_class(**values)


def test_choices_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=re.escape("DDPMConfig: beta_schedule='quadratic' is not one of 'linear', "
                                                   "'scaled_linear', 'squaredcos_cap_v2'")):
        DDPMConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError, match=re.escape("PNDMConfig: prediction_type='sample' is not one of 'epsilon', "
                                                   "'v_prediction'")):
        PNDMConfig(prediction_type="sample")
    with pytest.raises(ValueError, match=re.escape("UNet2DConfig: time_embedding_type='fourier' is not supported: "
                                                   "minidiff implements 'positional' only")):
        UNet2DConfig(time_embedding_type="fourier")
    with pytest.raises(ValueError, match=re.escape("has 'AttnDownEncoderBlock2D', which is not supported")):
        AutoencoderKLConfig(down_block_types=["AttnDownEncoderBlock2D"])
    assert UNet2DConfig(mid_block_type=None).mid_block_type is None  # null is one of the choices


# --- JSON lists become tuples ----------------------------------------------------------------------------------


def test_json_lists_become_tuples_where_the_annotation_says_tuple():
    unet = UNet2DConfig.from_dict({"sample_size": [32, 48], "block_out_channels": [32, 64],
                                   "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                   "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]})
    assert unet.sample_size == (32, 48) and unet.block_out_channels == (32, 64)
    assert unet.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert UNet2DConfig.from_dict(to_json_dict(unet)) == unet  # and back to lists in config.json
    sd = UNet2DConditionConfig(attention_head_dim=[5, 10, 20, 20], transformer_layers_per_block=[1, 1, 2, 2])
    assert sd.attention_head_dim == (5, 10, 20, 20) and sd.transformer_layers_per_block == (1, 1, 2, 2)
    vae = AutoencoderKLConfig(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1, 1, 1, 1])
    assert vae.latents_mean == (0.1, 0.2, 0.3, 0.4) and vae.latents_std == (1, 1, 1, 1)
    betas = [0.01] * 10  # annotated list[float] (as in diffusers): kept a list, an ndarray kept an ndarray
    assert type(DDPMConfig(num_train_timesteps=10, trained_betas=betas).trained_betas) is list
    assert isinstance(DDPMConfig(num_train_timesteps=10, trained_betas=np.full(10, 0.01)).trained_betas, np.ndarray)


# --- the mechanism itself, on a made-up config -----------------------------------------------------------------


@dataclasses.dataclass
class Toy:
    size: int = setting(4, min=1, max=16)
    rate: float = setting(0.5, above=0, below=1)
    kind: str = setting("a", choices=("a", "b"))
    pair: tuple[int, int] | None = setting(None, min=0)
    widths: tuple[int, ...] = setting((8,), max=64, max_len=3)
    flag: bool = False

    def __post_init__(self):
        validate(self)


@pytest.mark.parametrize("values, message", [
    (dict(size=0), "size=0 is out of range: need 1 <= size <= 16"),
    (dict(size=17), "size=17 is out of range: need 1 <= size <= 16"),
    (dict(size=4.0), "size=4.0 is not an int"),
    (dict(rate=0), "rate=0 is out of range: need 0 < rate < 1"),
    (dict(rate=1.0), "rate=1.0 is out of range: need 0 < rate < 1"),
    (dict(rate="0.5"), "rate='0.5' is not a finite number"),
    (dict(kind="c"), "kind='c' is not one of 'a', 'b'"),
    (dict(pair=[1]), "pair=[1] is not a list of 2 ints or null"),
    (dict(pair=(1, 2, 3)), "pair=(1, 2, 3) is not a list of 2 ints or null"),
    (dict(pair=[1, -1]), "pair=[1, -1] has -1, which is out of range: need 0 <= each entry"),
    (dict(widths=[8, 128]), "widths=[8, 128] has 128, which is out of range: need each entry <= 64"),
    (dict(widths=[8] * 4), "widths=[8, 8, 8, 8] has 4 entries; at most 3 are allowed"),
    (dict(widths=[]), "widths=[] is not a non-empty list of ints"),
    (dict(flag=0), "flag=0 is not true or false"),
])  # fmt: skip
def test_validate_checks_annotations_and_settings(values, message):
    with pytest.raises(ValueError, match=f"^Toy: {re.escape(message)}$"):
        Toy(**values)
    assert Toy(size=1, rate=0.25, kind="b", pair=[0, 3], widths=[64, 1, 2], flag=True).pair == (0, 3)


def types_in(kind) -> set:
    """int | tuple[int, ...] | None -> {int, tuple, NoneType}."""
    return {kind, *(t for arg in typing.get_args(kind) for t in types_in(arg))}


def test_every_size_has_an_upper_bound():
    """A new int field (a width, a count, a length) must come with its bound, or a reason to have none."""
    unbounded = {(CLIPTextConfig, "pad_token_id"), (CLIPTextConfig, "bos_token_id"),  # ids, never sizes
                 (CLIPTextConfig, "eos_token_id"), (UNet2DConfig, "num_train_timesteps")}  # ignored
    for config_class in CONFIGS:
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            if int in types_in(hints[field.name]) and not {"max", "choices"} & field.metadata.keys():
                assert (config_class, field.name) in unbounded
