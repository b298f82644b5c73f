"""Compute counted from the model: conv and dense FLOPs per image, and a run's PFLOP."""

from __future__ import annotations

import pytest

from tasks.lib.flops import forward_flops, run_compute


def test_conv_and_dense_flops_are_two_per_multiply_add_at_every_output_position():
    import keras

    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),  # 8*8 positions x 4 filters x 3*3*2 weights
            keras.layers.Conv2D(6, 2, padding="valid", groups=2),  # 7*7 x 6 x 2*2*(4/2)
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(10),  # 6 x 10
        ]
    )
    assert forward_flops(model) == 2 * (8 * 8 * 4 * 3 * 3 * 2 + 7 * 7 * 6 * 2 * 2 * 2 + 6 * 10)


def test_the_speed_recipe_counts_its_stem_blocks_and_head():
    from tasks.lib.model import STEM_KERNEL, STEM_WIDTH, build_speed_cnn

    widths = (32, 128, 128)
    model = build_speed_cnn((32, 32, 3), 10, widths=widths, flip=True, translate=2, test_time_flip=True)
    side = 32 - STEM_KERNEL + 1  # the stem is a valid 2x2 conv: 31x31
    expected, channels = 2 * side * side * STEM_WIDTH * STEM_KERNEL**2 * 3, STEM_WIDTH
    for width in widths:  # conv at this size, 2x2 pool, conv at half size
        expected += 2 * side * side * width * 9 * channels
        side //= 2
        expected += 2 * side * side * width * 9 * width
        channels = width
    expected += 2 * channels * 10
    assert forward_flops(model) == expected
    assert 60e6 < expected < 70e6  # about 66 MFLOP, as docs/speed.md says


def test_a_run_counts_three_passes_per_training_image_and_each_inference_copy():
    compute = run_compute(
        10**6, train_images=1000, epochs=4, trained_images=4 * 1000, validated_images=4 * 100, copies=2
    )
    assert compute["training_pflop"] == pytest.approx(3 * 10**6 * 1000 * 4 / 1e15)
    assert compute["validation_pflop"] == pytest.approx(2 * 10**6 * 100 * 4 / 1e15)
    assert compute["inference_mflop_per_image"] == 2.0


def test_inference_compute_counts_every_test_time_view():
    import numpy as np

    from tasks.lib.params import TrainParams
    from tasks.train import compute_record

    arrays = {"x_train": np.zeros((100, 32, 32, 3), np.uint8), "y_train": np.zeros(100), "y_val": np.zeros(10)}
    base = {"model": "speed_cnn", "optimizer": "sgd", "learning_rate": 1.0, "batch_size": 10, "epochs": 2}
    views = {}
    for flip, translate in ((False, 0), (True, 0), (False, 1), (True, 1)):
        train = TrainParams(**base, widths=[8, 16], test_time_flip=flip, test_time_translate=translate)
        record = compute_record(train, arrays, num_classes=10)
        views[flip, translate] = record["inference_mflop_per_image"] / record["forward_mflop_per_image"]
        assert record["validation_pflop"] == pytest.approx(
            record["inference_mflop_per_image"] * 1e6 * 10 * 2 / 1e15, rel=1e-3
        )
    assert views == pytest.approx({(False, 0): 1, (True, 0): 2, (False, 1): 3, (True, 1): 6}, rel=1e-3)


@pytest.mark.parametrize(
    ("epochs", "train_images", "batch_size", "steps", "images"),
    [
        (4, 45_000, 512, 352, 180_000),  # whole epochs: every image, the short last batch included
        (0.4, 45_000, 256, 71, 71 * 256),  # 0.4 of 176 steps, rounded up to a whole step
        (0.3, 100, 10, 3, 30),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3 steps
        (3.99, 45_000, 512, 352, 180_000),  # rounds up to the whole fourth epoch, not past it
    ],
)
def test_fractional_epochs_count_whole_steps_and_the_images_they_saw(epochs, train_images, batch_size, steps, images):
    from tasks.train import images_trained, training_steps

    assert training_steps(epochs, -(-train_images // batch_size)) == steps
    assert images_trained(epochs, train_images, batch_size) == images
