"""The noise schedule that every sampler shares, and what the network's output says about x_0.

Read top to bottom, this file follows the papers:
1. the forward process: a variance schedule beta_t and q(x_t | x_0)    Ho et al. 2020 ("DDPM"), eq. 4
2. what the network predicts: the noise eps, x_0 itself, or v          DDPM eq. 15; Salimans & Ho 2022 ("v")

The samplers build on it, one file each: ddpm.py (the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 6-7), ddim.py
(Song et al. 2021, eq. 12 and 16), pndm.py (Liu et al. 2022). The names and arguments are diffusers'
(`set_timesteps`, `timesteps`, `add_noise`, `step(...).prev_sample`, `from_config`), so course notebook code
ports by changing the import, and the numbers are diffusers 0.42's (tests/test_schedulers.py compares them over
the full grid of options).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.config import require, setting, validate
from minidiff.logging import MinidiffWarning

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
MAX_TIMESTEPS = 100_000  # T: 1000 in every hub scheduler_config.json, 4000 in Nichol & Dhariwal 2021

# ---------------------------------------------------------------------------------------------------------------
# 1. The forward process


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2) with s = 0.008,
    and beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at `max_beta` to avoid a singularity at t = T."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 (pure noise at
    t = T, signal-to-noise ratio zero) while alpha_bar_1 is unchanged."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar -= last
    sqrt_alpha_bar *= first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass
class NoiseScheduleConfig:
    """The fields every diffusers scheduler_config.json shares, with diffusers' defaults."""

    num_train_timesteps: int = setting(1000, min=1, max=MAX_TIMESTEPS)  # T, the length of the forward process
    beta_start: float = 0.0001  # beta_1 (linear schedules)
    beta_end: float = 0.02  # beta_T (linear schedules)
    beta_schedule: str = setting("linear", choices=BETA_SCHEDULES)  # "scaled_linear" is Stable Diffusion's
    # an explicit beta_1..beta_T, overriding the schedule
    trained_betas: list[float] | np.ndarray | torch.Tensor | None = None
    prediction_type: str = setting("epsilon", choices=PREDICTION_TYPES)  # what the network outputs
    timestep_spacing: str = setting("leading", choices=TIMESTEP_SPACINGS)  # how N sampling steps are picked from T
    steps_offset: int = setting(0, min=0, max=MAX_TIMESTEPS)  # added to every "leading" timestep (SD uses 1)

    def __post_init__(self) -> None:
        validate(self)
        T, betas = self.num_train_timesteps, self.trained_betas
        if betas is not None:
            require(self, len(betas) == T, f"trained_betas has {len(betas)} entries; num_train_timesteps={T} "
                    "needs one per step")
        linear = self.beta_schedule in ("linear", "scaled_linear") and betas is None
        require(self, not linear or 0 < self.beta_start <= self.beta_end < 1,
                f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass
class X0Config(NoiseScheduleConfig):
    """A DDPM/DDIM scheduler_config.json: the shared fields plus what to do with the predicted x_0."""

    clip_sample: bool = True  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = setting(1.0, above=0)
    thresholding: bool = False  # dynamic thresholding of x_0 (replaces clip_sample when on)
    dynamic_thresholding_ratio: float = setting(0.995, above=0, max=1)
    sample_max_value: float = setting(1.0, above=0)
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024


def make_betas(config: NoiseScheduleConfig) -> torch.Tensor:
    """beta_1..beta_T in float32, computed exactly as diffusers does (torch linspace, not numpy)."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":  # DDPM sec. 4: 1e-4 to 0.02
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(T)
    return rescale_zero_terminal_snr(betas) if getattr(config, "rescale_betas_zero_snr", False) else betas


def spaced_timesteps(config: NoiseScheduleConfig, num_inference_steps: int) -> torch.Tensor:
    """The N of the T training steps that a sampler visits, in descending order (int64).
    leading: 0, T//N, 2T//N, ... (+ steps_offset); trailing: T-1 downwards in strides of T/N;
    linspace: N evenly spaced points of [0, T-1], rounded (Lin et al. 2024, Table 2 compares them)."""
    T, N = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        steps = (np.arange(0, N) * (T // N))[::-1].astype(np.int64) + config.steps_offset
    else:
        steps = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    if steps[0] >= T:  # diffusers would fail later with an IndexError inside step()
        raise ValueError(f"{N} leading steps with steps_offset={config.steps_offset} reach t={steps[0]}, past the "
                         f"last training step {T - 1}: use fewer steps or timestep_spacing='trailing'")
    return torch.from_numpy(steps.copy())


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), sec. 2.3: per sample, s = the `ratio` quantile of |x_0| (at least 1, at
    most `max_value`); clamp x_0 to [-s, s] and divide by s, so saturated pixels are pushed inwards."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile is not implemented for half precision
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # the x_0 predicted at this step (after clipping or thresholding)


# Keys that other diffusers schedulers write into scheduler_config.json (SD ships a PNDM config, for instance).
# A scheduler keeps them in its .config without using them, silently, as diffusers does, so that the next swap
# (DDIMScheduler.from_config(pndm.config)) still finds them.
OTHER_SCHEDULER_KEYS = {
    "skip_prk_steps", "set_alpha_to_one", "variance_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type",
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
    "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "predict_x0", "solver_p", "disable_corrector",
    "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "rescale_betas_zero_snr",
}


class FrozenConfig(dict):
    """A scheduler's whole config, read as a dict or by attribute (config["clip_sample"], config.clip_sample):
    its own settings, every other key it was built from (other schedulers' included, kept verbatim), and
    "_use_default_values", the settings it was not given, which the next from_config leaves to its own defaults.
    Frozen: a change is a new scheduler, Scheduler.from_config(config, **changes)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler's config is frozen: build a new one with from_config(config, **changes)")

    __setattr__ = __setitem__ = __delitem__ = update = pop = setdefault = _frozen


class Scheduler:
    """What every sampler shares: the schedule, q(x_t | x_0), the choice of timesteps, and x_0 from the output."""

    config_class: type[NoiseScheduleConfig] = NoiseScheduleConfig
    order = 1  # model evaluations per step
    init_noise_sigma = 1.0  # x_T ~ N(0, I): the initial noise needs no scaling
    default_num_inference_steps = 50  # a pipeline's default, as diffusers' DDIMPipeline (DDPM: every step)

    def __init__(self, **config) -> None:
        self.settings = self.config_class(**config)  # this scheduler's own settings, validated
        defaults = sorted(field.name for field in dataclasses.fields(self.settings) if field.name not in config)
        self.config = FrozenConfig(dataclasses.asdict(self.settings), _use_default_values=defaults)
        self.betas = make_betas(self.settings)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, DDPM eq. 4
        self.one = torch.tensor(1.0)  # alpha_bar_0: no noise at all
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike, **overrides):
        """Build from a diffusers scheduler_config.json dict as it is, or from another scheduler's `.config`
        (the course's swap: DDIMScheduler.from_config(pipe.scheduler.config)), as diffusers does:
        - this scheduler's settings come from `overrides`, else from `config`, else its defaults; a setting the
          other scheduler had only by default ("_use_default_values") takes this one's default;
        - every other key is kept in .config as it is ("_class_name" renamed to this class), unused; an unknown
          key that no diffusers scheduler writes draws a warning. Invalid values raise ValueError."""
        if isinstance(config, str | os.PathLike):  # the course's older form: from_config("google/ddpm-bedroom-256")
            return cls.from_pretrained(config, **overrides)
        defaults = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if k not in defaults and k != "_use_default_values"}
        own = {field.name for field in dataclasses.fields(cls.config_class)}
        settings = {k: v for k, v in {**config, **overrides}.items() if k in own}
        kept = {k: v for k, v in config.items() if k not in own}
        unknown = sorted(k for k in {**kept, **overrides} if k not in own and not k.startswith("_")
                         and k not in OTHER_SCHEDULER_KEYS)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", MinidiffWarning, stacklevel=2)
        if "_class_name" in kept:
            kept["_class_name"] = cls.__name__
        scheduler = cls(**settings)
        dict.update(scheduler.config, kept)  # the frozen dict's one write, while it is being built
        return scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, **overrides):
        """This scheduler with the config a model ships: a minidiff folder's "scheduler" section, or
        scheduler_config.json in a diffusers folder (in `subfolder`, "scheduler/" or the folder itself), or a hub id
        already in the local Hugging Face cache; never downloads. Read in minidiff/convert/pretrained.py."""
        from minidiff.convert.pretrained import load_scheduler

        return load_scheduler(cls, pretrained_model_name_or_path, subfolder=subfolder, revision=revision, **overrides)

    def __getattr__(self, name: str):
        """A config value read as an attribute (scheduler.num_train_timesteps), as diffusers still allows."""
        config = self.__dict__.get("config", {})
        if name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(dict(self.config), indent=2, default=str)}"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDPM and DDIM feed x_t to the network unscaled (samplers in sigma space do not)."""
        return sample

    def _check_num_inference_steps(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not (
            1 <= num_inference_steps <= T
        ):
            raise ValueError(f"num_inference_steps must be an integer from 1 to {T}, got {num_inference_steps!r}")

    def _alpha_bar(self, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at `timesteps`, shaped (B, 1, 1, ...) to broadcast against `like`."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        alpha_bar = alphas_cumprod[torch.as_tensor(timesteps, device=like.device)].flatten()
        return alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int):
        """Sample q(x_t | x_0), DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        alpha_bar = self._alpha_bar(timesteps, original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int):
        """The v-prediction target, Salimans & Ho 2022 sec. 4: v = sqrt(alpha_bar_t) eps - sqrt(1-alpha_bar_t) x_0."""
        alpha_bar = self._alpha_bar(timesteps, sample)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * sample

    # -----------------------------------------------------------------------------------------------------------
    # 2. What the network predicts

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """x_0 from the network output at x_t, by inverting eq. 4 for each parameterisation, then limited as
        the sampler does (limit_x0)."""
        if self.config.prediction_type == "epsilon":  # DDPM eq. 15
            x0 = (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
        elif self.config.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction: x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
            x0 = alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output
        return self.limit_x0(x0)

    def limit_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The predicted x_0 as the sampler uses it: as it is here (X0ClippingScheduler clips it)."""
        return x0


class X0ClippingScheduler(Scheduler):
    """DDPM and DDIM: samplers that can keep the predicted x_0 inside the data's range (X0Config)."""

    config_class: type[X0Config] = X0Config

    def limit_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen) if the config asks for it, else clipping to +-clip_sample_range if it
        asks for that, else x_0 as it is."""
        if self.settings.thresholding:
            return dynamic_threshold(x0, self.settings.dynamic_thresholding_ratio, self.settings.sample_max_value)
        if self.settings.clip_sample:
            return x0.clamp(-self.settings.clip_sample_range, self.settings.clip_sample_range)
        return x0
