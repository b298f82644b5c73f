"""Model builders: the speed recipe's data-derived stem and its initial weights."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tasks.lib.model import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    INFERENCE_BATCH,
    build_model,
    initialize_speed_cnn,
    patch_covariance,
    predict_in_batches,
    symmetric_eigh,
    whitening_kernel,
    whitening_sample,
)
from tests.conftest import ROOT


def _images(count: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth, correlated images, like photos: neighbouring pixels and channels move together.
    base = rng.integers(0, 256, (count, 8, 8, 1)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(base + rng.integers(-20, 21, (count, 32, 32, 3)), 0, 255).astype(np.uint8)


def _patch_rows(pixels: np.ndarray) -> np.ndarray:
    """Every 2x2 patch of `pixels` as a row in (kh, kw, channel) order, written independently of the model."""
    patches = np.lib.stride_tricks.sliding_window_view(pixels, (2, 2), axis=(1, 2))
    return patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)


def test_whitening_kernel_decorrelates_patches():
    images = _images()
    kernel = whitening_kernel(images, epsilon=1e-9)
    assert kernel.shape == (2, 2, 3, 24)
    patches = _patch_rows((images.astype(np.float64) / 255 - CIFAR10_MEAN) / CIFAR10_STD)
    # The first half of the filters whiten; the second half are their negatives.
    responses = patches @ kernel[..., :12].reshape(12, 12)
    np.testing.assert_allclose(np.cov(responses, rowvar=False), np.eye(12), atol=1e-3)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])


def test_patch_covariance_is_numpys_covariance_of_the_patches():
    images = _images(count=2500)  # two chunks of 1,250 images
    expected = np.cov(_patch_rows(images.astype(np.float64)), rowvar=False)
    np.testing.assert_allclose(patch_covariance(images, 2), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="uint8 images"):
        patch_covariance(images.astype(np.float32), 2)


def test_symmetric_eigh_decomposes_like_lapack_over_a_wide_range_of_eigenvalues():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    expected = np.logspace(-6, 2, 12)  # a patch covariance spans about 1e-4 to 10
    matrix = (rotation * expected) @ rotation.T
    eigenvalues, eigenvectors = symmetric_eigh((matrix + matrix.T) / 2)
    np.testing.assert_allclose(eigenvalues, expected, rtol=1e-7)
    np.testing.assert_allclose(eigenvalues, np.linalg.eigh(matrix)[0], rtol=1e-7)
    np.testing.assert_allclose(eigenvectors.T @ eigenvectors, np.eye(12), atol=1e-14)
    np.testing.assert_allclose(eigenvectors @ np.diag(eigenvalues) @ eigenvectors.T, matrix, atol=1e-13)
    with pytest.raises(ValueError, match="no convergence"):
        symmetric_eigh(np.array([[1.0, np.nan], [np.nan, 1.0]]))


# numpy's BLAS (OpenBLAS) picks its kernels by CPU at run time; OPENBLAS_CORETYPE forces another
# CPU's, so one machine can run the kernels an AVX2-only Zen 3 gets (Zen) and an SSE3 CPU's.
WHITENING_PROBE = """
import hashlib, numpy as np
from tasks.lib.model import patch_covariance, symmetric_eigh, whitening_kernel
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (1500, 32, 32, 3), dtype=np.uint8)
covariance = patch_covariance(images, 2)
# The float64 steps too: their last bits show what the float32 kernel may round away.
for array in (covariance, *symmetric_eigh(covariance), whitening_kernel(images)):
    print(hashlib.sha256(array.tobytes()).hexdigest())
