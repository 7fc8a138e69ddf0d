"""The claim: the course notebooks' code runs on minidiff with only its imports changed, and gives what diffusers and
transformers give.

Every notebook's code cells are kept verbatim in tests/course/<notebook>.py. Each runs twice, in order, in one
process per notebook (tests/course/harness.py): once as written, once through `to_minidiff` below, which rewrites
`from diffusers import ...` and `from transformers import ...` to `from minidiff import ...` and changes nothing
else (test_only_import_lines_change). The hub ids the cells load come from a simulated Hugging Face cache
(tests/course/hub_cache.py: tiny random-init models in the real repositories' layouts and configs), which that
process reads through HF_HOME with HF_HUB_OFFLINE=1, as a notebook kernel would.

What each cell assigns, displays, plots and prints is compared (tests/course/harness.py). A cell's status is one of
    ran, matched | ran, differs: ... | skipped: <why> | pending: <the minidiff feature a later issue builds> |
    fails: <the error on the minidiff side>
and test_notebook fails on any "differs" or "fails". Skipped cells are the ones that are not diffusion: installs,
logins, downloads (their outputs are fixtures: tests/course/stand_ins.py), uploads, a web UI, shell and video.

Sizes. The notebooks sample 256 px images and 512 px Stable Diffusion images; on this 2-core CPU a tiny UNet takes
~1 s per call on a batch of 256 px images and the tiny VAE ~0.3 s per 512 px image, against 40-1000 calls per
cell. So the cells listed in SIZE_EDITS run with smaller literal sizes (the same edit on both sides, printed in the
summary); the step counts, batch sizes, guidance scales and seeds stay as written. Everything else runs verbatim,
including unit 2 cell 6's 1000 DDPM steps (at the tiny model's sample_size, 32 px) and unit 2's class-conditioned
sampling over all 1000 timesteps.

Tolerance: ATOL = 1e-5 on float tensors (max abs difference), equality for integers, PIL images and generator
states; as in tests/test_pixel_pipeline.py: both sides do the same float32 operations on the same weights, but
weights read from different files (or memory-mapped at other alignments) can make a CPU kernel pick another,
equally exact, code path, which moves an image by ~1e-6; a wrong step, noise draw or guidance term moves it by
1e-2 or more. Measured here (2026-12-08): every one of the 230 float values the five notebooks compare differs
by 0.0, so the bound is that file's margin, not this harness's need.
"""

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from course import (
    deep_dive,
    stand_ins,
    textual_inversion_inference,
    unit2_class_conditioned,
    unit2_finetuning_and_guidance,
    unit3_sd_introduction,
)
from torch import nn

import minidiff

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- the rewrite

LIBRARIES = re.compile(r"^(\s*)from (diffusers|transformers) import ")


def to_minidiff(source: str) -> str:
    """The one change the claim allows: `from diffusers import X, Y` and `from transformers import X, Y` become
    `from minidiff import X, Y` (a parenthesised list keeps its lines); every other line is left as it is."""
    return "\n".join(LIBRARIES.sub(r"\1from minidiff import ", line) for line in source.split("\n"))


def is_import_line(line: str) -> bool:
    return bool(re.match(r"\s*(from \S+ )?import ", line))


# -------------------------------------------------------------------------------------------------- the plans


