"""Benchmarks, side by side with the reference implementations in one run: `python -m minidiff.bench [WHAT]`.

    python -m minidiff.bench tokenizer      # 10,000 prompts: minidiff vs open_clip (pure Python) vs transformers
    python -m minidiff.bench sd             # SD 1.5 architecture (random weights): load, txt2img, peak memory
    python -m minidiff.bench train          # ddpm mode training throughput at the ddpm-celebahq-256 architecture
    python -m minidiff.bench sample         # python sample.py end to end (process start to PNG), shipped models

Each measurement runs in a fresh subprocess, so load times start cold from the same page cache state and peak
memory (ru_maxrss) belongs to that measurement alone. The reference libraries are imported here only; they
are test/benchmark extras (pip install -e ".[test]").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("a photo of an astronaut riding a horse on the moon, highly detailed oil painting of a red fox "
         "in the snow, cinematic lighting, 4k, trending on artstation, watercolor sketch of a lighthouse at "
         "dawn, portrait of a cat wearing sunglasses, isometric city, neon cyberpunk street at night").split()


def prompts(n: int = 10_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def hub_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from a tokenizer folder in the hub layout (SD 1.x's settings), written from
    minidiff's shipped CLIP vocabulary: the Hub cannot be reached here."""
    from transformers import CLIPTokenizer as HFTokenizer

    from minidiff.models.tokenizer import load_clip_bpe

    vocab, merges = load_clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                              "do_lower_case": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return HFTokenizer.from_pretrained(folder)


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- tokenizer ------------------------------------------------------------------------------------------------


def bench_tokenizer(impl: str) -> dict:
    """Tokenize 10,000 prompts to padded 77-token ids, in batches of 100, with a warm BPE cache cleared first."""
    texts = prompts()
    if impl == "minidiff":
        from minidiff.models.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer()
        encode = lambda batch: tokenizer(batch, padding="max_length", truncation=True,  # noqa: E731
                                          return_tensors="pt")["input_ids"]
    elif impl == "open_clip":
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            return {"error": "open_clip_torch not installed (pip install --no-deps open_clip_torch==3.3.0)"}
        path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
        module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        tokenizer = module.SimpleTokenizer()
        encode = lambda batch: tokenizer(batch, context_length=77)  # noqa: E731
    else:
        import tempfile

        tokenizer = hub_tokenizer(Path(tempfile.mkdtemp()))
        encode = lambda batch: tokenizer(batch, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                                         return_tensors="pt").input_ids
    start = time.perf_counter()
    for i in range(0, len(texts), 100):
        encode(texts[i : i + 100])
    seconds = time.perf_counter() - start
    return {"prompts_per_s": len(texts) / seconds, "seconds": seconds}


# ---- Stable Diffusion -----------------------------------------------------------------------------------------

def make_sd_folders(workdir: Path) -> tuple[Path, Path]:
    """A random-init SD 1.5-architecture diffusers pipeline folder (built once) and its minidiff conversion."""
    ref, ours = workdir / "sd15-diffusers", workdir / "sd15-minidiff"
    if not ref.exists():
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from minidiff.convert.sd import SD_CONFIGS  # the hub configs minidiff ships for single-file conversion

        configs = SD_CONFIGS["v1"]
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        tokenizer = hub_tokenizer(workdir / "tokenizer-files")
        scheduler = DDIMScheduler.from_config(configs["scheduler"])
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(ref)
    if not ours.exists():
        subprocess.run([sys.executable, "-m", "minidiff.convert", str(ref), str(ours)], check=True)
    return ref, ours


