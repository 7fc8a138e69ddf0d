"""The training loop every mode shares: the denoising objective, AdamW, warmup and schedule, accumulation,
clipping, EMA, bf16 autocast, checkpoints with exact resume, and data parallelism.

One optimizer step, written out:

    for each of gradient_accumulation_steps micro-batches:
        draw world_size * batch_size (index, seed) pairs from the sample stream; keep this process's slice
        load those examples (random flips from each example's own generator)
        loss = objective(batch, generators)        # t, noise: from the same per-example generators
        (loss / gradient_accumulation_steps).backward()   # DDP averages gradients over processes
    clip the gradient norm; AdamW step at learning_rate(step); EMA update; log the mean loss

Each example gets its own generator, seeded from the run's stream, so the noise an image receives does not
depend on how the global batch is split into processes and micro-batches: 2 processes x batch 1, 1 process x
accumulation 2 x batch 1 and 1 process x batch 2 see the same examples, flips, timesteps and noise.

A mode (ddpm, class-conditioned, dreambooth, ...: modes.py lists them) plugs in as a Task: the module to
train, whose forward(batch, generators) returns the loss; the dataset; a function that saves the final model;
and optionally one that draws a sample grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from minidiff.images import save_png
from minidiff.loading.memory import keep_freed_memory
from minidiff.models.layers import Attention, ResnetBlock
from minidiff.models.transformer import Transformer2D
from minidiff.noise import randn_tensor
from minidiff.schedulers import Scheduler
from minidiff.training.checkpoint import (
    check_same_run,
    load_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from minidiff.training.distributed import World
from minidiff.training.loss_log import LossLog, save_loss_curve

LR_SCHEDULES = ("constant", "linear", "cosine")


class TrainingError(ValueError):
    """A run that cannot start as asked (settings, output folder); the message says what to change."""


@dataclass
class TrainConfig:
    """The loop's settings; the defaults are those of diffusers' train_unconditional.py where it has one."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-4
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    lr_schedule: str = "constant"  # one of LR_SCHEDULES, after lr_warmup_steps of linear warmup
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; diffusers uses 0.9999
    mixed_precision: str = "no"  # "bf16": autocast the forward pass to bfloat16 (weights stay float32)
    seed: int = 0
    checkpoint_every: int = 500  # steps; the last step is always checkpointed
    sample_every: int = 0  # steps between sample grids (0: none); the last step gets one too

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "sample_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise TrainingError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise TrainingError(f"--ema-decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise TrainingError(f"--mixed-precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


class Examples(Protocol):
    """A training set as the loop sees it; data.py:ImageDataset is one."""

    def __len__(self) -> int: ...

    def example(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One example as tensors; any randomness (augmentation) drawn from `generator`."""


@dataclass
class Task:
    """What a training mode hands the loop."""

    objective: nn.Module  # forward(batch: dict of (B, ...) tensors, generators: B generators) -> scalar loss
    dataset: Examples
    save_model: Callable[[Path, str], None]  # (folder, which weights) -> the final model, from the current weights
    sample_grid: Callable[[torch.Generator], Image.Image] | None = None  # a grid from the current weights
    fingerprint: dict = dataclasses.field(default_factory=dict)  # the mode's settings that must match on resume


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate for the optimizer step after `step` steps: linear warmup from 0, then constant, linear decay to 0
    or half a cosine to 0 (the lambdas of diffusers' get_scheduler, which count steps the same way)."""
    warmup, total = config.lr_warmup_steps, config.max_steps
    if step < warmup:
        return config.learning_rate * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if config.lr_schedule == "linear":
        return config.learning_rate * max(0.0, 1.0 - progress)
    if config.lr_schedule == "cosine":
        return config.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return config.learning_rate


def denoising_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Scheduler,
    x0: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The DDPM objective, "L_simple" (Ho et al. 2020, eq. 14), per example: (B,) mean squared errors.

    t ~ U{0, ..., T-1}, eps ~ N(0, I) from each example's generator; x_t = sqrt(alpha_bar_t) x_0 +
    sqrt(1 - alpha_bar_t) eps (eq. 4); the network sees (x_t, t) and is asked for eps, v (Salimans & Ho 2022)
    or x_0, as the scheduler's prediction_type says."""
    T = scheduler.config.num_train_timesteps
    t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in generators]).to(x0.device)  # (B,)
    noise = randn_tensor(x0.shape, generators, device=x0.device, dtype=torch.float32).to(x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:  # "sample"
        target = x0
    prediction = denoise(x_t, t)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Keep only the inputs of each ResnetBlock, attention and transformer block in the forward pass and
    recompute the rest during backward: activation memory drops to about the blocks' inputs, for about one more
    forward pass. Works on both UNets (pixel and Stable Diffusion), which are built from these blocks."""
    for module in unet.modules():
        if isinstance(module, ResnetBlock | Attention | Transformer2D):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


class EMA:
    """An exponential moving average of parameters, the weights a diffusion model is usually sampled with.

    After optimizer step n: shadow <- shadow - (1 - d) (shadow - param), d = min(decay, (1 + s) / (10 + s)) with
    s = n - 1 (and d = 0 at n = 1): diffusers' EMAModel with its defaults, whose warm-up keeps the early
    average from clinging to the random initialisation."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, nn.Parameter], step: int) -> None:
        """Fold in the parameters after optimizer step `step` (1, 2, ...)."""
        s = step - 1
        decay = 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))
        for name, p in parameters.items():
            shadow = self.shadow[name]
            shadow.sub_((1 - decay) * (shadow - p.detach().float()))

    @contextmanager
    def swapped_in(self, parameters: dict[str, nn.Parameter]):
        """Temporarily give the parameters the averaged values (to sample or save), then restore them."""
        backup = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(backup[name])