@dataclass
class Plan:
    """How one notebook runs here: which cells are skipped (and what stands for their outputs), which wait for a
    later minidiff feature, and which run at a smaller size."""

    name: str
    cells: dict[int, str]
    skipped: dict[int, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # minidiff class -> why it is missing
    pending_cells: dict[int, str] = field(default_factory=dict)  # cells neither side can run yet
    size_edits: dict[int, tuple[str, list[tuple[str, str]]]] = field(default_factory=dict)
    hooks: dict[int, list] = field(default_factory=dict)  # after cell n: fn(side), e.g. a skipped cell's outputs
    extra: dict[int, object] = field(default_factory=dict)  # after cell n: fn(namespace, folder) -> {label: value}
    files: object = None  # fn(folder): files the notebook finds next to it
    not_compared: dict[int, set] = field(default_factory=dict)

    def edited(self, number: int, source: str) -> str:
        for old, new in self.size_edits.get(number, ("", []))[1]:
            assert old in source, (self.name, number, old)
            source = source.replace(old, new)
        return source

    def setup(self, side) -> None:
        if self.files is not None:
            self.files(side.folder)

    def after(self, number: int, side) -> None:
        for hook in self.hooks.get(number, []):
            hook(side)

    def extras(self, number: int, side) -> dict:
        return self.extra[number](side.namespace, side.folder) if number in self.extra else {}


def reference_only(hook):
    def run(side):
        if side.name == "reference":
            hook(side)
    return run


def smaller(reason: str, *edits: tuple[str, str]) -> tuple[str, list[tuple[str, str]]]:
    return reason, list(edits)


PX256 = smaller("256 px -> 16 px", ("256, 256)", "16, 16)"))
SD512 = smaller("512 px -> 64 px (8x8 latents)", ("height = 512", "height = 64"), ("width = 512", "width = 64"))
LMS = "LMSDiscreteScheduler: sigma-space schedulers are a later issue"


# unit 2, notebook 1 ------------------------------------------------------------------------------------------


def butterflies(side):
    """Unit 2 cell 12's outputs: a dataset and a shuffled DataLoader of 4 images, 2 per batch."""
    side.namespace["dataset"], side.namespace["train_dataloader"] = stand_ins.butterflies()
    side.namespace.update(image_size=16, batch_size=2)


class TinyCLIP(nn.Module):
    """Stands for open_clip's ViT-B-32 (unit 2 cell 28 downloads its weights): an image and a text encoder to 16
    dimensions, the same weights on both sides."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(28)
        self.image = nn.Parameter(torch.randn(3 * 4 * 4, 16, generator=generator) / 7)
        self.text = nn.Parameter(torch.randn(128, 16, generator=generator))

    def encode_image(self, images):  # (B, 3, H, W) -> (B, 16)
        return nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.image

    def encode_text(self, tokens):  # (B, 77) -> (B, 16)
        return self.text[tokens % 128].mean(1)

    @staticmethod
    def tokenize(texts):
        return torch.tensor([[ord(c) for c in text[:77].ljust(77)] for text in texts])

    @staticmethod
    def augment(images):  # deterministic: CLIP's normalisation at 32 px
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        return (nn.functional.interpolate(images, size=32, mode="bilinear") - mean) / std


def tiny_clip(side):
    """Unit 2 cell 28's outputs: clip_model, tfms and open_clip.tokenize stand-ins; its clip_loss runs verbatim."""
    namespace = side.namespace
    namespace.update(clip_model=TinyCLIP(), tfms=TinyCLIP.augment,
                     open_clip=stand_ins.module("open_clip", tokenize=TinyCLIP.tokenize))
    cell = unit2_finetuning_and_guidance.CELLS[28]
    definition = next(node for node in ast.parse(cell).body if isinstance(node, ast.FunctionDef))
    exec(ast.get_source_segment(cell, definition), namespace)


UNIT2 = Plan(
    "unit2_finetuning_and_guidance", unit2_finetuning_and_guidance.CELLS,
    skipped={1: "installs packages (%pip)", 2: "logs in to the hub (notebook_login)",
             12: "downloads a dataset (huggan/smithsonian_butterflies_subset): 4 seeded 16 px images stand in",
             15: "%wandb magic: shows a W&B run",
             21: "shell (!ls): lists cell 20's folder (each library its own layout)",
             22: "uploads to the hub (create_repo, upload_folder, ModelCard.push_to_hub)",
             28: "downloads open_clip's ViT-B-32 weights (and needs torchvision): a tiny CLIP stands in; its "
                 "clip_loss runs verbatim",
             31: "installs packages (%pip)", 32: "a gradio web app (demo.launch)"},
    size_edits={9: PX256, 17: PX256, 23: PX256, 25: PX256, 26: PX256, 29: PX256},
    hooks={12: [butterflies], 28: [tiny_clip]},
    extra={13: lambda ns, _: {"unet weights after training": ns["image_pipe"].unet.state_dict()},
           # each side reads back what it wrote (minidiff writes its own folder layout, diffusers model_index.json)
           20: lambda ns, folder: {"saved, then loaded back": ns["DDPMPipeline"].from_pretrained(
               folder / "my-finetuned-model").unet.state_dict()}},
)


# unit 2, notebook 2 ------------------------------------------------------------------------------------------


def digits(side):
    """Unit 2 notebook 2 cell 3's outputs: 6 seeded 8 px digits (MNIST's are 28 px), labelled, 8 to a batch."""
    namespace = side.namespace
    namespace["dataset"] = stand_ins.digits()
    namespace["train_dataloader"] = torch.utils.data.DataLoader(namespace["dataset"], batch_size=8, shuffle=True)
    namespace["x"], namespace["y"] = next(iter(namespace["train_dataloader"]))


def fresh_net(namespace, folder) -> dict:
    torch.manual_seed(0)
    return {"ClassConditionedUnet() weights at init": namespace["ClassConditionedUnet"]().state_dict()}


CLASS_CONDITIONED = Plan(
    "unit2_class_conditioned", unit2_class_conditioned.CELLS,
    skipped={1: "installs packages (%pip)",
             3: "downloads MNIST (torchvision.datasets.MNIST): 6 seeded digits stand in"},
    size_edits={4: smaller("UNet (32, 64, 64) with 2 layers per block -> (32, 32, 32) with 1 (5 s per call on a batch "
                           "of 80 at this size, 1000 calls in cell 7)",
                           ("block_out_channels=(32, 64, 64)", "block_out_channels=(32, 32, 32)"),
                           ("layers_per_block=2", "layers_per_block=1")),
                5: smaller("1000 timesteps -> 100 (cell 7 samples over all of them, ~50 ms a step on each side)",
                           ("num_train_timesteps=1000", "num_train_timesteps=100")),
                6: smaller("timesteps up to 999 -> up to 99 (cell 5's 100)", ("randint(0, 999,", "randint(0, 99,")),
                7: smaller("80 digits of 28 px (8 of each class) -> 10 of 8 px (1 of each)",
                           ("torch.randn(80, 1, 28, 28)", "torch.randn(10, 1, 8, 8)"), ("[i]*8", "[i]*1"))},
    hooks={3: [digits]},
    extra={4: fresh_net, 6: lambda ns, _: {"net weights after training": ns["net"].state_dict()}},
)


# unit 3 ------------------------------------------------------------------------------------------------------

def encode_prompt_of_diffusers_0_10(side):
    """Unit 3 (written for diffusers 0.10) calls pipe._encode_prompt(prompt, device, 1, False, '') and gets the
    prompt's embeddings. diffusers 0.42 keeps _encode_prompt as a deprecated wrapper of encode_prompt that
    concatenates [negative, positive] even when do_classifier_free_guidance is False, where the negative is None
    (TypeError). On the reference side the wrapper gets back its 0.10 result: the positive alone without CFG."""
    pipe = side.namespace["pipe"]

    def _encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        positive, negative = pipe.encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                                negative_prompt)
        return torch.cat([negative, positive]) if do_classifier_free_guidance else positive

    pipe._encode_prompt = _encode_prompt


