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
import sys
from pathlib import Path

import torch

from minidiff.training.distributed import World, close_distributed, init_distributed
from minidiff.training.loop import LR_SCHEDULES, TrainConfig, Trainer
from minidiff.training.modes import MODES


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The options every mode shares (the loop's TrainConfig and the run folder)."""
    d = TrainConfig
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, required=True, help="the run folder (must be new unless --resume)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    run.add_argument("--seed", type=int, default=d.seed, help="same seed, same run (init, data order, noise)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    run.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids (0: none)")
    run.add_argument("--num-sample-images", type=int, help="images per sample grid")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode in MODES.values():  # minidiff/training/modes.py
        sub = subcommands.add_parser(mode.name, help=mode.help, description=mode.description)
        mode.add_arguments(sub, mode.name)
        add_loop_options(sub)
        sub.set_defaults(num_sample_images=mode.num_sample_images, **mode.defaults)
    return parser.parse_args(argv)


def build_trainer(args: argparse.Namespace, world: World) -> Trainer:
    """Everything before the first step: data, model, checks, resume. Raises ValueError for any mistake."""
    if args.num_sample_images < 1 or args.sample_steps < 1:
        raise ValueError("--num-sample-images and --sample-steps must be at least 1")
    task = MODES[args.mode].make_task(args, world)
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
            print(f"wrote {model_dir} ({MODES[args.mode].then.format(model_dir)})")
        return 0
    finally:
        close_distributed(world)


if __name__ == "__main__":
    sys.exit(main())
