"""Samplers: one shared noise schedule (base.py) and one file per reverse process.

Every scheduler has diffusers' interface: set_timesteps(n), timesteps, init_noise_sigma, scale_model_input(x, t),
add_noise(x0, noise, t), step(model_output, t, x, generator=None) -> .prev_sample, .pred_original_sample, order,
config and from_config(dict). SCHEDULERS names them as model folders and the command lines do.
"""

from minidiff.schedulers.base import Scheduler, SchedulerOutput, spaced_timesteps
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.pndm import PNDMScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler}

__all__ = ["SCHEDULERS", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "Scheduler", "SchedulerOutput",
           "spaced_timesteps"]