DEPTH = "StableDiffusionDepth2ImgPipeline: a later issue (stabilityai/stable-diffusion-2-depth is not simulated yet)"
UNIT3 = Plan(
    "unit3_sd_introduction", unit3_sd_introduction.CELLS,
    skipped={1: "installs packages (!pip)", 2: "installs packages (!pip)", 20: "shell (!ls of the cache folder)"},
    pending={"LMSDiscreteScheduler": LMS, "StableDiffusionDepth2ImgPipeline": DEPTH},
    pending_cells={21: DEPTH, 22: DEPTH},
    size_edits={3: smaller("the downloaded 512 px images -> 64 px", ("resize((512, 512))", "resize((64, 64))")),
                6: smaller("480x640 -> 48x64", ("height=480, width=640", "height=48, width=64")),
                7: smaller("480x480 -> 48x48", ("height=480, width=480", "height=48, width=48")),
                9: smaller("a 512 px image -> 64 px", ("1, 3, 512, 512", "1, 3, 64, 64")),
                12: smaller("64x64 latents -> 8x8", ("1, 4, 64, 64", "1, 4, 8, 8")),
                14: smaller("480x480 -> 48x48", ("height=480, width=480", "height=48, width=48")),
                15: smaller("64x64 latents -> 8x8", ("1, 4, 64, 64", "1, 4, 8, 8"))},
    hooks={5: [reference_only(encode_prompt_of_diffusers_0_10)]},
)


# Stable Diffusion Deep Dive ----------------------------------------------------------------------------------