def bench_sd(impl: str, folder: str, dtype_name: str) -> dict:
    """Load the pipeline, then one txt2img: 256x256, 10 DDIM steps, CFG 7.5, batch 1, seed 0."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    start = time.perf_counter()
    if impl == "minidiff":
        from minidiff.loading.model_folder import load_stable_diffusion

        pipe = load_stable_diffusion(folder, scheduler="ddim", dtype=dtype)
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - start
    args = dict(prompt="a photo of an astronaut riding a horse", negative_prompt="blurry", height=256, width=256,
                num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        pipe(**args)
    return {"load_s": load, "txt2img_s": time.perf_counter() - start, "peak_mb": peak_memory_mb()}


# ---- training -------------------------------------------------------------------------------------------------

# google/ddpm-celebahq-256's UNet (tests/reference_configs/RECONSTRUCTED.md), trained here at 128 px.
CELEBAHQ_UNET = dict(sample_size=128, block_out_channels=[128, 128, 256, 256, 512, 512],
                     down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4, attention_head_dim=None,
                     downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)


def bench_train(impl: str, dtype_name: str, steps: int = 4, batch: int = 4) -> dict:
    """Optimizer steps per second of the ddpm mode (AdamW, clipping, MSE on the noise) at 128 px, batch 4:
    minidiff's Trainer.train_step, or the same loop written over diffusers' UNet2DModel. One warm-up step."""
    import tempfile

    import torch

    mixed = dtype_name == "bf16"
    if impl == "minidiff":
        from minidiff.training.data import ImageDataset
        from minidiff.training.loop import TrainConfig, Trainer
        from minidiff.training.pixel import new_model, pixel_task, scratch_scheduler_config

        images = torch.randint(0, 256, (16, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        dataset = ImageDataset(images, source="random")
        model = new_model("ddpm", dataset, CELEBAHQ_UNET, scratch_scheduler_config(1000, "linear", "epsilon"), 0)
        config = TrainConfig(max_steps=steps + 1, batch_size=batch, mixed_precision="bf16" if mixed else "no")
        trainer = Trainer(pixel_task("ddpm", dataset, model), config, Path(tempfile.mkdtemp()) / "run")
        step = trainer.train_step
    else:
        import torch.nn.functional as F
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(0)
        unet = UNet2DModel(**CELEBAHQ_UNET).train()
        scheduler = DDPMScheduler()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)

        def step():
            x0 = torch.rand(batch, 3, 128, 128) * 2 - 1
            noise, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "peak_mb": peak_memory_mb()}


# ---- python sample.py, end to end ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SAMPLE_COMMANDS = {  # what a newcomer types first, for each shipped model
    "python sample.py": [],
    "python sample.py --model weights/digits --class-label 7": ["--model", "weights/digits", "--class-label", "7"],
}


def bench_sample(command: str, workdir: Path) -> dict:
    """Wall time of one `python sample.py ...` run, from process start to the PNG on disk."""
    out = workdir / "sample-bench.png"
    args = SAMPLE_COMMANDS[command]
    if "--model" in args and not (REPO / args[args.index("--model") + 1]).is_dir():
        return {"error": "not shipped yet"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), *args, "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return {"seconds": seconds, "said": result.stdout.strip().splitlines()[-1]}


# ---- driver ---------------------------------------------------------------------------------------------------


def in_subprocess(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "minidiff.bench", "_worker", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        what, *rest = argv[1:]
        result = {"tokenizer": bench_tokenizer, "sd": bench_sd, "train": bench_train}[what](*rest)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m minidiff.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["tokenizer", "sd", "train", "sample", "all"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("MINIDIFF_BENCH_DIR", "bench-work")),
                        help="where the benchmark's random-init model folders are built (several GB for sd)")
    parser.add_argument("--threads", type=int, help="torch threads in each measurement (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"minidiff.bench on {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
    if args.what in ("tokenizer", "all"):
        rows = [["tokenizer (10,000 prompts, padded to 77)", "prompts/s"]]
        for impl in ("minidiff", "open_clip", "transformers"):
            r = in_subprocess("tokenizer", impl)
            rows.append([impl, r.get("error") or f"{r['prompts_per_s']:,.0f}"])
        print(table(rows) + "\n")
    if args.what in ("sd", "all"):
        ref, ours = make_sd_folders(args.workdir)
        rows = [["SD 1.5 architecture, 256x256, 10 DDIM steps, CFG 7.5", "dtype", "load (s)", "txt2img (s)",
                 "peak memory (MB)"]]
        for dtype in ("fp32", "bf16"):
            for impl, folder in (("minidiff", ours), ("diffusers", ref)):
                r = in_subprocess("sd", impl, str(folder), dtype)
                if "error" in r:
                    rows.append([impl, dtype, r["error"], "", ""])
                else:
                    rows.append([impl, dtype, f"{r['load_s']:.1f}", f"{r['txt2img_s']:.1f}", f"{r['peak_mb']:,.0f}"])
        print(table(rows) + "\n")
    if args.what in ("train", "all"):
        rows = [["training, ddpm-celebahq-256 UNet at 128 px, batch 4", "precision", "images/s", "peak memory (MB)"]]
        for dtype in ("fp32", "bf16"):
            for impl in ("minidiff", "diffusers"):
                r = in_subprocess("train", impl, dtype)
                rows.append([impl, dtype, *([r["error"], ""] if "error" in r else
                                            [f"{r['images_per_s']:.2f}", f"{r['peak_mb']:,.0f}"])])
        print(table(rows) + "\n")
    if args.what in ("sample", "all"):
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = [["shipped models: process start to PNG", "seconds", "output"]]
        for command in SAMPLE_COMMANDS:
            r = bench_sample(command, args.workdir)
            rows.append([command, *([r["error"], ""] if "error" in r else [f"{r['seconds']:.1f}", r["said"]])])
        print(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
