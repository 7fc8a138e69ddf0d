"""Sample images from a model (a minidiff folder, a diffusers pipeline, a hub id) and save them as one PNG grid.

The shipped models: a tiny Stable Diffusion (weights/tiny-sd, the default model) and the course's digits:
    python sample.py                                   # "a big red circle" -> sample.png
    python sample.py --prompt "a small blue square" "a green triangle" --num-images 4 --out shapes.png
    python sample.py --model weights/digits --class-label 7 --num-images 8 --out sevens.png
Pixel-space models (weights/digits, converted google/ddpm-*, train.py class-conditioned runs):
    python sample.py --model runs/digits/model --class-label 0 1 2 3 4 5 6 7 8 9 --num-images 8 --out digits.png
    python sample.py --model google/ddpm-cifar10-32 --scheduler ddim --steps 50    # in the Hugging Face cache
    python sample.py --model weights/ddpm-celebahq-256 --scheduler ddim --steps 40 \\
        --guidance color --color "#55FFAA" --guidance-scale 40 --out green.png
    python sample.py --model weights/ddpm-celebahq-256 --scheduler ddim --steps 40 \\
        --guidance clip --guidance-prompt "a red rose" --clip-model weights/clip-vit-b-32 --out rose.png
Stable Diffusion models (converted SD 1.x / 2.x):
    python sample.py --model weights/sd-1-5 --prompt "a watercolor fox" --negative-prompt "blurry" --out fox.png
    python sample.py --model weights/sd-1-5 --prompt "..." --init-image photo.png --strength 0.6 --out img2img.png
    python sample.py --model weights/sd-inpainting --prompt "..." --init-image photo.png --mask mask.png --out x.png
    python sample.py --prompt "a big red circle" --guidance color --color "#0000FF" --loss-scale 100 --out blue.png

A thin front of minidiff/pipelines/pixel.py and minidiff/pipelines/stable_diffusion.py: everything here is callable from
Python. The PNG carries the settings that made it in its text metadata. A mistake in the arguments is one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from minidiff.convert.pretrained import load_pipeline, pipeline_kind
from minidiff.images import make_grid, save_png, to_pil
from minidiff.loading.hf_cache import resolve
from minidiff.loading.model_folder import DTYPES, ModelFolderError, load_clip
from minidiff.pipelines.clip_guidance import clip_guidance
from minidiff.pipelines.guidance import LossGuidance, color_loss, parse_hex_color
from minidiff.pipelines.pixel import DEFAULT_CFG_SCALE, PixelPipeline
from minidiff.pipelines.stable_diffusion import StableDiffusion

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "tiny-sd"
DEFAULT_PROMPT = "a big red circle"  # for the default model: words of its training captions
PIXEL_ONLY = ("class_label", "cfg_scale")
TEXT_ONLY = ("prompt", "negative_prompt", "init_image", "strength", "mask", "clip_skip", "loss_scale")
GUIDANCE_OPTIONS = ("color", "guidance_prompt", "clip_model", "cuts", "clip_recipe", "guidance_every",
                    "guidance_through_unet")
# The loss multiplier when none is given: the course's for pixel models (Unit 2: 40 for its colour loss, 8 for
# CLIP); for Stable Diffusion the Deep Dive's blue-loss scale, 200, and the course's 8 for CLIP. Measured on
# weights/tiny-sd (10 DDIM steps, "#0000FF"): colour loss 0.77 unguided, 0.69 at 100, 0.70 at 200, 0.81 at 300
PIXEL_LOSS_SCALES = {"color": 40.0, "clip": 8.0}
SD_LOSS_SCALES = {"color": 200.0, "clip": 8.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = parser.add_argument_group("every model")
    common.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a minidiff model folder (python -m minidiff.convert, train.py), a diffusers pipeline "
                             "folder, an SD checkpoint file, or a hub id in the local Hugging Face cache")
    common.add_argument("--scheduler", choices=["ddpm", "ddim", "pndm"], help="default: the model's own scheduler")
    common.add_argument("--steps", type=int,
                        help="denoising steps (default: 50; all 1000 for a pixel model's DDPM scheduler)")
    common.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    common.add_argument("--seed", type=int, default=0, help="same seed, same images (and the same as diffusers)")
    common.add_argument("--num-images", type=int, default=1, help="images per prompt or class label (one batch)")
    common.add_argument("--height", type=int, help="default: the model's sample size (SD: a multiple of 8)")
    common.add_argument("--width", type=int, help="default: the model's sample size (SD: a multiple of 8)")
    common.add_argument("--guidance-scale", type=float,
                        help="Stable Diffusion: classifier-free guidance scale (default 7.5); pixel models: the "
                             "loss multiplier of --guidance (default 40 for color, 8 for clip, as in the course)")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute precision")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--out", type=Path, default=Path("sample.png"), help="output PNG (a grid of all images)")
    guide = parser.add_argument_group("loss guidance (every model; on Stable Diffusion, through the VAE decoder)")
    guide.add_argument("--guidance", choices=["color", "clip"], help="steer sampling with a loss on the predicted x0")
    guide.add_argument("--color", help='target colour for --guidance color, as "#RRGGBB"')
    guide.add_argument("--guidance-prompt", help="the text CLIP steers towards, for --guidance clip")
    guide.add_argument("--clip-model", type=Path, help="a minidiff CLIP model folder, for --guidance clip")
    guide.add_argument("--cuts", type=int, help="random cutouts CLIP scores per step (default 4)")
    guide.add_argument("--clip-recipe", choices=["course", "minidiff"],
                       help="course (default): the Unit 2 notebook's crop, rotation and flip of x0 in [-1, 1]; "
                            "minidiff: crop, rotation, colour jitter and blur of x0 in [0, 1]")
    guide.add_argument("--guidance-every", type=int, help="guide every k-th step only (default 1: every step)")
    guide.add_argument("--guidance-through-unet", action="store_true",
                       help="differentiate through the UNet too (the course's second variant; slower)")
    guide.add_argument("--loss-scale", type=float,
                       help="Stable Diffusion: the loss multiplier of --guidance (--guidance-scale stays the "
                            "classifier-free guidance scale); default 200 for color (the Deep Dive's), 8 for clip")
    pixel = parser.add_argument_group("pixel-space models")
    pixel.add_argument("--class-label", type=int, nargs="+", help="the class to draw, for class-conditioned models; "
                       "several: one row of --num-images per class")
    pixel.add_argument("--cfg-scale", type=float, help="classifier-free guidance of a class-conditioned model "
                       f"trained with --label-dropout, such as weights/digits (default {DEFAULT_CFG_SCALE}; 1: off)")
    text = parser.add_argument_group("Stable Diffusion models")
    text.add_argument("--prompt", nargs="+", help=f"what to draw (default model: {DEFAULT_PROMPT!r}); several "
                      "prompts: one row of --num-images per prompt")
    text.add_argument("--negative-prompt", help="what to steer away from (default: the empty prompt)")
    text.add_argument("--init-image", type=Path, help="img2img / inpainting: the starting image")
    text.add_argument("--strength", type=float, help="how much of --init-image to repaint, 0..1 (default 0.8, "
                                                     "inpainting 1.0)")
    text.add_argument("--mask", type=Path, help="inpainting: white = repaint, black = keep (needs --init-image)")
    text.add_argument("--clip-skip", type=int, help="use the text encoder's k-th layer from the end (SD 1.x habit)")
    return parser.parse_args(argv)


def given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def check_common(args: argparse.Namespace) -> None:
    """Reject what makes no sense for any model, with the fix in the message."""
    for name in ("num_images", "steps", "cuts", "guidance_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eta != 0.0 and args.scheduler != "ddim":
        raise ValueError("--eta applies to DDIM only: add --scheduler ddim")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must end in .png")
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: folder {args.out.parent} does not exist")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value < 8:
            raise ValueError(f"--{side} must be at least 8 pixels")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")


def loss_guidance(args: argparse.Namespace, dtype: torch.dtype, scale_option: str,
                  default_scales: dict[str, float]) -> LossGuidance | None:
    """The --guidance options -> a LossGuidance (or None), after checking they fit together. The loss multiplier
    is `scale_option`: --guidance-scale for pixel models, --loss-scale for Stable Diffusion."""
    scale = getattr(args, scale_option)
    if args.guidance is None:
        if extra := given(args, GUIDANCE_OPTIONS + (scale_option,)):
            raise ValueError(f"{', '.join(extra)}: only with guidance; add --guidance color or --guidance clip")
        return None
    every = args.guidance_every or 1
    scale = default_scales[args.guidance] if scale is None else scale
    if args.guidance == "color":
        if not args.color:
            raise ValueError('--guidance color needs a target: add --color "#RRGGBB"')
        if given(args, ("guidance_prompt", "clip_model", "cuts", "clip_recipe")):
            raise ValueError("--guidance-prompt, --clip-model, --cuts and --clip-recipe belong to --guidance clip")
        target = parse_hex_color(args.color)
        return LossGuidance(lambda x0: color_loss(x0, target), scale, every, args.guidance_through_unet)
    if args.color:
        raise ValueError("--color is the target of colour guidance: use --guidance color")
    if not args.guidance_prompt or not args.clip_model:
        raise ValueError('--guidance clip needs --guidance-prompt "..." and --clip-model DIR (a CLIP model folder)')
    clip_model, tokenizer = load_clip(args.clip_model, dtype, args.device)
    if not hasattr(clip_model, "get_image_features") or tokenizer is None:
        raise ValueError(f"--clip-model {args.clip_model} must be a full CLIP model (text and vision towers)")
    return clip_guidance(clip_model, tokenizer, args.guidance_prompt, scale, args.cuts or 4, every,
                         torch.Generator().manual_seed(args.seed), through_unet=args.guidance_through_unet,
                         recipe=args.clip_recipe or "course")


def guidance_settings(args: argparse.Namespace, guidance: LossGuidance | None, scale_key: str) -> dict:
    """What the PNG records of the loss guidance (nothing without it)."""
    if guidance is None:
        return {}
    clip = args.guidance == "clip"
    return {"guidance": args.guidance, "color": args.color, "guidance_prompt": args.guidance_prompt,
            "clip_recipe": guidance.loss.recipe if clip else None, "cuts": guidance.loss.n_cuts if clip else None,
            scale_key: guidance.scale, "guidance_every": guidance.every,
            "guidance_through_unet": args.guidance_through_unet}


def sample_pixel(args: argparse.Namespace, model: Path, dtype: torch.dtype):
    """Pixel-space model -> (images in [-1, 1], settings); the loop is PixelPipeline.denoise."""
    if extra := given(args, TEXT_ONLY):
        raise ValueError(f"{args.model} is a pixel-space model: {', '.join(extra)} belong to Stable Diffusion models")
    if args.scheduler == "pndm":
        raise ValueError("--scheduler pndm is for Stable Diffusion models; pixel models take ddpm or ddim")
    pipe = PixelPipeline(**load_pipeline(model, dtype, scheduler=args.scheduler, device=args.device)[1])
    guidance = loss_guidance(args, dtype, "guidance_scale", PIXEL_LOSS_SCALES)
    labels = None if args.class_label is None else [c for c in args.class_label for _ in range(args.num_images)]
    generator = torch.Generator().manual_seed(args.seed)
    batch = args.num_images * len(args.class_label or [None])
    x, labels = pipe.prepare(batch, args.steps, generator, args.height, args.width, labels)
    steps = len(pipe.scheduler.timesteps)
    cfg_scale = args.cfg_scale
    if cfg_scale is None:
        cfg_scale = DEFAULT_CFG_SCALE if pipe.has_null_class and labels is not None else 1.0
    pipe.check_cfg_scale(cfg_scale, labels)
    with torch.no_grad():
        for x_prev in tqdm(pipe.denoise(x, labels, guidance, generator, args.eta, cfg_scale), total=steps,
                           unit="step"):
            x = x_prev
    settings = {"class_label": args.class_label and " ".join(map(str, args.class_label)),
                "cfg_scale": cfg_scale if pipe.has_null_class else None,
                **guidance_settings(args, guidance, "guidance_scale")}
    return x, steps, type(pipe.scheduler).__name__, settings


def sample_text(args: argparse.Namespace, model: Path, dtype: torch.dtype):
    """Stable Diffusion model -> (images in [-1, 1], settings). StableDiffusion.prepare picks the mode from the
    images given (txt2img, img2img, inpaint); the loop is StableDiffusion.denoise."""
    if extra := given(args, PIXEL_ONLY):
        raise ValueError(f"{args.model} is a Stable Diffusion model: {', '.join(extra)} belong to pixel-space models")
    if args.prompt is None and args.model == DEFAULT_MODEL:
        args.prompt = [DEFAULT_PROMPT]
    if args.prompt is None:
        raise ValueError('a Stable Diffusion model needs --prompt "..."')
    if (args.mask or args.strength is not None) and not args.init_image:
        raise ValueError("--mask and --strength work on a starting image: add --init-image PATH")
    images = {}
    for name in ("init_image", "mask"):
        path = getattr(args, name)
        if path is not None:
            try:
                images[name] = Image.open(path)
                images[name].load()
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"--{name.replace('_', '-')} {path}: cannot read it as an image ({e})") from None
    sd = StableDiffusion(**load_pipeline(model, dtype, scheduler=args.scheduler, device=args.device)[1])
    guidance = loss_guidance(args, dtype, "loss_scale", SD_LOSS_SCALES)
    guidance_scale = 7.5 if args.guidance_scale is None else args.guidance_scale
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        run = sd.prepare(args.prompt, args.negative_prompt, args.height, args.width, args.steps or 50,
                         guidance_scale, args.num_images, generator, image=images.get("init_image"),
                         mask_image=images.get("mask"), strength=args.strength, clip_skip=args.clip_skip)
        latents = run.latents
        for step_latents in tqdm(sd.denoise(run, eta=args.eta, generator=generator, guidance=guidance),
                                 total=len(run.timesteps), unit="step"):
            latents = step_latents
        x = sd.decode(latents)
    prompt = args.prompt[0] if len(args.prompt) == 1 else json.dumps(args.prompt)
    settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "guidance_scale": guidance_scale,
                "init_image": args.init_image, "strength": args.strength, "mask": args.mask,
                "clip_skip": args.clip_skip, **guidance_settings(args, guidance, "loss_scale")}
    return x, len(run.timesteps), type(sd.scheduler).__name__, settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_common(args)
        if args.model == DEFAULT_MODEL and not DEFAULT_MODEL.exists():
            raise ValueError(f"no --model given and the default {DEFAULT_MODEL} is not there: pass --model DIR "
                             "(e.g. --model weights/digits --class-label 7)")
        model = resolve(args.model)  # a path, or a hub id in the Hugging Face cache
        kind = pipeline_kind(model)
        if kind not in ("pixel", "stable-diffusion"):
            raise ValueError(f"{args.model} holds a {kind!r} model, which does not generate images")
        start = time.perf_counter()
        sample = sample_pixel if kind == "pixel" else sample_text
        x, steps, scheduler, settings = sample(args, model, DTYPES[args.dtype])
    except (ValueError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    settings = {"model": str(args.model), "scheduler": scheduler, "steps": steps, "eta": args.eta,
                "seed": args.seed, "num_images": args.num_images, **settings, "dtype": args.dtype,
                "size": f"{x.shape[-1]}x{x.shape[-2]}", "software": "minidiff"}
    rows = len(args.prompt or args.class_label or [None])
    grid = make_grid(to_pil(x.float()), columns=args.num_images if rows > 1 else None)  # a row per prompt / label
    save_png(grid, args.out, {k: v for k, v in settings.items() if v not in (None, False)})
    about = "".join(f'"{p}", ' for p in args.prompt or [])
    print(f"wrote {args.out} ({about}{len(x)} image(s), {steps} steps, {seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