class SampleStream:
    """The run's endless stream of (example index, example seed): epochs of a fresh random permutation each.

    Indices and seeds are drawn one example at a time from one seeded generator, so the stream does not
    depend on how it is cut into batches. Its state (generator, epoch, order, position) is the data order a
    checkpoint saves."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.order, self.position = 0, torch.empty(0, dtype=torch.long), 0

    def take(self, n: int) -> list[tuple[int, int]]:
        pairs = []
        for _ in range(n):
            if self.position == len(self.order):
                self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
                self.epoch += 1
            index = int(self.order[self.position])
            self.position += 1
            pairs.append((index, int(torch.randint(0, 2**62, (1,), generator=self.generator))))
        return pairs

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "order": self.order,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.order, self.position = state["epoch"], state["order"], state["position"]


class Trainer:
    """Runs a Task with a TrainConfig, writing everything under `output_dir`:

        checkpoint.pt   the latest training state (checkpoint.py); --resume continues from it
        loss.jsonl      one record per step, loss.png its curve (loss_log.py)
        samples/        step-000500.png, ... sample grids (with sample_every)
        model/          the final model, for sample.py --model (EMA weights if EMA is on)
    """

    def __init__(self, task: Task, config: TrainConfig, output_dir: str | Path, world: World | None = None,
                 resume: bool = False) -> None:
        world = world or World()
        keep_freed_memory()  # reuse activation memory step after step (memory.py)
        self.task, self.config, self.world = task, config, world
        self.output_dir = Path(output_dir)
        self.checkpoint_path = self.output_dir / "checkpoint.pt"
        self.log = LossLog(self.output_dir / "loss.jsonl")
        if not resume and self.output_dir.exists() and any(self.output_dir.iterdir()):
            raise TrainingError(f"{self.output_dir} already holds files: add --resume to continue the run in it, "
                                "or choose a new --output-dir")
        self.objective = task.objective.to(world.device).train()
        self.parameters = {name: p for name, p in self.objective.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self.parameters.values(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        self.ema = EMA(self.parameters, config.ema_decay) if config.ema_decay else None
        self.stream = SampleStream(len(task.dataset), config.seed)
        self.step = 0
        settings = {k: v for k, v in dataclasses.asdict(config).items()
                    if k not in ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "sample_every")}
        global_batch = config.batch_size * config.gradient_accumulation_steps * world.world_size
        self.fingerprint = {**task.fingerprint, **settings, "global_batch_size": global_batch,
                            "examples": len(task.dataset)}
        if resume and self.checkpoint_path.exists():
            self.load(load_checkpoint(self.checkpoint_path))
        elif resume and not self.log.path.exists():
            raise TrainingError(f"{self.output_dir} holds no run to resume (no checkpoint.pt, no loss.jsonl): start "
                                "the run without --resume")
        # (--resume on a run stopped before its first checkpoint starts it again from step 0.)
        # DDP's constructor broadcasts rank 0's weights, so it also waits until every process has checked the
        # output folder, before run() writes anything to it.
        self.model = DistributedDataParallel(self.objective) if world.distributed else self.objective

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        config = self.config
        return {
            "run": self.fingerprint,
            "step": self.step,
            "model": {name: p.detach().cpu() for name, p in self.parameters.items()},
            "ema": None if self.ema is None else {name: t.cpu() for name, t in self.ema.shadow.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {"learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule,
                            "lr_warmup_steps": config.lr_warmup_steps, "max_steps": config.max_steps},
            "rng": rng_state(),
            "data": self.stream.state_dict(),
        }

    def load(self, state: dict) -> None:
        check_same_run(state["run"], self.fingerprint, self.checkpoint_path)
        if set(state["model"]) != set(self.parameters):
            raise TrainingError(f"{self.checkpoint_path} holds other parameters than this model trains")
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(state["model"][name])
        if self.ema is not None:
            self.ema.shadow = {name: t.to(self.world.device) for name, t in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # ---------------------------------------------------------------------------------------------------------
    # The loop

    def autocast(self):
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.world.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> float:
        """One optimizer step over a global batch; returns its mean loss (over examples and processes)."""
        config, world = self.config, self.world
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, config)
        accumulation = config.gradient_accumulation_steps
        total = torch.zeros((), device=world.device)
        for micro in range(accumulation):
            pairs = world.shard(self.stream.take(config.batch_size * world.world_size), config.batch_size)
            generators = [torch.Generator().manual_seed(seed) for _, seed in pairs]
            examples = [self.task.dataset.example(i, g) for (i, _), g in zip(pairs, generators, strict=True)]
            batch = {key: torch.stack([e[key] for e in examples]).to(world.device) for key in examples[0]}
            # DDP all-reduces gradients in backward; skip that on all but the last micro-batch (no_sync).
            last = micro == accumulation - 1
            with nullcontext() if last or not world.distributed else self.model.no_sync():
                with self.autocast():
                    loss = self.model(batch, generators)
                (loss / accumulation).backward()
            total += loss.detach() / accumulation
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters.values(), config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.parameters, self.step)
        return world.mean(total).item()

    def weights_in_use(self):
        """The weights to sample and save with: the EMA if there is one, else the current ones."""
        return self.ema.swapped_in(self.parameters) if self.ema is not None else nullcontext()

    def save_sample_grid(self) -> None:
        self.objective.eval()
        with self.weights_in_use(), torch.no_grad():
            grid = self.task.sample_grid(torch.Generator().manual_seed(self.config.seed))
        self.objective.train()
        save_png(grid, self.output_dir / "samples" / f"step-{self.step:06d}.png",
                 {"step": self.step, "software": "minidiff"})

    def run(self) -> Path:
        """Train to max_steps (from the checkpoint's step when resuming) and save the final model: its folder."""
        config, world = self.config, self.world
        model_dir = self.output_dir / "model"
        if world.is_main:
            (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
            self.log.truncate(self.step)
        world.barrier()
        examples_per_step = config.batch_size * config.gradient_accumulation_steps * world.world_size
        progress = tqdm(total=config.max_steps, initial=self.step, unit="step", disable=not world.is_main)
        while self.step < config.max_steps:
            start, lr = time.perf_counter(), learning_rate(self.step, config)
            loss = self.train_step()
            seconds = time.perf_counter() - start
            progress.set_postfix(loss=f"{loss:.4f}", images_per_s=f"{examples_per_step / seconds:.1f}", refresh=False)
            progress.update(1)
            if not world.is_main:
                continue
            self.log.append({"step": self.step, "epoch": self.stream.epoch, "loss": loss, "lr": lr})
            last = self.step == config.max_steps
            if self.step % config.checkpoint_every == 0 or last:
                save_checkpoint(self.state_dict(), self.checkpoint_path)
                save_loss_curve(self.log, self.output_dir / "loss.png")
            if self.task.sample_grid is not None and config.sample_every and (
                    self.step % config.sample_every == 0 or last):
                self.save_sample_grid()
        progress.close()
        if world.is_main and not model_dir.exists():
            with self.weights_in_use():
                ema = f"EMA weights (decay {config.ema_decay})" if self.ema is not None else "final weights"
                self.task.save_model(model_dir, f"{ema} after {self.step} steps")
        world.barrier()
        return model_dir
