"""Preprocess: validation of dtype, shape, labels and classes; duplicate report; no input mutation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.io import DataError
from tasks.preprocess import channel_statistics, count_duplicates, prepare


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


def _statistics_peak_bytes(images: np.ndarray) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        channel_statistics(images)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_channel_statistics_match_numpy_in_memory_that_does_not_grow_with_the_set():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8)
    pixels = images.reshape(-1, 3).astype(np.float64)
    mean, std = channel_statistics(images)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-9)
    del pixels
    # A float64 copy of the set (98 MB here, 1.2 GB for CIFAR-10) would make the peak grow with it.
    small, large = _statistics_peak_bytes(images[:1000]), _statistics_peak_bytes(images)
    assert large < 1.2 * small and large < 16 * 2**20, (small, large)
