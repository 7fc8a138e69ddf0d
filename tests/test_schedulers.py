"""Parity of minidiff's DDPM and DDIM schedulers with diffusers 0.42 over the full grid of options.

Tolerances: fp32 on CPU. Both implementations evaluate the same formulas on the same float32 alphas_cumprod,
so a single step agrees to 1e-6 absolute (a few ulps of values of order 1; where x_0 is large because
alpha_bar_t is tiny, the comparison is relative to the reference's magnitude), and whole loops, which can
amplify ulps over up to 1,000 steps, to 1e-5.
"""

import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor as ref_randn_tensor  # noqa: E402

from minidiff.noise import randn_tensor  # noqa: E402
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, spaced_timesteps  # noqa: E402

REFERENCE_CONFIGS = Path(__file__).resolve().parent / "reference_configs"  # copies of the real hub configs

BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
}
SPACINGS = {
    "leading": dict(timestep_spacing="leading"),
    "leading+1": dict(timestep_spacing="leading", steps_offset=1),
    "trailing": dict(timestep_spacing="trailing"),
    "linspace": dict(timestep_spacing="linspace"),
}
CLIPPING = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True),
    "clip2": dict(clip_sample=True, clip_sample_range=2.0),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
STEP_COUNTS = (1, 7, 10, 50, 1000)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def both(kind: str, **config):
    """The same scheduler built by minidiff and by diffusers."""
    ours = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[kind](**config)
    ref = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind](**config)
    return ours, ref


def dummy_model(x: torch.Tensor, t, channels_out: int | None = None) -> torch.Tensor:
    """A deterministic stand-in for a UNet: smooth in x, different at every t. With channels_out = 2C it also
    returns a variance channel in (0, 0.018): a valid variance ("learned") and interpolation weight
    ("learned_range")."""
    t = float(t)
    out = 0.3 * x * math.cos(t / 300) + 0.2 * torch.sin(3 * x + t / 100)
    if channels_out == 2 * x.shape[1]:
        out = torch.cat([out, 0.009 * (1 + torch.tanh(x + t / 1000))], dim=1)
    return out


def assert_close(ours, ref, tol):
    """|ours - ref| <= tol * max(1, |ref|): absolute for values of order 1, relative for large x_0.
    Where diffusers returns NaN (DDIM with eta = 1 when alpha_bar_t ~ 0: sqrt of a rounding-negative
    1 - alpha_bar_prev - sigma^2), minidiff clamps to 0 and must be finite."""
    nan = torch.isnan(ref)
    assert torch.isfinite(ours[nan]).all()
    ours, ref = ours[~nan], ref[~nan]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("betas", BETAS)
def test_schedule_and_timesteps_identical(betas):
    for kind, (spacing, n) in itertools.product(("ddpm", "ddim"), itertools.product(SPACINGS, STEP_COUNTS)):
        ours, ref = both(kind, **BETAS[betas], **SPACINGS[spacing])
        assert torch.equal(ours.betas, ref.betas)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        assert torch.equal(ours.timesteps, ref.timesteps)
        if spacing == "leading+1" and n == 1000:
            continue  # see test_leading_offset_past_the_end
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, ref.timesteps), (kind, spacing, n)


def test_leading_offset_past_the_end():
    """Leading spacing with steps_offset=1 and N = T gives t = 1000 for T = 1000: diffusers fails inside step()
    with an IndexError; minidiff refuses in set_timesteps with a message that says what to do."""
    ours, ref = both("ddim", steps_offset=1)
    ref.set_timesteps(1000)
    with pytest.raises(IndexError):
        ref.step(torch.zeros(1), ref.timesteps[0], torch.zeros(1))
    with pytest.raises(ValueError, match="trailing"):
        ours.set_timesteps(1000)


def test_sd_timesteps_are_981_to_1():
    ours = DDIMScheduler(**BETAS["scaled_linear"], steps_offset=1, set_alpha_to_one=False)
    ours.set_timesteps(50)
    assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1 and len(ours.timesteps) == 50


def _step_grid(kind):
    extra = [dict(eta=e) for e in (0.0, 0.5, 1.0)] if kind == "ddim" else [{}]
    for betas, spacing, pred, clip, kwargs in itertools.product(BETAS, SPACINGS, PREDICTIONS, CLIPPING, extra):
        if betas == "zero_snr" and pred == "epsilon":
            continue  # x_0 = (x - eps) / 0 at t = T - 1: undefined in both (Lin et al. use v-prediction)
        yield pytest.param(betas, spacing, pred, clip, kwargs, id=f"{betas}-{spacing}-{pred}-{clip}-{kwargs}")


