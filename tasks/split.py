"""Split: a seeded, stratified train/validation split of the training images."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from tasks.lib.cli import run_stage
from tasks.lib.io import DataError, read_arrays, write_arrays
from tasks.lib.params import Params

log = logging.getLogger(__name__)


def stratified_indices(labels: np.ndarray, *, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices holding `validation_fraction` of every class out."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # Half rounds up (Python's round() would send 2.5 to 2).
        held_out = math.floor(len(members) * validation_fraction + 0.5)
        if held_out == 0 or held_out == len(members):
            raise DataError(
                f"class {int(label)} has {len(members)} images: validation_fraction {validation_fraction} "
                "leaves train or validation without examples of it; use more data or another fraction"
            )
        val_parts.append(members[:held_out])
        train_parts.append(members[held_out:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def split_arrays(x: np.ndarray, y: np.ndarray, *, validation_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """x_train, y_train, x_val, y_val from one labelled set."""
    train, val = stratified_indices(y, validation_fraction=validation_fraction, seed=seed)
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def run(params: Params) -> list[Path]:
    """Split data/prepared's training images into data/split."""
    source = params.paths.prepared / "dataset.npz"
    arrays = read_arrays(source, ("x_train", "y_train"))
    if arrays["y_train"].size == 0:
        raise DataError(f"{source}: no training images to split")
    split = split_arrays(
        arrays["x_train"], arrays["y_train"], validation_fraction=params.split.validation_fraction, seed=params.seed
    )
    log.info(
        "split %d images into %d train and %d validation",
        arrays["y_train"].size,
        split["y_train"].size,
        split["y_val"].size,
    )
    return [write_arrays(params.paths.split / "train_val.npz", split)]


def main() -> None:
    """Entry point for `python -m tasks.split`."""
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
