"""Split: seeded, stratified, deterministic; refuses splits that empty a class."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.io import DataError
from tasks.split import split_arrays, stratified_indices


def test_split_is_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_indices(labels, validation_fraction=0.1, seed=3)
    assert np.bincount(labels[val]).tolist() == [5] * 10
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size


def test_same_seed_same_split_other_seed_other_split():
    labels = np.repeat(np.arange(4), 25)
    first = stratified_indices(labels, validation_fraction=0.2, seed=7)[1]
    assert np.array_equal(first, stratified_indices(labels, validation_fraction=0.2, seed=7)[1])
    assert not np.array_equal(first, stratified_indices(labels, validation_fraction=0.2, seed=8)[1])


def test_split_arrays_does_not_touch_inputs():
    x = np.arange(40 * 2).reshape(40, 2)
    y = np.repeat(np.arange(4), 10)
    x.flags.writeable = y.flags.writeable = False
    split = split_arrays(x, y, validation_fraction=0.25, seed=0)  # 2.5 per class rounds up to 3
    assert split["x_val"].shape == (12, 2)
    np.testing.assert_array_equal(split["x_train"][:, 0] // 2, np.sort(split["x_train"][:, 0] // 2))


def test_fraction_that_empties_a_class_is_rejected():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(DataError, match="class 1 has 1 images"):
        stratified_indices(labels, validation_fraction=0.3, seed=0)


def test_every_image_keeps_its_label():
    rng = np.random.default_rng(5)
    y = rng.permutation(np.repeat(np.arange(4), 30)).astype(np.uint8)
    x = np.arange(y.size)[:, None] * np.ones((1, 3), dtype=np.int64)  # each row names its original index
    split = split_arrays(x, y, validation_fraction=0.2, seed=1)
    for part in ("train", "val"):
        np.testing.assert_array_equal(split[f"y_{part}"], y[split[f"x_{part}"][:, 0]])
    assert sorted(np.concatenate([split["x_train"][:, 0], split["x_val"][:, 0]]).tolist()) == list(range(y.size))
