"""The captioned-shapes dataset (minidiff/training/shapes.py) and its analytic checker (tests/quality_shapes.py): the
splits, determinism of images and captions, what captions say, the checker reading every attribute back off rendered
(and noisy) images, the checker failing when it should, and the dataset's examples."""

import itertools

import pytest
import torch
from PIL import Image
from quality_shapes import ATTRIBUTES, agreement, describe_image

from minidiff.training.shapes import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    WHERE,
    CaptionedShapes,
    Scene,
    caption_scene,
    render_scene,
    shape_scenes,
)

TRAIN, HELDOUT = shape_scenes("train"), shape_scenes("heldout")


def noisy(image: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) uint8 plus Gaussian noise of `sigma` (in 0-255 units), rounded and clipped back to uint8."""
    noise = sigma * torch.randn(image.shape, generator=generator)
    return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_splits_are_disjoint_cover_every_scene_and_leave_every_pair_in_train():
    assert len(TRAIN) + len(HELDOUT) == 6 * 3 * 2 * 5 * 3 == 540
    assert set(TRAIN).isdisjoint(HELDOUT) and len(set(TRAIN) | set(HELDOUT)) == 540
    assert len(HELDOUT) == 540 // 9
    assert {(s.color, s.shape) for s in TRAIN} == set(itertools.product(COLORS, SHAPES))
    for name, values in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS),
                         ("background", BACKGROUNDS)):
        assert {getattr(s, name) for s in TRAIN} == set(values), name
    # What makes the held-out split a test of composition: its (color, shape, position) never occurs in train.
    assert {(s.color, s.shape, s.position) for s in TRAIN}.isdisjoint((s.color, s.shape, s.position) for s in HELDOUT)
    assert shape_scenes("train") == TRAIN  # a fixed order, not a random draw


def test_same_seed_same_image_and_caption_other_seed_other_jitter():
    dataset = CaptionedShapes(resolution=32)
    first = dataset.example(7, torch.Generator().manual_seed(3))
    again = dataset.example(7, torch.Generator().manual_seed(3))
    assert torch.equal(first["images"], again["images"]) and first["caption"] == again["caption"]
    scene = dataset.scene(7)
    images = [render_scene(scene, 32, torch.Generator().manual_seed(seed)) for seed in range(5)]
    assert all(not torch.equal(images[0], other) for other in images[1:])


def test_shapes_stay_inside_the_image():
    generator = torch.Generator().manual_seed(2)
    for resolution in (16, 64):
        for scene in TRAIN + HELDOUT:
            image = render_scene(scene, resolution, generator)
            border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 4R)
            assert (border == torch.tensor(BACKGROUNDS[scene.background])[:, None]).all(), (scene, resolution)


def test_captions_name_color_and_shape_and_the_canonical_one_names_everything():
    assert all("{color}" in template and "{shape}" in template for template in CAPTION_TEMPLATES)
    generator = torch.Generator().manual_seed(0)
    for scene in TRAIN + HELDOUT:
        caption = caption_scene(scene, generator)
        assert scene.color in caption and scene.shape in caption, caption
        canonical = caption_scene(scene)
        for word in (scene.size, scene.color, scene.shape, WHERE[scene.position], scene.background):
            assert word in canonical, (word, canonical)
    orange = Scene("circle", "orange", "big", "left", "white")
    assert caption_scene(orange) == "a big orange circle on the left on a white background"
    captions = {caption_scene(orange, torch.Generator().manual_seed(seed)) for seed in range(100)}
    assert len(captions) == len(CAPTION_TEMPLATES)  # every template gets drawn
    assert "an orange circle" in captions and not any("a orange" in c for c in captions)  # the article


def test_checker_reads_back_every_attribute_of_rendered_scenes():
    generator = torch.Generator().manual_seed(0)
    scenes = TRAIN + HELDOUT
    images = [render_scene(scene, 64, generator) for scene in scenes]
    all_five = agreement(images, scenes, ATTRIBUTES)
    small_scenes = [scenes[i] for i in torch.randperm(len(scenes), generator=generator)[:200].tolist()]
    small = agreement([render_scene(scene, 32, generator) for scene in small_scenes], small_scenes)
    print(f"checker: all five attributes at 64 px {all_five:.4f}, colour + shape at 32 px {small:.4f}")
    assert all_five >= 0.99, all_five
    assert small >= 0.99, small


def test_checker_reads_color_and_shape_through_noise():
    generator = torch.Generator().manual_seed(1)
    scenes = (TRAIN + HELDOUT)[::3]
    images = [noisy(render_scene(scene, 64, generator), 20.0, generator) for scene in scenes]
    score = agreement(images, scenes)
    print(f"checker: colour + shape at 64 px with noise sigma 20/255 {score:.4f}")
    assert score >= 0.95, score


def test_checker_can_fail():
    blank = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    assert describe_image(blank) == {"background": "white", "color": "none", "shape": "none", "size": "none",
                                     "position": "none"}
    red_circle = render_scene(Scene("circle", "red", "big", "center", "white"), 64, torch.Generator())
    blue_square = Scene("square", "blue", "big", "center", "white")
    assert agreement([red_circle], [blue_square]) == 0.0
    assert agreement([red_circle], [blue_square], attributes=("size", "position", "background")) == 1.0
    as_pil = Image.fromarray(red_circle.permute(1, 2, 0).numpy())
    assert describe_image(as_pil) == describe_image(red_circle)
    with pytest.raises(ValueError, match="uint8"):
        describe_image(red_circle.float())


def test_captioned_shapes_examples():
    dataset = CaptionedShapes(resolution=32, repeats=3)
    assert len(dataset) == 3 * 480 and len(CaptionedShapes(split="heldout")) == 60
    assert dataset.scene(480) == dataset.scene(0)
    assert dataset.source == "minidiff captioned shapes (train split, 480 scenes, 32x32)"
    example = dataset.example(5, torch.Generator().manual_seed(0))
    assert set(example) == {"images", "caption"}
    images = example["images"]
    assert images.shape == (3, 32, 32) and images.dtype == torch.float32
    assert -1.0 <= images.min() < images.max() <= 1.0
    assert isinstance(example["caption"], str) and dataset.scene(5).color in example["caption"]
    with pytest.raises(IndexError):
        dataset.scene(len(dataset))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CaptionedShapes(split="test"), "unknown split 'test'"),
        (lambda: CaptionedShapes(resolution=8), "at least 16"),
        (lambda: CaptionedShapes(repeats=0), "repeats"),
        (lambda: shape_scenes("validation"), "unknown split"),
        (lambda: Scene("hexagon", "red", "big", "left", "white"), "unknown shape 'hexagon'"),
        (lambda: render_scene(TRAIN[0], 12, torch.Generator()), "at least 16"),
    ],
)
def test_bad_arguments_raise_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