def _inputs(seed=0, shape=(2, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("betas,spacing,pred,clip,kwargs", list(_step_grid("ddim")))
def test_ddim_every_step_matches(betas, spacing, pred, clip, kwargs):
    config = dict(**BETAS[betas], **SPACINGS[spacing], **CLIPPING[clip], prediction_type=pred, set_alpha_to_one=False)
    ours, ref = both("ddim", **config)
    sample, model_output = _inputs()
    for n in (1, 7, 10, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        for t in ours.timesteps:
            noise = torch.randn_like(sample)  # eta > 0: both get the same variance noise
            a = ours.step(model_output, t, sample, variance_noise=noise, use_clipped_model_output=True, **kwargs)
            b = ref.step(model_output, t, sample, variance_noise=noise, use_clipped_model_output=True, **kwargs)
            assert_close(a.prev_sample, b.prev_sample, 1e-6)
            assert_close(a.pred_original_sample, b.pred_original_sample, 1e-6)
            a = ours.step(model_output, t, sample, variance_noise=noise, **kwargs)
            b = ref.step(model_output, t, sample, variance_noise=noise, **kwargs)
            assert_close(a.prev_sample, b.prev_sample, 1e-6)


@pytest.mark.parametrize("betas,spacing,pred,clip,kwargs", list(_step_grid("ddpm")))
def test_ddpm_every_step_matches(betas, spacing, pred, clip, kwargs):
    config = dict(**BETAS[betas], **SPACINGS[spacing], **CLIPPING[clip], prediction_type=pred)
    sample, model_output = _inputs()
    for variance_type in VARIANCE_TYPES:
        ours, ref = both("ddpm", **config, variance_type=variance_type)
        output = model_output
        if variance_type.startswith("learned"):  # a second half of channels carries the predicted variance
            output = torch.cat([model_output, 0.5 * torch.sigmoid(sample)], dim=1)
        for n in (1, 7, 10, 50):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            for t in ours.timesteps:
                a = ours.step(output, t, sample, generator=torch.Generator().manual_seed(int(t)))
                b = ref.step(output, t, sample, generator=torch.Generator().manual_seed(int(t)))
                assert_close(a.prev_sample, b.prev_sample, 1e-6)
                assert_close(a.pred_original_sample, b.pred_original_sample, 1e-6)


def _loop(scheduler, sample, n, channels_out=None, generator=None, **step_kwargs):
    if n is not None:
        scheduler.set_timesteps(n)
    x = sample * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(x, t, channels_out), t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_whole_ddim_loops_match(betas, pred):
    """Deterministic DDIM (eta = 0) over every spacing and step count, including all 1,000 steps."""
    if betas == "zero_snr" and pred == "epsilon":
        pytest.skip("undefined at t = T - 1 (alpha_bar = 0) in both")
    sample, _ = _inputs(1)
    for spacing, clip, n in itertools.product(SPACINGS, ("none", "threshold"), STEP_COUNTS):
        config = dict(**BETAS[betas], **SPACINGS[spacing], **CLIPPING[clip], prediction_type=pred)
        ours, ref = both("ddim", **config)
        if spacing == "leading+1" and n == 1000:
            continue  # timesteps 1000..1 run past alpha_bar's end: see test_leading_offset_past_the_end
        assert_close(_loop(ours, sample, n), _loop(ref, sample, n), 1e-5)


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_stochastic_loops_same_seed(betas, variance_type):
    """DDPM (every variance type) and DDIM with eta > 0, driven by a seeded generator: same noise, same result."""
    pred = "v_prediction" if betas == "zero_snr" else "epsilon"
    sample, _ = _inputs(2, (2, 2, 6, 6))
    c_out = 4 if variance_type.startswith("learned") else None
    for n, spacing in itertools.product((None, 7, 50, 1000), ("leading", "trailing")):
        ours, ref = both("ddpm", **BETAS[betas], **SPACINGS[spacing], prediction_type=pred, variance_type=variance_type)
        a = _loop(ours, sample, n, c_out, generator=torch.Generator().manual_seed(7))
        b = _loop(ref, sample, n, c_out, generator=torch.Generator().manual_seed(7))
        assert_close(a, b, 1e-5)
    for eta, n in itertools.product((0.3, 1.0), (10, 50)):
        ours, ref = both("ddim", **BETAS[betas], prediction_type=pred)
        a = _loop(ours, sample, n, generator=torch.Generator().manual_seed(3), eta=eta)
        b = _loop(ref, sample, n, generator=torch.Generator().manual_seed(3), eta=eta)
        assert_close(a, b, 1e-5)


def test_ddpm_custom_timesteps():
    ours, ref = both("ddpm", **BETAS["linear"])
    custom = [999, 800, 555, 300, 120, 3, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, ref.timesteps)
    sample, _ = _inputs(4)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert_close(_loop(ours, sample, None, generator=g1), _loop(ref, sample, None, generator=g2), 1e-5)
    with pytest.raises(ValueError, match="descending"):
        ours.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps(5, timesteps=[10, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_velocity(dtype):
    for betas in BETAS:
        ours, ref = both("ddpm", **BETAS[betas])
        x0, noise = (v.to(dtype) for v in _inputs(5, (4, 3, 5, 5)))
        t = torch.tensor([0, 10, 500, 999])
        assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
        assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_randn_tensor_matches_diffusers(dtype):
    shape = (3, 4, 5, 5)
    assert torch.equal(randn_tensor(shape, torch.Generator().manual_seed(0), dtype=dtype),
                       ref_randn_tensor(shape, torch.Generator().manual_seed(0), dtype=dtype))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    assert torch.equal(randn_tensor(shape, gens(), dtype=dtype), ref_randn_tensor(shape, gens(), dtype=dtype))
    with pytest.raises(ValueError, match="one per sample"):
        randn_tensor(shape, gens()[:2])


def test_half_precision_step_matches():
    """A bf16 pipeline steps in bf16: dtype promotion against the float32 alphas must match diffusers'."""
    sample, model_output = (v.to(torch.bfloat16) for v in _inputs(6))
    for kind in ("ddpm", "ddim"):
        ours, ref = both(kind, **BETAS["scaled_linear"], clip_sample=False)
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        for t in ours.timesteps:
            a = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
            b = ref.step(model_output, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
            assert a.dtype == b.dtype == torch.bfloat16
            assert torch.equal(a, b)


def test_ddpm_fixed_large_log_fix():
    """Known diffusers bug: fixed_large_log takes sqrt(log beta) (NaN). minidiff uses exp(0.5 log beta), which is
    the fixed_large step up to rounding. If diffusers fixes this, the first assertion tells us to revisit."""
    sample, model_output = _inputs(7)
    ours, ref = both("ddpm", **BETAS["linear"], variance_type="fixed_large_log")
    large, _ = both("ddpm", **BETAS["linear"], variance_type="fixed_large")
    step = lambda s: s.step(model_output, 500, sample, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.isnan(step(ref).prev_sample).all()
    assert torch.isfinite(step(ours).prev_sample).all()
    torch.testing.assert_close(step(ours).prev_sample, step(large).prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_prev_timestep_is_t_minus_stride():
    """DDIM steps from t to t - T//N, whatever the spacing (diffusers' arithmetic, kept for parity). With
    "linspace" the visited steps are not T//N apart, so a step lands between listed timesteps: the
    documented cost of parity. The grid tests above show the numbers match diffusers exactly there."""
    ours = DDIMScheduler(timestep_spacing="linspace")
    ours.set_timesteps(7)
    gaps = set((ours.timesteps[:-1] - ours.timesteps[1:]).tolist())
    assert gaps != {1000 // 7}
    sample, model_output = _inputs(8)
    stepped = ours.step(model_output, 999, sample).prev_sample
    # the same update by hand, targeting t - T//N = 857 (not the listed 832 / 833)
    a, a_prev = ours.alphas_cumprod[999], ours.alphas_cumprod[999 - 142]
    x0 = ((sample - (1 - a) ** 0.5 * model_output) / a**0.5).clamp(-1, 1)
    torch.testing.assert_close(stepped, a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * model_output)


def test_reference_configs_are_in_the_repository():
    assert len(list(REFERENCE_CONFIGS.glob("*/scheduler/scheduler_config.json"))) == 7  # all but the CLIP repo


@pytest.mark.parametrize("path", sorted(REFERENCE_CONFIGS.glob("*/scheduler/scheduler_config.json")),
                         ids=lambda p: p.parts[-3])
def test_from_config_on_hub_files(path):
    """Every real hub scheduler_config.json builds both schedulers exactly as diffusers' from_config does,
    without warnings (keys of other schedulers, like PNDM's skip_prk_steps, are ignored silently)."""
    config = json.loads(path.read_text())
    for ours_cls, ref_cls in ((DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = ours_cls.from_config(config)
        ref = ref_cls.from_config(config)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        ours.set_timesteps(50)
        ref.set_timesteps(50)
        assert torch.equal(ours.timesteps, ref.timesteps)
        assert ours.config.prediction_type == ref.config.prediction_type


def test_from_config_rejects_and_warns():
    with pytest.warns(UserWarning, match="not_a_key"):
        s = DDIMScheduler.from_config({"not_a_key": 1, "_class_name": "DDIMScheduler", "num_train_timesteps": 500})
    assert len(s) == 500
    bad = [
        {"beta_schedule": "quadratic"}, {"prediction_type": "noise"}, {"timestep_spacing": "even"},
        {"num_train_timesteps": 0}, {"num_train_timesteps": 10.5}, {"clip_sample": "yes"},
        {"beta_start": 0.5, "beta_end": 0.1}, {"trained_betas": [0.1, 0.2]}, {"dynamic_thresholding_ratio": 0},
    ]
    for config in bad:
        with pytest.raises(ValueError, match=next(iter(config)).split("_")[0]):
            DDIMScheduler.from_config(config)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler.from_config({"variance_type": "huge"})
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            DDIMScheduler().set_timesteps(n)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(1), 10, torch.zeros(1))


def test_ddim_from_ddpm_config_round_trip():
    """The course builds a DDIM sampler from a DDPM model's scheduler config."""
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    ddim = DDIMScheduler.from_config(ddpm.config)
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    assert spaced_timesteps(ddim.config, 10).tolist() == list(range(900, -1, -100))