class TextModel:
    """transformers 4.25's `CLIPTextModel.text_model`, which the deep dive was written against (its cell 1 pins
    transformers==4.25.1), over transformers 5's CLIPTextModel. transformers 5 has no `text_model` (its modules
    sit on the model itself), no `_build_causal_attention_mask`, and its encoder takes `causal_attention_mask`
    into **kwargs and ignores it: the text then attends to later tokens too (measured on the tiny encoder: 3.9
    from the causal output), while the notebook says its get_output_embeds reproduces text_encoder's output. So
    on the reference side the mask goes where transformers 5 applies one, the attention mask; cell 32's extra
    check compares get_output_embeds with text_encoder's own output, the course's claim, on both sides."""

    def __init__(self, model):
        self.embeddings, self.final_layer_norm, self.layers = model.embeddings, model.final_layer_norm, model.encoder

    @staticmethod
    def _build_causal_attention_mask(bsz, seq_len, dtype):  # transformers 4.25.1 modeling_clip.py
        mask = torch.empty(bsz, seq_len, seq_len, dtype=dtype)
        mask.fill_(torch.tensor(torch.finfo(dtype).min))
        mask.triu_(1)  # zero out the lower diagonal
        return mask.unsqueeze(1)

    def encoder(self, inputs_embeds, attention_mask=None, causal_attention_mask=None, **kwargs):
        return self.layers(inputs_embeds=inputs_embeds, attention_mask=causal_attention_mask)


def text_model_of_transformers_4(side):
    side.namespace["text_encoder"].text_model = TextModel(side.namespace["text_encoder"])


