"""Model builders: the speed recipe's data-derived stem and its initial weights."""

from __future__ import annotations

import numpy as np

from tasks.model import CIFAR10_MEAN, CIFAR10_STD, build_model, initialize_speed_cnn, whitening_kernel


def _images(count: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth, correlated images, like photos: neighbouring pixels and channels move together.
    base = rng.integers(0, 256, (count, 8, 8, 1)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(base + rng.integers(-20, 21, (count, 32, 32, 3)), 0, 255).astype(np.uint8)


def test_whitening_kernel_decorrelates_patches():
    images = _images()
    kernel = whitening_kernel(images, epsilon=1e-9)
    assert kernel.shape == (2, 2, 3, 24)
    pixels = (images.astype(np.float64) / 255 - CIFAR10_MEAN) / CIFAR10_STD
    patches = np.lib.stride_tricks.sliding_window_view(pixels, (2, 2), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)
    # The first half of the filters whiten; the second half are their negatives.
    responses = patches @ kernel[..., :12].reshape(12, 12)
    np.testing.assert_allclose(np.cov(responses, rowvar=False), np.eye(12), atol=1e-3)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])


def test_initialized_speed_cnn_has_the_whitening_stem_and_identity_convs():
    images = _images()
    model = build_model("speed_cnn", (32, 32, 3), 10, widths=(8, 16))
    initialize_speed_cnn(model, images)
    np.testing.assert_allclose(model.get_layer("whitening").get_weights()[0], whitening_kernel(images), rtol=1e-6)
    assert not model.get_layer("whitening").trainable
    kernel = model.get_layer("block2_conv1").get_weights()[0]  # 8 -> 16 channels
    identity = np.zeros((3, 3, 8, 8), dtype=np.float32)
    identity[1, 1] = np.eye(8)
    np.testing.assert_array_equal(kernel[..., :8], identity)
    assert np.abs(kernel[..., 8:]).sum() > 0  # the extra filters keep their random start