# The positive control: the same covariance and eigenvectors the plain way, through numpy's BLAS
# and LAPACK, which is what the functions above replace.
patches = np.lib.stride_tricks.sliding_window_view(images[:200], (2, 2), axis=(1, 2)).reshape(-1, 12) / 255.0
naive = patches.T @ patches / len(patches)
vectors = np.linalg.eigh(naive)[1]
print("naive", hashlib.sha256(naive.tobytes()).hexdigest(), hashlib.sha256(vectors.tobytes()).hexdigest())
"""


def test_whitening_kernel_is_the_same_bytes_whatever_blas_kernels_and_threads_compute_it():
    digests, naive = set(), set()
    for coretype, threads in (("Zen", "1"), ("Prescott", "2")):
        environment = os.environ | {"OPENBLAS_CORETYPE": coretype, "OPENBLAS_NUM_THREADS": threads}
        probe = subprocess.run(
            [sys.executable, "-c", WHITENING_PROBE], cwd=ROOT, env=environment, capture_output=True, text=True
        )
        assert probe.returncode == 0, probe.stderr[-2000:]
        ours, _, plain = probe.stdout.strip().partition("\nnaive ")
        digests.add(ours)
        naive.add(plain)
    # The two settings do run different kernels: the plain BLAS way parts in the last bits, so the
    # agreement above is the project's exact arithmetic, not two runs of one kernel.
    assert len(naive) == 2, naive
    assert len(digests) == 1, digests


def test_initialized_speed_cnn_has_the_whitening_stem_and_identity_convs():
    images = _images()
    model = build_model("speed_cnn", (32, 32, 3), 10, widths=(8, 16))
    initialize_speed_cnn(model, images, seed=0)
    np.testing.assert_allclose(model.get_layer("whitening").get_weights()[0], whitening_kernel(images), rtol=1e-6)
    assert not model.get_layer("whitening").trainable
    kernel = model.get_layer("block2_conv1").get_weights()[0]  # 8 -> 16 channels
    identity = np.zeros((3, 3, 8, 8), dtype=np.float32)
    identity[1, 1] = np.eye(8)
    np.testing.assert_array_equal(kernel[..., :8], identity)
    assert np.abs(kernel[..., 8:]).sum() > 0  # the extra filters keep their random start


def test_whitening_sample_is_seeded_and_spread_over_class_ordered_data():
    # Training arrays are in class order (5,000 a class here): a prefix would be 90% one class.
    labels = np.repeat(np.arange(10), 4500)
    sample = whitening_sample(labels.size, seed=42)
    assert sample.size == 5000 and np.unique(sample).size == 5000
    np.testing.assert_array_equal(sample, whitening_sample(labels.size, seed=42))
    assert not np.array_equal(sample, whitening_sample(labels.size, seed=43))
    per_class = np.bincount(labels[sample], minlength=10)
    assert per_class.min() >= 400 and per_class.max() <= 600, per_class  # 500 expected, sd about 21


def test_whitening_stem_comes_from_the_sample_not_a_prefix():
    rng = np.random.default_rng(0)
    # 5,000 smooth grey images, then 200 of colour noise: a prefix would never see the noise.
    grey = rng.integers(0, 256, (5000, 8, 8, 1)).repeat(3, axis=3) + rng.integers(-5, 6, (5000, 8, 8, 3))
    images = np.concatenate([np.clip(grey, 0, 255), rng.integers(0, 256, (200, 8, 8, 3))]).astype(np.uint8)
    model = build_model("speed_cnn", (8, 8, 3), 10, widths=(8,))
    initialize_speed_cnn(model, images, seed=7)
    stem = model.get_layer("whitening").get_weights()[0]
    np.testing.assert_allclose(stem, whitening_kernel(images[whitening_sample(len(images), seed=7)]), rtol=1e-5)
    assert not np.allclose(stem, whitening_kernel(images[:5000]), rtol=1e-2)


def _shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """`images` moved by (rows, columns) pixels with reflected edges, written independently of the model."""
    size = max(abs(rows), abs(columns))
    padded = np.pad(images, ((0, 0), (size, size), (size, size), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    return padded[:, size - rows : size - rows + height, size - columns : size - columns + width]


def test_test_time_views_predict_the_weighted_mean_of_the_shifted_and_mirrored_images():
    import keras

    images = _images(count=6)
    with_views = build_model("speed_cnn", (32, 32, 3), 10, widths=(8, 16), test_time_flip=True, test_time_translate=1)
    plain = build_model("speed_cnn", (32, 32, 3), 10, widths=(8, 16))
    initialize_speed_cnn(with_views, _images(), seed=0)
    plain.set_weights(with_views.get_weights())  # the views add no weights
    # airbench's tta_level 2: half on the image (and its mirror), a quarter on each one-pixel diagonal shift.
    views = [(images, 0.25), (_shifted(images, -1, -1), 0.125), (_shifted(images, 1, 1), 0.125)]
    views += [(view[:, :, ::-1], weight) for view, weight in views]
    # Log-probabilities are the logits less one constant per image, so their weighted mean has the same softmax.
    mean_log_probabilities = sum(weight * np.log(plain.predict(view, verbose=0)) for view, weight in views)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(mean_log_probabilities))
    np.testing.assert_allclose(with_views.predict(images, verbose=0), expected, rtol=1e-4, atol=1e-6)


def test_layers_saved_before_test_time_shifts_load_as_an_image_and_its_mirror():
    from tasks.lib.model import FlipCopies, MergeFlipCopies

    # Models saved before test-time shifts (prod's, a registry's) name these layers with no options.
    copies_config = {k: v for k, v in FlipCopies().get_config().items() if k not in ("flip", "translate")}
    merge_config = {k: v for k, v in MergeFlipCopies().get_config().items() if k != "view_weights"}
    copies, merge = FlipCopies.from_config(copies_config), MergeFlipCopies.from_config(merge_config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(copies(images)), np.concatenate([images, images[:, :, ::-1]]))
    original, mirrored = rng.normal(size=(2, 2, 10)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(merge(np.concatenate([original, mirrored]))), (original + mirrored) / np.float32(2)
    )


def test_random_shift_moves_each_image_its_own_whole_pixels_and_leaves_inference_alone():
    import keras

    from tasks.lib.model import RandomShift

    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(size=(64, 8, 8, 3)).astype(np.float32)
    layer = RandomShift(2)
    moved = keras.ops.convert_to_numpy(layer(images, training=True))
    offsets = []
    for image, shifted in zip(images, moved, strict=True):
        # Exactly one of the 25 reflect-filled shifts of -2..2 pixels each way, bit for bit.
        matches = [
            (rows, columns)
            for rows in range(-2, 3)
            for columns in range(-2, 3)
            if np.array_equal(_shifted(image[None], rows, columns)[0], shifted)
        ]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) >= 16  # drawn per image, not once per batch
    assert {rows for rows, _ in offsets} == {columns for _, columns in offsets} == {-2, -1, 0, 1, 2}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


def test_batch_norm_and_gelu_closed_form_gradients_match_autodiff_of_their_formulas():
    import tensorflow as tf

    from tasks.lib.model import ErfGelu, ExactBatchNormalization

    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(2.0, 3.0, (8, 5, 5, 6)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(8, 5, 5, 6)).astype(np.float32))
    norm = ExactBatchNormalization(center=False, scale=False)

    def ours(x):
        return ErfGelu()(norm(x, training=True))

    def formula(x):
        mean = tf.reduce_mean(x, axis=(0, 1, 2), keepdims=True)
        variance = tf.reduce_mean(tf.square(x - mean), axis=(0, 1, 2), keepdims=True)
        normalized = (x - mean) / tf.sqrt(variance + norm.epsilon)
        return 0.5 * normalized * (1.0 + tf.math.erf(normalized * 0.7071067811865476))

    results = []
    for function in (ours, formula):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = function(images)
            loss = tf.reduce_sum(outputs * weights)
        results.append((outputs.numpy(), tape.gradient(loss, images).numpy()))
    (outputs, gradient), (expected_outputs, expected_gradient) = results
    np.testing.assert_array_equal(outputs, expected_outputs)  # the forward pass is the formula's, bit for bit
    np.testing.assert_allclose(gradient, expected_gradient, rtol=0, atol=2e-6)
    assert np.abs(expected_gradient).max() > 0.5  # a gradient worth comparing
    # The batch's statistics still move the running ones (momentum 0.99: 1 % of the batch's).
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.01 * images.numpy().mean(axis=(0, 1, 2)), rtol=1e-5)


def test_an_image_s_outputs_do_not_depend_on_the_images_predicted_beside_it():
    model = build_model("tutorial_cnn", (32, 32, 3), 10)
    images = _images(count=20)  # a full batch of 16, then a padded one
    together = predict_in_batches(model, images)
    assert together.shape == (20, 10)
    alone = np.concatenate([predict_in_batches(model, images[index : index + 1]) for index in range(len(images))])
    backwards = predict_in_batches(model, images[::-1])[::-1]
    assert together.tobytes() == alone.tobytes() == backwards.tobytes()
    # Full batches are Keras' own predict's bytes at that batch size.
    full = images[:INFERENCE_BATCH]
    assert (
        together[:INFERENCE_BATCH].tobytes()
        == np.asarray(model.predict(full, batch_size=INFERENCE_BATCH, verbose=0)).tobytes()
    )
