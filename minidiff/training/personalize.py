"""The Stable Diffusion training modes: `dreambooth` (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation") and `textual-inversion` (Gal et al. 2022, "An Image is Worth One
Word: Personalizing Text-to-Image Generation using Textual Inversion").

Both train loop.py's objective in latent space (Rombach et al. 2022, eq. 2): an image goes through the frozen
VAE encoder, z_0 = scaling_factor * (a sample of q(z | x)); its prompt goes through the text encoder to the
context c; the UNet is asked for the noise added to z_0, given z_t, t and c. They differ in what learns:

    dreambooth          the UNet (and with train_text_encoder the text encoder) learns a subject from a few
                        photos and an instance prompt, "a photo of sks dog". Prior preservation (sec. 4.1, eq. 2)
                        pairs every instance example with an image of its class that the model drew itself
                        ("a photo of a dog"): loss = instance MSE + prior_loss_weight * class MSE, so the model
                        keeps knowing what other dogs look like.
    textual-inversion   one new word, "<cat-toy>": its row of the token embedding table is the only trained
                        tensor, v* = argmin_v E ||eps - eps_theta(z_t, t, c(y with v))||^2 (Gal et al. eq. 2),
                        with prompts y from templates ("a photo of a {}", ...). Everything else stays frozen.

Each writes a Stable Diffusion model folder that sample.py samples; textual inversion also writes the learned
word as learned_embeds.safetensors (diffusers' format, {token: (1, D)}), which loading/textual_inversion.py:
load_textual_inversion_into adds to any model with the same text encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from minidiff.images import make_grid, save_png
from minidiff.loading.model_folder import load_stable_diffusion, read_config, save_stable_diffusion
from minidiff.loading.safetensors import save_file
from minidiff.loading.textual_inversion import add_token
from minidiff.pipelines.stable_diffusion import StableDiffusion
from minidiff.schedulers import DDIMScheduler, DDPMScheduler
from minidiff.training.data import ImageDataset, image_files, load_image_folder
from minidiff.training.loop import Task, denoising_loss, enable_gradient_checkpointing

# diffusers' examples/textual_inversion/textual_inversion.py (imagenet_templates_small and the style ones)
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
CLASS_IMAGES_PER_BATCH = 4  # diffusers' --sample_batch_size


@dataclass
class SDModel:
    """A Stable Diffusion model to train, with what its model folder will record."""

    sd: StableDiffusion
    scheduler_config: dict  # the folder's diffusers scheduler config, as it is (for DDPM, DDIM and the saved model)
    origin: str  # "fine-tuned from PATH"


def load_sd_model(path: str | Path, device: torch.device | str = "cpu") -> SDModel:
    """A Stable Diffusion model folder to fine-tune, in float32 (a ModelFolderError if it is not one), all frozen:
    each mode unfreezes what it trains (Dreambooth the UNet and maybe the text encoder; textual inversion none)."""
    sd = load_stable_diffusion(path, dtype=torch.float32, device=device)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.requires_grad_(False)
    return SDModel(sd, read_config(path)["scheduler"], f"fine-tuned from {Path(path).resolve()}")


def load_rgb_images(folder: str | Path, resolution: int, random_flip: bool, limit: int | None = None) -> ImageDataset:
    """The images of a folder (the first `limit` in path order), resized and centre-cropped, as RGB: the VAE
    takes 3 channels, so greyscale photos are repeated across them."""
    dataset = load_image_folder(folder, resolution, random_flip=random_flip)
    images = dataset.images[:limit]
    return dataclasses.replace(dataset, images=images.expand(-1, 3, -1, -1).contiguous())


def tokenize(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (P, 77) token ids, padded as the pipeline pads them."""
    return sd.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]


