"""DDPM: ancestral sampling from the posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7).

Each step predicts x_0 from the network's output (base.py), forms the posterior mean of eq. 7 from x_0 and x_t,
and adds noise of the variance the config names (sigma_t^2 = beta_tilde_t or beta_t, sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minidiff.config import setting
from minidiff.noise import Generator, randn_tensor
from minidiff.schedulers.base import SchedulerOutput, X0ClippingScheduler, X0Config, spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def ddpm_posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                        alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """The mean of q(x_prev | x_t, x_0), DDPM eq. 7, with ab = alpha_bar and alpha = ab / ab_prev (so that it
    also holds over skipped steps):

        mu = sqrt(ab_prev) (1 - alpha) / (1 - ab) x_0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t

    A DDPM step is x_prev = mu + sigma_t z (sigma_t: DDPMScheduler._std), with no noise at the last step."""
    alpha = alpha_bar / alpha_bar_prev
    x0_coeff = alpha_bar_prev**0.5 * (1 - alpha) / (1 - alpha_bar)
    xt_coeff = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return x0_coeff * x0 + xt_coeff * x_t


@dataclass
class DDPMConfig(X0Config):
    variance_type: str = setting("fixed_small", choices=VARIANCE_TYPES)  # sigma_t^2 of the reverse step


class DDPMScheduler(X0ClippingScheduler):
    """Ho et al. 2020. Each step draws x_{t-1} ~ N(mu(x_t, x_0), sigma_t^2 I), with x_0 predicted by the network."""

    config_class = DDPMConfig

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.custom_timesteps = False
        self.default_num_inference_steps = self.config.num_train_timesteps  # every step, as DDPMPipeline runs

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Visit `num_inference_steps` spaced steps, or exactly the descending `timesteps` given."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            if any(b >= a for a, b in zip(timesteps, timesteps[1:], strict=False)):
                raise ValueError("custom timesteps must be in strictly descending order")
            if not (0 <= timesteps[-1] and timesteps[0] < self.config.num_train_timesteps):
                raise ValueError(f"custom timesteps must lie in [0, {self.config.num_train_timesteps})")
            self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device)
            self.custom_timesteps = True
            return
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False
        self.timesteps = spaced_timesteps(self.config, num_inference_steps).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The step after `timestep` in the visited sequence (t - 1 before set_timesteps; -1 after the last)."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
        if len(index) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps")
        index = int(index[0])
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else torch.tensor(-1)

    def _std(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, predicted_variance) -> torch.Tensor:
        """sigma_t, the standard deviation of the reverse step (DDPM sec. 3.2): beta_tilde_t ("small", the
        posterior variance of eq. 7) or beta_t ("large"); learned_range interpolates the two in log space with
        the network's output (Nichol & Dhariwal 2021, eq. 15)."""
        beta = 1 - alpha_bar / alpha_bar_prev  # the effective beta over the skipped steps
        beta_tilde = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        variance_type = self.config.variance_type
        if variance_type == "fixed_small":
            return beta_tilde**0.5
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(beta_tilde))
        if variance_type == "fixed_large":
            return beta**0.5
        if variance_type == "fixed_large_log":
            # diffusers 0.42 takes the square root of log(beta) here, which is NaN; minidiff uses the intended
            # exp(0.5 log beta). tests/test_schedulers.py::test_ddpm_fixed_large_log_fix documents it.
            return torch.exp(0.5 * torch.log(beta))
        if predicted_variance is None:
            raise ValueError(f"variance_type {variance_type!r} needs a model output with twice the sample's channels")
        if variance_type == "learned":
            return predicted_variance**0.5
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(beta_tilde)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step x_t -> x_{t-1}. Noise is drawn (from `generator`) at every t > 0."""
        t = timestep
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1] and self.config.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        x0 = self.predict_x0(model_output, sample, alpha_bar)
        prev_sample = ddpm_posterior_mean(x0, sample, alpha_bar, alpha_bar_prev)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + self._std(alpha_bar, alpha_bar_prev, predicted_variance) * noise
        return SchedulerOutput(prev_sample, x0) if return_dict else (prev_sample, x0)