class TokenizerOfTransformers4:
    """transformers 4.25's CLIPTokenizer had `decoder`, the id -> token dict (cell 21: tokenizer.decoder.get(id));
    transformers 5's `decoder` is the tokenizers library's ByteLevel decoder. On the reference side the tokenizer
    answers `decoder` with 4.25's dict, and everything else as it is."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoder = tokenizer, {i: token for token, i in tokenizer.get_vocab().items()}

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def tokenizer_of_transformers_4(side):
    side.namespace["tokenizer"] = TokenizerOfTransformers4(side.namespace["tokenizer"])


DEEP_DIVE = Plan(
    "deep_dive", deep_dive.CELLS,
    skipped={6: "downloads macaw.jpg (!curl): a seeded 128 px picture stands in",
             43: "makes and shows a video of cell 42's frames (!ffmpeg, IPython HTML)"},
    pending={"LMSDiscreteScheduler": LMS},
    size_edits={4: SD512, 18: SD512, 34: SD512, 42: SD512, 46: SD512,
                7: smaller("the macaw picture at 512 px -> 64 px", ("resize((512, 512))", "resize((64, 64))"))},
    hooks={3: [reference_only(text_model_of_transformers_4), reference_only(tokenizer_of_transformers_4)]},
    extra={32: lambda ns, _: {"get_output_embeds(...) - text_encoder(...)[0]":
                           (ns["out_embs_test"] - ns["output_embeddings"]).abs().max()}},
    files=lambda folder: stand_ins.files(folder, width=32),
)


# textual inversion ---------------------------------------------------------------------------------------------

CUDA = "needs a GPU: loads the pipeline in float16 and moves it .to('cuda')"
TEXTUAL_INVERSION = Plan(
    "textual_inversion_inference", textual_inversion_inference.CELLS,
    skipped={3: CUDA, 5: f"samples with cell 3's pipeline ({CUDA})", 6: "shows cell 5's images"},
)

PLANS = {plan.name: plan for plan in (UNIT2, CLASS_CONDITIONED, UNIT3, DEEP_DIVE, TEXTUAL_INVERSION)}

# ------------------------------------------------------------------------------------------------------ running


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    from course import hub_cache

    return hub_cache.build(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def reports(hf_home, tmp_path_factory):
    """notebook -> its report. All notebooks run in one process (the libraries import once), when a test first
    asks for a report."""
    work = tmp_path_factory.mktemp("notebooks")
    done = {}

    def report(name: str) -> dict:
        if not done:
            (work / "home").mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
            root = Path(minidiff.__file__).resolve().parent.parent  # the minidiff this test imports
            env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HOME=str(work / "home"), TQDM_DISABLE="1",
                       PYTHONPATH=os.pathsep.join([str(root), str(HERE)]))
            result = subprocess.run([sys.executable, str(HERE / "course" / "harness.py"), str(work), *PLANS],
                                    env=env, capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stderr[-3000:]
            done.update({notebook: json.loads((work / f"{notebook}.json").read_text()) for notebook in PLANS})
        return done[name]

    return report


def summary(name: str, report: dict) -> str:
    cells = report["cells"]
    ran = [n for n, c in cells.items() if c["status"].startswith("ran")]
    matched = [n for n in ran if cells[n]["status"] == "ran, matched"]
    lines = [f"{name}: {len(ran)}/{len(cells)} cells run, {len(matched)} matched ({report['seconds']} s)"]
    for kind in ("ran, differs", "fails", "reference fails", "pending", "skipped"):
        chosen = {n: c["status"] for n, c in cells.items() if c["status"].startswith(kind)}
        if chosen:
            lines.append(f"  {kind}: {len(chosen)}")
            lines += [f"    cell {n}: {status.splitlines()[0][:230]}" for n, status in chosen.items()]
    plan = PLANS[name]
    if plan.size_edits:
        lines.append("  run at a smaller size: " + "; ".join(
            f"cell {n} ({reason})" for n, (reason, _) in plan.size_edits.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", PLANS)
def test_only_import_lines_change(name):
    """The minidiff side runs each cell as written but for its diffusers/transformers import lines."""
    plan = PLANS[name]
    for number, verbatim in plan.cells.items():
        source = plan.edited(number, verbatim)
        rewritten = to_minidiff(source)
        assert len(rewritten.split("\n")) == len(source.split("\n"))
        for before, after in zip(source.split("\n"), rewritten.split("\n"), strict=True):
            if before != after:
                assert is_import_line(before) and is_import_line(after), (number, before)
                assert before.replace("from diffusers ", "from minidiff ").replace(
                    "from transformers ", "from minidiff ") == after
    assert "from minidiff import DDIMScheduler, DDPMPipeline" in to_minidiff(UNIT2.cells[3])


def test_size_edits_change_only_sizes():
    """A size edit swaps one literal size for another, and every edit applies to the cell it names."""
    for plan in PLANS.values():
        for number, (_, edits) in plan.size_edits.items():
            for old, new in edits:
                assert re.sub(r"\d+", "N", old) == re.sub(r"\d+", "N", new), (plan.name, number, old, new)
                assert old in plan.cells[number], (plan.name, number, old)


def test_simulated_cache_is_what_huggingface_hub_reads(hf_home):
    """huggingface_hub's own cache scanner reads every repository, at refs/main, with its files as blobs."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    scanned = {repo.repo_id: repo for repo in scan_cache_dir(hf_home / "hub").repos}
    assert sorted(scanned) == sorted(["google/ddpm-celebahq-256", "johnowhitaker/sd-class-wikiart-from-bedrooms",
                                      "stabilityai/stable-diffusion-2-1-base", "runwayml/stable-diffusion-inpainting",
                                      "CompVis/stable-diffusion-v1-4", "openai/clip-vit-large-patch14"])
    for repo in scanned.values():
        (revision,) = repo.revisions
        assert revision.refs == {"main"} and len(revision.commit_hash) == 40
    path = try_to_load_from_cache("google/ddpm-celebahq-256", "diffusion_pytorch_model.safetensors",
                                  cache_dir=hf_home / "hub")
    assert Path(path).is_relative_to(hf_home) and Path(path).is_symlink()


@pytest.mark.parametrize("name", PLANS)
def test_notebook(name, reports):
    """Every cell that should run, runs on minidiff and gives diffusers' results."""
    report = reports(name)
    print("\n" + summary(name, report))
    bad = {n: c for n, c in report["cells"].items() if c["status"].startswith(("fails", "reference fails", "ran, "
                                                                                 "differs"))}
    details = "\n".join(f"cell {n}: {c['status']}\n{c.get('traceback', '')}" for n, c in bad.items())
    assert not bad, f"{len(bad)} cells of {name} fail or differ:\n{details}"


def test_summary(reports):
    """All notebooks' summaries together (run with -s to see them); the checks are test_notebook's."""
    print("\n" + "\n".join(summary(name, reports(name)) for name in PLANS))
