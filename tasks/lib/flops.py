"""Compute counted from the model itself: FLOPs per image, and the PFLOP a training run spent.

Counts the convolutions and dense layers (2 FLOPs per multiply-add), which are nearly all of
the arithmetic; batch norm, GELU, pooling and the optimizer's update add about 3 % for the
speed recipe and are left out, as airbench's and the literature's counts leave them out.
Muon's Newton-Schulz products (tasks/lib/optimizers.py) are 0.8 % more at the default widths and
1.7 % at the long profile's (0.79 and 6.3 GFLOP a step), left out likewise.
A training step costs three forward passes (forward, and the two products of the backward
pass); a prediction (validation, test) one per test-time view (2 with flips, 6 with flips and shifts).
"""

from __future__ import annotations

import math

PFLOP = 1e15
TRAINING_PASSES = 3  # forward + gradient w.r.t. activations + gradient w.r.t. weights


def _layers(model) -> list:
    """Every layer of `model`, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.extend(_layers(layer) if hasattr(layer, "layers") else [layer])
    return found


def conv_flops(positions: int, filters: int, kernel_size: tuple[int, int], channels: int, groups: int = 1) -> int:
    """FLOPs of one image through a 2-D convolution: 2 per multiply-add, at each output position."""
    per_position = kernel_size[0] * kernel_size[1] * channels // groups
    return 2 * positions * filters * per_position


def dense_flops(outputs: int, inputs: int) -> int:
    """FLOPs of one image through a dense (linear) layer: `outputs` values of `inputs` multiply-adds each."""
    return 2 * outputs * inputs


def forward_flops(model) -> int:
    """FLOPs of one image's forward pass through the model's conv and dense layers (Keras)."""
    import keras

    total = 0
    for layer in _layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            positions = math.prod(layer.output.shape[1:-1])
            total += conv_flops(positions, layer.filters, layer.kernel_size, layer.input.shape[-1], layer.groups)
        elif isinstance(layer, keras.layers.Dense):
            total += dense_flops(math.prod(layer.output.shape[1:]), layer.input.shape[-1])
    return total


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def run_compute(
    forward: int, *, train_images: int, epochs: float, trained_images: int, validated_images: int, copies: int
) -> dict:
    """A training run's compute: per image, and PFLOP of training and of validating every epoch.

    `trained_images` and `validated_images` count each image once per pass over it (epochs x the set's
    size for whole epochs); `copies` is how many views of each image inference runs: 2 with test-time
    flips, 6 with flips and shifts.
    """
    return {
        "forward_mflop_per_image": round(forward / 1e6, 3),
        "inference_mflop_per_image": round(copies * forward / 1e6, 3),
        "training_pflop": _significant(TRAINING_PASSES * forward * trained_images / PFLOP),
        "validation_pflop": _significant(copies * forward * validated_images / PFLOP),
        "train_images": train_images,
        "epochs": epochs,
    }