def sampler(model: SDModel) -> StableDiffusion:
    """The model being trained, sampled with DDIM (the folder's noise schedule), for grids and class images."""
    sd = model.sd
    ddim = DDIMScheduler.from_config(model.scheduler_config)
    pipe = StableDiffusion(**{**sd.components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)  # the training loop has its own bar
    return pipe


@dataclass
class PromptedImages:
    """Training examples of the Stable Diffusion modes: each image with the token ids of a prompt.

    prompt_ids (P, L): each example takes one of the P prompts, drawn with its generator (textual inversion's
    templates; Dreambooth has P = 1). prior: the class images and prompt paired with every example (Dreambooth's
    prior preservation); the dataset is as long as the longer of the two folders, and each cycles."""

    images: ImageDataset
    prompt_ids: torch.Tensor
    prior: PromptedImages | None = None

    def __len__(self) -> int:
        return max(len(self.images), len(self.prior.images)) if self.prior else len(self.images)

    def example(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"images": (3, H, W) in [-1, 1], "input_ids": (L,)}, plus "class_images", "class_input_ids"."""
        image = self.images.example(index % len(self.images), generator)["images"]
        prompt = torch.randint(len(self.prompt_ids), (1,), generator=generator).item()
        example = {"images": image, "input_ids": self.prompt_ids[prompt]}
        if self.prior is not None:
            prior = self.prior.example(index, generator)
            example.update(class_images=prior["images"], class_input_ids=prior["input_ids"])
        return example


class LatentDenoisingLoss(nn.Module):
    """What the Stable Diffusion modes train: forward(batch, generators) -> the loss of the batch (a scalar).

    Holds the whole model; what trains is whatever requires grad: the UNet (and text encoder) for Dreambooth,
    `placeholder_embedding` alone for textual inversion. That (1, D) parameter stands in for the row of
    `placeholder_id` in the text encoder's table, which stays frozen like every other row: the other rows get no
    gradient, and the checkpoint holds one row, not the table (diffusers trains the whole table and restores
    the other rows after each step: the same update for the new row, since AdamW works elementwise)."""

    def __init__(self, model: SDModel, prior_loss_weight: float = 1.0, placeholder_id: int | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = model.sd.unet, model.sd.vae, model.sd.text_encoder
        self.scheduler = DDPMScheduler.from_config(model.scheduler_config)  # the noise schedule it was trained with
        self.prior_loss_weight = prior_loss_weight
        self.placeholder_id = placeholder_id
        if placeholder_id is not None:
            row = self.text_encoder.embeddings.token_embedding.weight[placeholder_id]  # (D,)
            self.placeholder_embedding = nn.Parameter(row.detach().clone()[None])  # (1, D)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) UNet context, with the learned row wherever the placeholder stands."""
        if self.placeholder_id is None:
            return self.text_encoder(input_ids).last_hidden_state
        embeds = self.text_encoder.token_embeddings(input_ids)  # (B, L, D)
        is_placeholder = (input_ids == self.placeholder_id)[..., None]  # (B, L, 1)
        embeds = torch.where(is_placeholder, self.placeholder_embedding.to(embeds.dtype), embeds)
        return self.text_encoder(input_ids, inputs_embeds=embeds).last_hidden_state

    def write_placeholder_embedding(self) -> None:
        """Copy the learned row into the text encoder's table, for sampling and saving."""
        if self.placeholder_id is not None:
            self.text_encoder.set_token_embedding(self.placeholder_id, self.placeholder_embedding[0])

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        images, input_ids = batch["images"], batch["input_ids"]
        prior = "class_images" in batch
        if prior:  # one batch of 2B: the instance examples, then their class examples
            images = torch.cat([images, batch["class_images"]])
            input_ids = torch.cat([input_ids, batch["class_input_ids"]])
            generators = generators + generators  # an example's generator draws for both of its images
        with torch.no_grad():  # the VAE is frozen: z_0 ~ q(z | x), from each example's generator
            latents = self.vae.encode(images).latent_dist.sample(generators).float() * self.vae.config.scaling_factor
        context = self.encode_text(input_ids)
        losses = denoising_loss(lambda z_t, t: self.unet(z_t, t, encoder_hidden_states=context).sample, self.scheduler,
                                latents, generators)  # (B,) or (2B,)
        if not prior:
            return losses.mean()
        instance, class_ = losses.chunk(2)
        return instance.mean() + self.prior_loss_weight * class_.mean()  # Ruiz et al. 2023, eq. 2


def generate_class_images(model: SDModel, folder: str | Path, prompt: str, count: int, resolution: int,
                          seed: int, steps: int) -> int:
    """Fill `folder` up to `count` images with images of `prompt` drawn by the model itself (DDIM, `steps`
    steps): Dreambooth's class data for prior preservation. Returns how many were made.

    Image class-NNNNN.png is drawn from its own generator, whose seed is the NNNNN-th of a stream seeded with
    `seed`: the same seed gives the same files, and an interrupted fill goes on where it stopped (new images
    take the first free names). Each PNG is written atomically, with its prompt, seed and steps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    if have >= count:
        return 0
    names = [f"class-{i:05d}.png" for i in range(count + have)]
    todo = [i for i, name in enumerate(names) if not (folder / name).exists()][: count - have]
    stream = torch.Generator().manual_seed(seed)  # one draw per image, so the seeds do not depend on len(names)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=stream)) for _ in names]
    draw = sampler(model)
    with tqdm(total=len(todo), desc="class images", unit="image") as progress:
        for start in range(0, len(todo), CLASS_IMAGES_PER_BATCH):
            batch = todo[start : start + CLASS_IMAGES_PER_BATCH]
            generators = [torch.Generator().manual_seed(seeds[i]) for i in batch]
            images = draw(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                           num_images_per_prompt=len(batch), generator=generators).images
            for i, image in zip(batch, images, strict=True):
                save_png(image, folder / names[i], {"prompt": prompt, "seed": seeds[i], "steps": steps,
                                                    "software": "minidiff"})  # fmt: skip
            progress.update(len(batch))
    return len(todo)


def sd_task(mode: str, model: SDModel, objective: LatentDenoisingLoss, dataset: PromptedImages, trains: str,
            sample_prompt: str, fingerprint: dict, gradient_checkpointing: bool = False, num_sample_images: int = 4,
            sample_steps: int = 50) -> Task:
    """The Task for loop.py's trainer, either mode: objective, data, final-model writer and sample grids."""
    size = dataset.images.resolution[0]
    if gradient_checkpointing:
        enable_gradient_checkpointing(model.sd.unet)
    draw = sampler(model)
    data = dataset.images.source

    def save_model(path: Path, weights: str) -> None:
        objective.write_placeholder_embedding()
        source = (f"minidiff train.py {mode}: {model.origin}, on {data} ({len(dataset.images)} images at "
                  f"{size}x{size}); trained {trains}; {weights}")
        save_stable_diffusion(path, model.sd, source=source, scheduler_config=model.scheduler_config)

    def sample_grid(generator: torch.Generator):
        objective.write_placeholder_embedding()
        images = draw(sample_prompt, height=size, width=size, num_inference_steps=sample_steps,
                       num_images_per_prompt=num_sample_images, generator=generator).images
        return make_grid(images)

    fingerprint = {"mode": mode, "model": model.origin, "data": data, "resolution": size,
                   "random_flip": dataset.images.random_flip, **fingerprint}
    return Task(objective, dataset, save_model, sample_grid, fingerprint)


def dreambooth_task(model: SDModel, images: ImageDataset, instance_prompt: str,
                    train_text_encoder: bool = False, class_images: ImageDataset | None = None,
                    class_prompt: str | None = None, prior_loss_weight: float = 1.0, sample_prompt: str | None = None,
                    **options) -> Task:
    """Dreambooth: fine-tune the UNet (and the text encoder) on `images` captioned `instance_prompt`; with
    `class_images` and `class_prompt`, prior preservation. `options`: sd_task's gradient_checkpointing,
    num_sample_images, sample_steps."""
    sd = model.sd
    sd.unet.requires_grad_(True)
    sd.text_encoder.requires_grad_(train_text_encoder)
    prior = None if class_images is None else PromptedImages(class_images, tokenize(sd, [class_prompt]))
    dataset = PromptedImages(images, tokenize(sd, [instance_prompt]), prior)
    fingerprint = {"instance_prompt": instance_prompt, "train_text_encoder": train_text_encoder}
    trains = "the UNet and the text encoder" if train_text_encoder else "the UNet"
    if prior is not None:
        fingerprint.update(class_prompt=class_prompt, class_data=class_images.source,
                           num_class_images=len(class_images), prior_loss_weight=prior_loss_weight)
        trains += f", with prior preservation ({class_prompt!r}, weight {prior_loss_weight})"
    objective = LatentDenoisingLoss(model, prior_loss_weight)
    return sd_task("dreambooth", model, objective, dataset, f"{trains} on {instance_prompt!r}",
                   sample_prompt or instance_prompt, fingerprint, **options)


def textual_inversion_task(model: SDModel, images: ImageDataset, placeholder_token: str,
                           initializer_token: str, learnable_property: str = "object",
                           sample_prompt: str | None = None, **options) -> Task:
    """Textual inversion: add `placeholder_token` as a new word whose embedding starts as `initializer_token`'s
    (one token) and learn it from `images` with the `learnable_property`'s templates ("object" or "style").
    The final model holds the word; learned_embeds.safetensors next to it holds the embedding alone."""
    sd = model.sd
    initializer_ids = sd.tokenizer.encode(initializer_token)
    if len(initializer_ids) != 1:
        raise ValueError(f"--initializer-token {initializer_token!r} is {len(initializer_ids)} tokens for CLIP; it "
                         "must be exactly one (a common word such as 'toy' or 'painting')")
    initial = sd.text_encoder.embeddings.token_embedding.weight[initializer_ids[0]]  # (D,)
    placeholder_id = add_token(sd, placeholder_token, initial)
    templates = TEMPLATES[learnable_property]
    dataset = PromptedImages(images, tokenize(sd, [t.format(placeholder_token) for t in templates]))
    objective = LatentDenoisingLoss(model, placeholder_id=placeholder_id)
    task = sd_task("textual-inversion", model, objective, dataset,
                   f"the embedding of {placeholder_token!r} ({learnable_property}, from {initializer_token!r})",
                   sample_prompt or templates[0].format(placeholder_token),
                   {"placeholder_token": placeholder_token, "initializer_token": initializer_token,
                    "learnable_property": learnable_property}, **options)
    save_model = task.save_model

    def save_embedding_and_model(path: Path, weights: str) -> None:
        # diffusers' textual_inversion.py writes {token: (1, D)} into its output folder: next to model/ here
        embedding = {placeholder_token: objective.placeholder_embedding.detach().cpu()}
        save_file(embedding, Path(path).parent / "learned_embeds.safetensors", {"format": "pt"})
        save_model(path, weights)

    return dataclasses.replace(task, save_model=save_embedding_and_model)
