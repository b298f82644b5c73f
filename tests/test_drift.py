"""Drift on real data: CIFAR-10's test images (the team's DVC store) against themselves, darkened, blurred, replaced."""

from __future__ import annotations

import io
import json
import zipfile

import dvc.api
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image, ImageFilter

from tasks.lib.drift import MIN_IMAGES, batch_features, compare, pixel_features, reference_profile
from tasks.lib.io import read_json
from tests.conftest import ROOT

REFERENCE, BATCH = 4000, 1000


@pytest.fixture(scope="module")
def cifar10_test_images() -> np.ndarray:
    """CIFAR-10's 10,000 test images from the team's DVC remote (the zip's test/<class>/*.jpg), in a seeded order."""
    with dvc.api.open("data/external/cifar10-jpeg.zip", repo=str(ROOT), mode="rb") as file:
        archive = zipfile.ZipFile(io.BytesIO(file.read()))
    members = sorted(name for name in archive.namelist() if name.startswith("test/") and name.endswith(".jpg"))
    images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB")) for name in members])
    assert images.shape == (10000, 32, 32, 3)
    return images[np.random.default_rng(0).permutation(len(images))]  # the zip is in class order


@pytest.fixture(scope="module")
def model_outputs(reproduced):
    """(probabilities, embeddings) of the reproduced project's model, as predict computes them."""
    from tasks.lib.model import predict_with_embeddings, with_embeddings
    from tasks.lib.model_files import load_model

    project = reproduced[0]
    best = read_json(project / "artifacts/model/best.json")
    model = with_embeddings(load_model(project / "artifacts/model/model.keras", sha256=best["sha256"]))
    return lambda images: predict_with_embeddings(model, images)


def report_for(profile: dict, images: np.ndarray, model_outputs):
    probabilities, embeddings = model_outputs(images)
    return compare(profile, batch_features(profile, images, probabilities, embeddings))


@pytest.fixture(scope="module")
def profile(cifar10_test_images, model_outputs) -> dict:
    reference = cifar10_test_images[:REFERENCE]
    probabilities, embeddings = model_outputs(reference)
    return reference_profile(reference, probabilities, embeddings, ["circle", "cross", "square", "stripes"])


def photograph_crops(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` 32x32 crops, at random places and scales, of the photographs matplotlib ships."""
    photos = [Image.open(cbook.get_sample_data(name)).convert("RGB") for name in ("grace_hopper.jpg",)]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(48, min(photo.size) // 2))
        left, top = (int(rng.integers(0, extent - side)) for extent in photo.size)
        crops.append(np.asarray(photo.crop((left, top, left + side, top + side)).resize((32, 32), Image.BICUBIC)))
    return np.stack(crops)


def test_the_test_set_split_in_two_shows_no_drift(profile, cifar10_test_images, model_outputs):
    for start in range(REFERENCE, REFERENCE + 3 * BATCH, BATCH):
        report = report_for(profile, cifar10_test_images[start : start + BATCH], model_outputs)
        assert report.verdict == "no drift", report.as_dict()


def test_darkened_blurred_and_other_photographs_drift_and_the_features_are_named(
    profile, cifar10_test_images, model_outputs
):
    batch = cifar10_test_images[-BATCH:]
    darkened = (batch // 2).astype(np.uint8)
    report = report_for(profile, darkened, model_outputs)
    assert {"brightness", "mean_red", "mean_green", "mean_blue"} <= set(report.drifted), report.as_dict()
    assert report.verdict.startswith("drift: ") and "brightness" in report.verdict
    blurred = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5))) for image in batch])
    report = report_for(profile, blurred, model_outputs)
    assert "sharpness" in report.drifted and "brightness" not in report.drifted, report.as_dict()
    report = report_for(profile, photograph_crops(BATCH, np.random.default_rng(1)), model_outputs)
    assert report.drifted and report.verdict.startswith("drift: "), report.as_dict()
    # The model's view moves too, not only the pixels': photographs are not CIFAR-10 to it either.
    assert {"embedding_norm", "embedding_distance", "confidence", "class_mix"} & set(report.drifted), report.as_dict()


def test_too_few_images_give_no_verdict(profile, cifar10_test_images, model_outputs):
    report = report_for(profile, (cifar10_test_images[: MIN_IMAGES - 1] // 2).astype(np.uint8), model_outputs)
    assert report.drifted and report.verdict == f"no verdict: {MIN_IMAGES - 1} images, fewer than {MIN_IMAGES}"


def test_the_profile_does_not_depend_on_the_order_of_the_images(cifar10_test_images, model_outputs, profile):
    # Quantile edges are data values, shares counts, sums math.fsum: nothing depends on order or chunking.
    order = np.random.default_rng(2).permutation(REFERENCE)
    images = cifar10_test_images[:REFERENCE][order]
    probabilities, embeddings = model_outputs(images)
    shuffled = reference_profile(images, probabilities, embeddings, ["circle", "cross", "square", "stripes"])
    assert json.dumps(shuffled, sort_keys=True) == json.dumps(profile, sort_keys=True)


def test_pixel_features_are_exact_for_known_images():
    flat = np.full((1, 4, 4, 3), 51, np.uint8)  # 51 = 255 / 5
    features = pixel_features(flat)
    assert features["mean_red"][0] == 0.2 and features["spread_green"][0] == 0.0 and features["sharpness"][0] == 0.0
    checker = np.zeros((1, 2, 2, 3), np.uint8)
    checker[0, 0, 0] = checker[0, 1, 1] = 255
    features = pixel_features(checker)
    assert features["mean_blue"][0] == 0.5 and features["spread_blue"][0] == 0.5 and features["sharpness"][0] == 1.0
