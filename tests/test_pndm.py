"""Parity of minidiff's PNDM (PLMS and PRK) with diffusers 0.42's PNDMScheduler.

Whole sampling loops with a deterministic stand-in model: timesteps identical, every intermediate x within
1e-5 (fp32; the multistep combinations amplify ulps a little over 50 steps, as in test_schedulers.py).
"""

import itertools
import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minidiff.schedulers.pndm import PNDMScheduler  # noqa: E402
from tests.test_schedulers import BETAS, REFERENCE_CONFIGS, SPACINGS, assert_close, dummy_model  # noqa: E402


def _trajectory(scheduler, n, sample):
    scheduler.set_timesteps(n)
    xs, x = [], sample
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(x, t), t, x).prev_sample
        xs.append(x)
    return scheduler.timesteps, xs


@pytest.mark.parametrize("betas", [b for b in BETAS if b != "zero_snr"])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_loops_match(betas, skip_prk_steps):
    sample = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    for spacing, pred, n in itertools.product(SPACINGS, ("epsilon", "v_prediction"), (4, 7, 10, 50)):
        config = dict(**BETAS[betas], **SPACINGS[spacing], prediction_type=pred, skip_prk_steps=skip_prk_steps)
        ts_ours, ours = _trajectory(PNDMScheduler(**config), n, sample)
        ts_ref, ref = _trajectory(diffusers.PNDMScheduler(**config), n, sample)
        assert torch.equal(ts_ours, ts_ref), (spacing, n)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            assert_close(a, b, 1e-5)


def test_sd_pndm_config_runs_51_evaluations_for_50_steps():
    path = REFERENCE_CONFIGS / "runwayml__stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = PNDMScheduler.from_config(config)
    ref = diffusers.PNDMScheduler.from_config(config)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps[:3].tolist() == [981, 961, 961] and len(ours.timesteps) == 51


def test_pndm_state_resets_and_errors():
    s = PNDMScheduler(skip_prk_steps=True)
    sample = torch.randn(1, 3, 4, 4)
    first = _trajectory(s, 10, sample)[1][-1]
    again = _trajectory(s, 10, sample)[1][-1]  # set_timesteps clears the multistep history
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="set_timesteps"):
        PNDMScheduler().step(sample, 10, sample)
    with pytest.raises(ValueError, match="prediction_type"):
        PNDMScheduler(prediction_type="sample")
    prk = PNDMScheduler(skip_prk_steps=False)
    prk.set_timesteps(10)
    prk.counter = len(prk.prk_timesteps)  # jump past the warm-up without running it
    with pytest.raises(ValueError, match="Runge-Kutta"):
        prk.step(sample, prk.timesteps[prk.counter], sample)
