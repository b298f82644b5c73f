"""Preprocess: validate raw arrays and prepare them for training, reporting what was found."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from tasks.lib.cli import run_stage
from tasks.lib.io import DataError, read_arrays, read_json, write_arrays, write_json
from tasks.lib.params import Params

log = logging.getLogger(__name__)

DATASET_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def validate_split(images: np.ndarray, labels: np.ndarray, *, split: str, num_classes: int, origin: str) -> np.ndarray:
    """Check one split's dtype, shape and labels; return labels as a flat uint8 vector."""
    if images.dtype != np.uint8:
        raise DataError(f"{origin}: x_{split} has dtype {images.dtype}, expected uint8")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise DataError(f"{origin}: x_{split} has shape {images.shape}, expected (N, size, size, 3)")
    flat = labels.reshape(-1)
    if flat.shape[0] != images.shape[0]:
        raise DataError(f"{origin}: {images.shape[0]} images but {flat.shape[0]} labels in {split}")
    if not np.issubdtype(flat.dtype, np.integer):
        raise DataError(f"{origin}: y_{split} has dtype {flat.dtype}, expected integer labels")
    out_of_range = flat[(flat < 0) | (flat >= num_classes)]
    if out_of_range.size:
        raise DataError(
            f"{origin}: y_{split} has {out_of_range.size} labels outside 0..{num_classes - 1}"
            f" (found {sorted(set(out_of_range.tolist()))[:5]}); expected one label per class name"
        )
    empty = [label for label in range(num_classes) if not np.any(flat == label)]
    if empty:
        raise DataError(f"{origin}: {split} has no images of class labels {empty}; every class needs examples")
    return flat.astype(np.uint8)


def image_digests(images: np.ndarray) -> list[bytes]:
    """One sha1 digest per image, to find exact duplicates."""
    return [hashlib.sha1(image.tobytes()).digest() for image in images]


def count_duplicates(x_train: np.ndarray, x_test: np.ndarray) -> dict:
    """Exact duplicate images within train and between test and train."""
    train_digests = image_digests(x_train)
    seen = set(train_digests)
    test_in_train = [index for index, digest in enumerate(image_digests(x_test)) if digest in seen]
    return {
        "within_train": len(train_digests) - len(seen),
        "test_in_train": len(test_in_train),
        "test_in_train_examples": test_in_train[:10],
    }


# Images per chunk for the channel statistics: a few MiB of float64 at a time, not the whole set.
STATISTICS_CHUNK = 256


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images, chunk by chunk in float64."""
    channels = images.shape[-1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), STATISTICS_CHUNK):
        pixels = images[start : start + STATISTICS_CHUNK].reshape(-1, channels).astype(np.float64)
        total += pixels.sum(axis=0)
        squares += np.square(pixels).sum(axis=0)
        count += pixels.shape[0]
    mean = total / max(count, 1)
    # uint8 values keep sum(x^2)/n - mean^2 exact enough in float64 (no catastrophic cancellation at 8 bits).
    return mean, np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))


def prepare(arrays: dict[str, np.ndarray], class_names: list[str], origin: str) -> tuple[dict[str, np.ndarray], dict]:
    """Validate both splits and return the prepared arrays and a report."""
    num_classes = len(class_names)
    prepared = {}
    for split in ("train", "test"):
        images = arrays[f"x_{split}"]
        prepared[f"y_{split}"] = validate_split(
            images, arrays[f"y_{split}"], split=split, num_classes=num_classes, origin=origin
        )
        prepared[f"x_{split}"] = np.ascontiguousarray(images)
    if prepared["x_train"].shape[1:] != prepared["x_test"].shape[1:]:
        raise DataError(
            f"{origin}: train images are {prepared['x_train'].shape[1:]}, test {prepared['x_test'].shape[1:]}"
        )
    mean, std = channel_statistics(prepared["x_train"])
    report = {
        "num_classes": num_classes,
        "class_names": class_names,
        "counts": {split: int(prepared[f"y_{split}"].shape[0]) for split in ("train", "test")},
        "duplicates": count_duplicates(prepared["x_train"], prepared["x_test"]),
        # Per-channel statistics of the training images, in 0..255 units.
        "channel_mean": mean.round(4).tolist(),
        "channel_std": std.round(4).tolist(),
    }
    return prepared, report


def run(params: Params) -> list[Path]:
    """Validate data/raw and write data/prepared plus a report."""
    raw = params.paths.raw
    arrays = read_arrays(raw / "dataset.npz", DATASET_ARRAYS)
    class_names = read_json(raw / "manifest.json").get("class_names")
    if not isinstance(class_names, list) or not class_names:
        raise DataError(f"{raw / 'manifest.json'}: expected a non-empty list under 'class_names'")
    prepared, report = prepare(arrays, class_names, origin=str(raw / "dataset.npz"))
    duplicates = report["duplicates"]
    if duplicates["test_in_train"]:
        log.warning("%d test images also appear in train (exact duplicates)", duplicates["test_in_train"])
    out = params.paths.prepared
    return [write_arrays(out / "dataset.npz", prepared), write_json(out / "report.json", report)]


def main() -> None:
    """Entry point for `python -m tasks.preprocess`."""
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
