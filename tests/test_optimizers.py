"""Muon: conv kernels step along their orthogonalised Nesterov momentum, everything else as Keras' Nesterov SGD."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.optimizers import Muon, orthogonalize


def _ill_conditioned(rows: int, columns: int) -> np.ndarray:
    """A random matrix whose singular values span four orders of magnitude."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(columns, columns)))
    singular = np.logspace(0, -4, min(rows, columns))
    return (u[:, : len(singular)] * singular) @ v[: len(singular)]


@pytest.mark.parametrize("shape", [(288, 32), (32, 288), (64, 64)])
def test_orthogonalize_evens_out_the_singular_values_in_either_orientation(shape):
    matrix = _ill_conditioned(*shape).astype(np.float32)
    result = np.asarray(orthogonalize(matrix))
    singular = np.linalg.svd(result, compute_uv=False)
    top = np.linalg.svd(matrix, compute_uv=False)
    # The large directions land near 1 (airbench's iteration overshoots into ~[0.5, 1.5] on purpose);
    # one 1,000 times smaller than the top is scaled up by about a**3 = 41 (3 steps): 1e-3 -> 0.03.
    leading = singular[top >= top[0] / 10]
    assert leading.min() > 0.5 and singular.max() < 1.5
    assert singular[np.argmin(np.abs(top - top[0] / 1000))] > 0.02
    np.testing.assert_allclose(np.asarray(orthogonalize(matrix.T)), result.T, rtol=1e-5, atol=1e-6)
    # Only the direction counts: a gradient 1,000 times larger gives the same step.
    np.testing.assert_allclose(np.asarray(orthogonalize(1000 * matrix)), result, rtol=1e-4, atol=1e-5)


def _orthogonalize_numpy(matrix: np.ndarray, steps: int = 3) -> np.ndarray:
    """airbench94_muon's zeropower_via_newtonschulz5, in float64 numpy, rows as its output channels."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (np.linalg.norm(matrix) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_muon_steps_kernels_like_airbench_and_other_weights_like_keras_nesterov_sgd():
    import keras

    rng = np.random.default_rng(1)
    kernel_start, bias_start = rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(8,))
    gradients = [(rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(8,))) for _ in range(3)]
    peak, scale, momentum, kernel_momentum, weight_decay = 0.2, 0.5, 0.85, 0.6, 0.05
    # The pipeline's warm-up and cosine schedule: the rate differs at every step.
    schedule = keras.optimizers.schedules.CosineDecay(peak / 4, 2, warmup_target=peak, warmup_steps=1)

    kernel = keras.Variable(kernel_start.astype(np.float32))
    bias = keras.Variable(bias_start.astype(np.float32))
    muon = Muon(
        schedule,
        momentum=momentum,
        kernel_learning_rate_scale=scale,
        kernel_momentum=kernel_momentum,
        weight_decay=weight_decay,
    )
    sgd_bias = keras.Variable(bias_start.astype(np.float32))
    sgd = keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True, weight_decay=weight_decay)

    # airbench's step on the kernel, as PyTorch lays it out: (out, in * kh * kw).
    weights = kernel_start.transpose(3, 2, 0, 1).reshape(8, -1)
    buffer = np.zeros_like(weights)
    for step, (kernel_gradient, bias_gradient) in enumerate(gradients):
        learning_rate = float(schedule(step))
        assert learning_rate > 0
        muon.apply([kernel_gradient.astype(np.float32), bias_gradient.astype(np.float32)], [kernel, bias])
        sgd.apply([bias_gradient.astype(np.float32)], [sgd_bias])
        gradient = kernel_gradient.transpose(3, 2, 0, 1).reshape(8, -1)
        buffer = kernel_momentum * buffer + gradient
        weights = weights * (1 - weight_decay * learning_rate)  # undone by the norm reset, up to rounding
        weights = weights * np.sqrt(8) / np.linalg.norm(weights)
        weights = weights - learning_rate * scale * _orthogonalize_numpy(gradient + kernel_momentum * buffer)

    expected_kernel = weights.reshape(8, 4, 3, 3).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(kernel.numpy(), expected_kernel, rtol=1e-4, atol=1e-5)
    # Term for term, weight decay included: the same bits as Keras' own.
    np.testing.assert_array_equal(bias.numpy(), sgd_bias.numpy())


def test_muon_config_round_trips():
    muon = Muon(0.3, momentum=0.8, kernel_learning_rate_scale=0.05, kernel_momentum=0.5, weight_decay=0.01)
    again = Muon.from_config(muon.get_config())
    assert (again.momentum, again.kernel_learning_rate_scale, again.kernel_momentum) == (0.8, 0.05, 0.5)
    assert again.get_config()["weight_decay"] == 0.01
