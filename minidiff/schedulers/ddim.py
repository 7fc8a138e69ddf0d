"""DDIM: the same training as DDPM, a faster (and, at eta = 0, deterministic) reverse process (Song et al.
2021, eq. 12 and 16). It visits N of the T training steps; eta = 1 is DDPM's ancestral sampler on those steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minidiff.noise import Generator, randn_tensor
from minidiff.schedulers.base import SchedulerOutput, X0ClippingScheduler, X0Config, spaced_timesteps


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor,
                eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The DDIM step from x_t, given its x_0 and eps, to the earlier step whose alpha_bar is alpha_bar_prev.

        sigma^2 = eta^2 (1 - alpha_bar_prev) / (1 - alpha_bar) (1 - alpha_bar / alpha_bar_prev)       eq. 16
        x_prev  = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z          eq. 12
    """
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    std = eta * variance**0.5
    # clamped: with eta = 1 and alpha_bar ~ 0 rounding can make it -1e-8, where diffusers 0.42 returns NaN
    x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - std**2).clamp(min=0) ** 0.5 * eps
    return x_prev if noise is None else x_prev + std * noise


@dataclass
class DDIMConfig(X0Config):
    set_alpha_to_one: bool = True  # alpha_bar "before" the first step: 1, or alpha_bar_1 (Stable Diffusion)


class DDIMScheduler(X0ClippingScheduler):
    """Song et al. 2021. eta = 0 is the deterministic DDIM; eta = 1 is DDPM's ancestral sampler on the same steps."""

    config_class = DDIMConfig

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = self.one if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Visit `num_inference_steps` of the T training steps, spaced as config.timestep_spacing says."""
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step x_t -> x_{t - T/N}. Noise (from `generator`, or `variance_noise`) only if eta > 0."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass a generator or variance_noise, not both")
        # The previous step is always t - T//N, as in diffusers, even for "linspace"/"trailing" timesteps that are
        # not exactly T//N apart: minidiff keeps that for parity (tests/test_schedulers.py::test_ddim_prev_timestep).
        prev_t = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_bar = self.alphas_cumprod[timestep]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0 = self.predict_x0(model_output, sample, alpha_bar)
        # eps, the direction pointing to x_t; from the clipped x_0 if asked (eq. 4 solved for eps)
        if use_clipped_model_output:
            eps = (sample - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
        elif self.config.prediction_type == "epsilon":
            eps = model_output
        elif self.config.prediction_type == "sample":
            eps = (sample - alpha_bar**0.5 * model_output) / (1 - alpha_bar) ** 0.5
        else:  # v_prediction
            eps = alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * sample

        noise = None
        if eta > 0:  # only then is noise drawn, so that the generator's later draws stay diffusers'
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, noise)
        return SchedulerOutput(prev_sample, x0) if return_dict else (prev_sample, x0)
