"""Swapping samplers on a hub scheduler_config.json, as the course does:

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

diffusers 0.42 keeps the WHOLE config a scheduler was built from in `.config`: its own arguments, plus every
other key it was given, verbatim (SD's PNDM file has "clip_sample": false, "skip_prk_steps": true), with
_class_name renamed to the new class and _diffusers_version kept. A swap therefore keeps the file's
clip_sample=False instead of falling back to DDIM's default True. These tests compare minidiff's swaps with
diffusers' on every hub file in tests/reference_configs: settings, the whole `.config`, timesteps, and
10-step sampling loops with a fake model whose predicted x_0 leaves [-1, 1], so that clipping matters.

Tolerance: none. With the same settings, minidiff's DDIM and DDPM loops here are bit-identical to diffusers'
(measured: max diff 0.0 on every file). A wrong clip_sample moves the final latent by 5 to 270.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minidiff.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler  # noqa: E402

REFERENCE_CONFIGS = Path(__file__).resolve().parent / "reference_configs"  # copies of the real hub configs
BUTTERFLIES = REFERENCE_CONFIGS / "anton-l__ddpm-butterflies-128/scheduler/scheduler_config.json"  # a DDPM file
SD15 = REFERENCE_CONFIGS / "runwayml__stable-diffusion-v1-5/scheduler/scheduler_config.json"  # a PNDM file
FILES = sorted(REFERENCE_CONFIGS.glob("*/scheduler/scheduler_config.json"))
OURS = {cls.__name__: cls for cls in (DDIMScheduler, DDPMScheduler, PNDMScheduler)}
# The settings each scheduler's sampling reads (besides the betas, which test_schedulers.py covers).
SHARED = ("steps_offset", "prediction_type", "timestep_spacing", "beta_schedule")
SETTINGS = {"DDIMScheduler": ("clip_sample", "set_alpha_to_one", *SHARED),
            "DDPMScheduler": ("clip_sample", "variance_type", *SHARED),
            "PNDMScheduler": ("skip_prk_steps", "set_alpha_to_one", *SHARED)}
TARGETS = ("DDIMScheduler", "DDPMScheduler")
OFFSET = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
LATENT = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the UNet. Its 0.01 t term (up to 9.8) puts the predicted x_0 far outside
    [-1, 1] (epsilon: around -100 at t = 901), so clip_sample decides the result."""
    return 0.3 * x + 0.01 * float(t) + 0.5 * OFFSET


def originals(path: Path):
    """(the file's dict, minidiff's and diffusers' scheduler of the file's _class_name)."""
    config = json.loads(path.read_text())
    name = config["_class_name"]
    if name not in OURS:
        pytest.skip(f"minidiff has no {name}")
    return config, OURS[name].from_config(config), getattr(diffusers, name).from_config(config)


def swap(ours, ref, name: str, **overrides):
    """`name`.from_config(x.config, **overrides) on both sides."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers is silent about other schedulers' keys: so must minidiff be
        ours = OURS[name].from_config(ours.config, **overrides)
    return ours, getattr(diffusers, name).from_config(ref.config, **overrides)


def settings(scheduler) -> dict:
    return {key: getattr(scheduler.config, key) for key in SETTINGS[type(scheduler).__name__]}


def whole(config) -> dict:
    """dict(scheduler.config) without diffusers' bookkeeping list of the arguments left at their defaults
    (its effect, that those keys do not carry over to the next from_config, is tested by the chain)."""
    return {key: value for key, value in dict(config).items() if key != "_use_default_values"}


def loop(scheduler, n: int = 10) -> torch.Tensor:
    scheduler.set_timesteps(n)
    x, generator = LATENT.clone(), torch.Generator().manual_seed(0)  # DDPM's noise; DDIM at eta = 0 draws none
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x, generator=generator).prev_sample
    return x


def assert_same_loop(ours, ref):
    expected, got = loop(ref), loop(ours)
    assert torch.equal(got, expected), f"final latents differ by up to {(got - expected).abs().max().item():.4g}"


files = pytest.mark.parametrize("path", FILES, ids=lambda p: p.parts[-3])
targets = pytest.mark.parametrize("target", TARGETS)


def test_every_hub_scheduler_file_is_here():
    assert len(FILES) == 7 and {json.loads(p.read_text())["_class_name"] for p in FILES} == set(OURS)


@files
@targets
def test_swap_keeps_the_files_settings(path, target):
    file, ours, ref = originals(path)
    ours, ref = swap(ours, ref, target)
    assert ours.config.clip_sample is file["clip_sample"]  # the bug: PNDM -> DDIM/DDPM fell back to True
    assert settings(ours) == settings(ref)


@files
@targets
def test_swap_keeps_the_whole_config(path, target):
    """Every key, its value as given; _class_name the new class's; attribute and item access agree."""
    _, ours, ref = originals(path)
    ours, ref = swap(ours, ref, target)
    assert whole(ours.config) == whole(ref.config)
    assert ours.config["clip_sample"] == ours.config.clip_sample and ours.config["_class_name"] == target


@files
@targets
def test_swap_timesteps(path, target):
    ours, ref = swap(*originals(path)[1:], target)
    for n in (10, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), n


@files
@targets
def test_swap_sampling_loop(path, target):
    ours, ref = swap(*originals(path)[1:], target)
    # The case exercises clipping: in diffusers, flipping clip_sample moves the result far beyond rounding.
    flipped = getattr(diffusers, target).from_config(ref.config, clip_sample=not ref.config.clip_sample)
    assert (loop(flipped) - loop(ref)).abs().max() > 1
    assert_same_loop(ours, ref)


@files
def test_chain_ddim_pndm_ddim(path):
    """Other schedulers' keys survive every hop (DDIM keeps skip_prk_steps for PNDM), and a key one scheduler
    left at its default is not passed on (butterflies: PNDM's set_alpha_to_one=False does not reach DDIM)."""
    chain = [originals(path)[1:]]
    for name in ("DDIMScheduler", "PNDMScheduler", "DDIMScheduler"):
        chain.append(swap(*chain[-1], name))
    assert [settings(ours) for ours, _ in chain[1:]] == [settings(ref) for _, ref in chain[1:]]
    assert_same_loop(*chain[-1])
    assert [whole(ours.config) for ours, _ in chain[1:]] == [whole(ref.config) for _, ref in chain[1:]]


def test_from_a_diffusers_config():
    """Course code can hand minidiff a diffusers scheduler's .config: its _use_default_values must be honoured."""
    pndm = diffusers.PNDMScheduler.from_config(json.loads(BUTTERFLIES.read_text()))
    ours, ref = DDIMScheduler.from_config(pndm.config), diffusers.DDIMScheduler.from_config(pndm.config)
    assert ref.config.set_alpha_to_one is True and ref.config.clip_sample is True  # DDIM's default; the file's
    assert settings(ours) == settings(ref) and whole(ours.config) == whole(ref.config)
    assert_same_loop(ours, ref)


def test_from_config_overrides_win():
    """from_config(config, **overrides): an override of one of the class's arguments replaces the config's
    value (in .config too); an override the class does not take is dropped, and the kept key is unchanged."""
    _, ours, ref = originals(SD15)
    overrides = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                     skip_prk_steps=False)
    ours, ref = swap(ours, ref, "DDIMScheduler", **overrides)
    assert ref.config.rescale_betas_zero_snr is True and ref.config.timestep_spacing == "trailing"
    assert ref.config.skip_prk_steps is True  # not a DDIM argument: the PNDM file's value stays
    assert settings(ours) == settings(ref) and whole(ours.config) == whole(ref.config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert_same_loop(ours, ref)
