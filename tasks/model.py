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


ARCHITECTURES = {"tutorial_cnn": build_tutorial_cnn}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Build the named architecture for images of `input_shape` and `num_classes` classes."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(ARCHITECTURES)}") from None
    return builder(input_shape, num_classes)
