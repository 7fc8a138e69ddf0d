"""PNDM: Stable Diffusion's default sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds").

The idea: keep DDIM's update as the "transfer" from x_t to x_{t-delta} (eq. 9), but feed it a better noise
estimate built from the last few network outputs, as a linear multistep ODE solver would. After a warm-up
the estimate is the 4th-order Adams-Bashforth combination of the last four eps (PLMS, eq. 12). The warm-up is
either three Runge-Kutta steps of four evaluations each (PRK, eq. 13; skip_prk_steps=False) or, as Stable
Diffusion configures it (skip_prk_steps=True), one second-order (Heun) step: eps at t gives a first x_{t-delta};
eps there, averaged with the first, redoes the step from x_t (so the second timestep appears twice).

The state (past eps and the sample of the warm-up) lives in the scheduler: call set_timesteps before every
sampling run. step() draws no noise. Numbers match diffusers 0.42's PNDMScheduler (tests/test_pndm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minidiff.config import setting
from minidiff.noise import Generator
from minidiff.schedulers.base import NoiseScheduleConfig, Scheduler, SchedulerOutput, spaced_timesteps


def pndm_transfer(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
                  alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """PNDM eq. 9, the transfer x_t -> x_prev along a noise estimate eps (DDIM's deterministic update written in
    one fraction, which is how the numbers stay diffusers'):

        x_prev = sqrt(ab_prev / ab) x_t - (ab_prev - ab) eps / (ab sqrt(1 - ab_prev) + sqrt(ab (1 - ab) ab_prev))

    The sampler's work is the eps it feeds in: Runge-Kutta (eq. 13) or linear multistep (eq. 12) combinations."""
    sample_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
    denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
    return sample_coeff * x_t - (alpha_bar_prev - alpha_bar) * eps / denominator


@dataclass
class PNDMConfig(NoiseScheduleConfig):
    skip_prk_steps: bool = False  # True (Stable Diffusion): a 2-evaluation warm-up instead of Runge-Kutta
    set_alpha_to_one: bool = False  # alpha_bar "before" the first step: 1, or alpha_bar_1
    prediction_type: str = setting("epsilon", choices=("epsilon", "v_prediction"))  # no "sample", as in diffusers


class PNDMScheduler(Scheduler):
    config_class = PNDMConfig

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = self.one if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset()

    def _reset(self) -> None:
        self.ets: list[torch.Tensor] = []  # past eps estimates, newest last
        self.counter = 0  # step() calls since set_timesteps
        self.cur_sample: torch.Tensor | None = None  # x at the start of a warm-up step
        self.cur_model_output: torch.Tensor | float = 0  # the running Runge-Kutta sum

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """N evaluation points, plus the extra ones the warm-up needs (PRK: 3 steps x 4; PLMS: 1)."""
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        steps = spaced_timesteps(self.config, num_inference_steps).numpy()[::-1]  # ascending
        if self.config.skip_prk_steps:  # the second timestep twice: the Heun warm-up evaluates there twice
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([steps[:-1], steps[-2:-1], steps[-1:]])[::-1]
        else:  # Runge-Kutta over the first three intervals, evaluated at t, t - delta/2 (twice), t - delta
            half = self.config.num_train_timesteps // num_inference_steps // 2
            prk = np.array(steps[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = steps[:-3][::-1]
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, plms]).astype(np.int64)).to(device)
        self._reset()

    def transfer(self, sample: torch.Tensor, t, prev_t, eps: torch.Tensor) -> torch.Tensor:
        """pndm_transfer between two of the schedule's steps (eps from v first, for a v-prediction model)."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":  # eps from v (Salimans & Ho 2022)
            eps = alpha_bar**0.5 * eps + (1 - alpha_bar) ** 0.5 * sample
        return pndm_transfer(sample, eps, alpha_bar, alpha_bar_prev)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """One evaluation's worth of progress. pred_original_sample is not defined here (None). `generator` is
        taken, as every scheduler's step takes it, and unused: PNDM draws no noise."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self.counter < len(self.prk_timesteps):
            prev_sample = self._step_prk(model_output, timestep, sample)
        else:
            prev_sample = self._step_plms(model_output, timestep, sample)
        self.counter += 1
        return SchedulerOutput(prev_sample, None) if return_dict else (prev_sample,)

    def _step_prk(self, eps: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """Runge-Kutta warm-up (eq. 13): four evaluations per interval, weights 1/6, 1/3, 1/3, 1/6 (multiplied,
        not divided, as diffusers does: x * (1/6) and x / 6 round differently, and the steps are bit-identical)."""
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - (0 if self.counter % 2 else delta // 2)
        t = self.prk_timesteps[self.counter // 4 * 4]  # every stage transfers from the interval's start
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * eps
            self.ets.append(eps)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * eps
        else:
            eps = self.cur_model_output + 1 / 6 * eps
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else sample
        return self.transfer(start, t, prev_t, eps)

    def _step_plms(self, eps: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """Linear multistep (eq. 12): Adams-Bashforth combinations of the last 1-4 eps."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDM with skip_prk_steps=False must run its Runge-Kutta warm-up first: "
                             "iterate over scheduler.timesteps from the start")
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - delta
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:  # the Heun correction: eps was evaluated at t (the first estimate); redo the step from t + delta
            prev_t, t = t, t + delta
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:  # first evaluation: remember x_t
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:  # second evaluation: average, step again from x_t
            eps = (eps + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:  # times 1/24, not divided by 24, as diffusers: bit-identical
            eps = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self.transfer(sample, t, prev_t, eps)
