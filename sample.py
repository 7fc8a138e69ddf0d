"""Sample images from a minidiff model folder and save them as one PNG grid.

    python sample.py --model weights/ddpm-celebahq-256 --scheduler ddim --steps 50 --num-images 4 --out faces.png
    python sample.py --model weights/digits --class-label 7 --out sevens.png
    python sample.py --model weights/ddpm-celebahq-256 --scheduler ddim --steps 40 \
        --guidance color --color "#55FFAA" --guidance-scale 40 --out green.png

A thin front of minidiff/pipelines.py: everything here is callable from Python. The PNG carries the
settings that made it in its text metadata. A mistake in the arguments is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minidiff.guidance import LossGuidance, color_loss, parse_hex_color
from minidiff.images import make_grid, save_png, to_pil
from minidiff.pretrained import DTYPES, ModelFolderError, load_pixel_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True,
                        help="a minidiff model folder (made by python -m minidiff.convert)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], help="default: the model's own scheduler")
    parser.add_argument("--steps", type=int, help="denoising steps (default: all 1000 for DDPM, 50 for DDIM)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images (and the same as diffusers)")
    parser.add_argument("--num-images", type=int, default=1, help="images in the grid (one batch)")
    parser.add_argument("--class-label", type=int, help="the class to draw, for class-conditioned models")
    parser.add_argument("--height", type=int, help="default: the model's sample_size")
    parser.add_argument("--width", type=int, help="default: the model's sample_size")
    parser.add_argument("--guidance", choices=["color"], help="steer sampling with a loss on the predicted image")
    parser.add_argument("--color", help='target colour for --guidance color, as "#RRGGBB"')
    parser.add_argument("--guidance-scale", type=float, help="loss multiplier (default 40, as in the course)")
    parser.add_argument("--guidance-every", type=int, help="guide every k-th step only (default 1: every step)")
    parser.add_argument("--guidance-through-unet", action="store_true",
                        help="differentiate through the UNet too (the course's second variant; slower)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("sample.png"), help="output PNG (a grid of all images)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject combinations that make no sense, with the fix in the message."""
    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if args.eta != 0.0 and args.scheduler != "ddim":
        raise ValueError("--eta applies to DDIM only: add --scheduler ddim")
    if args.guidance == "color" and not args.color:
        raise ValueError('--guidance color needs a target: add --color "#RRGGBB"')
    if args.color and args.guidance != "color":
        raise ValueError("--color is the target of colour guidance: add --guidance color")
    guidance_options = [args.guidance_scale is not None, args.guidance_every is not None, args.guidance_through_unet]
    if args.guidance is None and any(guidance_options):
        raise ValueError("--guidance-scale, --guidance-every and --guidance-through-unet need --guidance")
    args.guidance_scale = 40.0 if args.guidance_scale is None else args.guidance_scale
    args.guidance_every = 1 if args.guidance_every is None else args.guidance_every
    if args.guidance_every < 1:
        raise ValueError("--guidance-every must be at least 1")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must end in .png")
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: folder {args.out.parent} does not exist")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value < 8:
            raise ValueError(f"--{side} must be at least 8 pixels")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
        pipe = load_pixel_pipeline(args.model, args.scheduler, DTYPES[args.dtype], args.device)
        guidance = None
        if args.guidance == "color":
            target = parse_hex_color(args.color)
            guidance = LossGuidance(lambda x0: color_loss(x0, target), args.guidance_scale, args.guidance_every,
                                    args.guidance_through_unet)
        labels = None if args.class_label is None else [args.class_label] * args.num_images
        generator = torch.Generator().manual_seed(args.seed)
        x, labels = pipe.prepare(args.num_images, args.steps, generator, args.height, args.width, labels)
    except (ValueError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    steps = pipe.scheduler.timesteps
    with torch.no_grad():
        for x_prev in tqdm(pipe.denoise(x, labels, guidance, generator, args.eta), total=len(steps), unit="step"):
            x = x_prev
    seconds = time.perf_counter() - start
    settings = {
        "model": str(args.model), "scheduler": type(pipe.scheduler).__name__, "steps": len(steps),
        "eta": args.eta, "seed": args.seed, "num_images": args.num_images, "class_label": args.class_label,
        "guidance": args.guidance, "color": args.color,
        "guidance_scale": args.guidance_scale if args.guidance else None,
        "guidance_every": args.guidance_every if args.guidance else None,
        "guidance_through_unet": args.guidance_through_unet if args.guidance else None,
        "dtype": args.dtype, "size": f"{x.shape[-1]}x{x.shape[-2]}", "software": "minidiff",
    }
    save_png(make_grid(to_pil(x.float())), args.out, {k: v for k, v in settings.items() if v is not None})
    print(f"wrote {args.out} ({args.num_images} image(s), {len(steps)} steps, {seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
