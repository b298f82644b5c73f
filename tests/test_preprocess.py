"""Preprocess: validation of dtype, shape, labels and classes; duplicate report; no input mutation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.io import DataError
from tasks.preprocess import count_duplicates, prepare


def read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_train": read_only(rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)),
        "y_train": read_only(np.arange(12, dtype=np.uint8) % 3),
        "x_test": read_only(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)),
        "y_test": read_only(np.arange(6, dtype=np.uint8) % 3),
    }


def test_prepare_keeps_uint8_and_reports_counts(arrays):
    prepared, report = prepare(arrays, ["a", "b", "c"], origin="raw.npz")
    assert prepared["x_train"].dtype == np.uint8
    assert report["counts"] == {"train": 12, "test": 6}
    assert len(report["channel_mean"]) == 3


def test_label_out_of_range_names_file_and_values(arrays):
    arrays["y_test"] = np.array([0, 1, 2, 7, 0, 1], dtype=np.uint8)
    with pytest.raises(DataError, match=r"raw.npz: y_test has 1 labels outside 0..2 \(found \[7\]\)"):
        prepare(arrays, ["a", "b", "c"], origin="raw.npz")


def test_wrong_dtype_and_shape_are_rejected(arrays):
    with pytest.raises(DataError, match="x_train has dtype float32, expected uint8"):
        prepare({**arrays, "x_train": arrays["x_train"].astype(np.float32)}, ["a", "b", "c"], origin="raw.npz")
    with pytest.raises(DataError, match=r"x_test has shape \(6, 8, 8\)"):
        prepare({**arrays, "x_test": arrays["x_test"][..., 0]}, ["a", "b", "c"], origin="raw.npz")


def test_class_without_examples_is_rejected(arrays):
    with pytest.raises(DataError, match=r"train has no images of class labels \[3\]"):
        prepare(arrays, ["a", "b", "c", "d"], origin="raw.npz")


def test_duplicates_across_train_and_test_are_counted(arrays):
    x_test = arrays["x_test"].copy()
    x_test[2] = arrays["x_train"][5]
    duplicates = count_duplicates(arrays["x_train"], x_test)
    assert duplicates["test_in_train"] == 1 and duplicates["test_in_train_examples"] == [2]
    assert duplicates["within_train"] == 0
