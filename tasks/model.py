"""Model architectures: build_model(...) -> keras.Model; no compile, no IO, no device choice."""

from __future__ import annotations

import keras
from keras import layers


def build_tutorial_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The tutorial's CNN, layer for layer, with the [0, 255] -> [0, 1] rescale moved inside."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, dtype="uint8"),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(16, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(32, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(64, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.3),
            layers.Flatten(),
            layers.Dense(500, activation="relu"),
            layers.Dropout(0.4),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="tutorial_cnn",
    )


# CIFAR-10's per-channel mean and standard deviation of [0, 1] pixels: fixed, so the model
# normalises each batch itself and the arrays stay uint8 in memory (a quarter of float32).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _speed_block(x, width: int):
    """Conv, 2x2 max-pool, batch norm, GELU, then conv, batch norm, GELU (airbench's block)."""
    for pool in (True, False):
        x = layers.Conv2D(width, kernel_size=3, padding="same", use_bias=False)(x)
        if pool:
            x = layers.MaxPooling2D(pool_size=2)(x)
        # Momentum 0.6: short runs need running statistics that follow the fast-moving weights.
        x = layers.BatchNormalization(momentum=0.6, scale=False)(x)
        x = layers.Activation("gelu")(x)
    return x


def build_speed_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    widths: tuple[int, ...] = (32, 128, 128),
    flip: bool = False,
    translate: int = 0,
) -> keras.Model:
    """An airbench-style CNN built for accuracy per second on a CPU; augments only while training."""
    inputs = keras.Input(shape=input_shape, dtype="uint8")
    x = layers.Rescaling(1.0 / 255)(inputs)
    # Augmentation layers are identity at inference, so the saved model needs no separate copy.
    if flip:
        x = layers.RandomFlip("horizontal")(x)
    if translate:
        height, width = input_shape[:2]
        x = layers.RandomTranslation(
            translate / height, translate / width, fill_mode="reflect", interpolation="nearest"
        )(x)
    x = layers.Normalization(mean=CIFAR10_MEAN, variance=[s * s for s in CIFAR10_STD])(x)
    x = layers.Conv2D(24, kernel_size=2, padding="valid")(x)
    x = layers.Activation("gelu")(x)
    for width in widths:
        x = _speed_block(x, width)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(num_classes, use_bias=False)(x)
    # Scaled-down logits (airbench's 1/9) keep the early softmax soft at high learning rates.
    x = layers.Rescaling(1.0 / 9)(x)
    outputs = layers.Activation("softmax")(x)
    return keras.Model(inputs, outputs, name="speed_cnn")


ARCHITECTURES = {"tutorial_cnn": build_tutorial_cnn, "speed_cnn": build_speed_cnn}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **options) -> keras.Model:
    """Build the named architecture for images of `input_shape` and `num_classes` classes."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(ARCHITECTURES)}") from None
    return builder(input_shape, num_classes, **options)
