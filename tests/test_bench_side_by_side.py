"""bench.side_by_side's plans: each system's epochs spend the budget, counted by one formula."""

from __future__ import annotations

import math

import pytest

from bench.side_by_side import markdown, our_plan, peer_plan
from tasks.lib.flops import PFLOP, TRAINING_PASSES, conv_flops, dense_flops

# airbench94's network as `bench/peer.py --describe` counts it with tasks/lib/flops.py's formula.
PEER = {"forward_flops": 236294720, "batch_size": 1024, "train_images": 45000, "steps_per_epoch": 43}
PEER["pflop_per_step"] = TRAINING_PASSES * PEER["forward_flops"] * PEER["batch_size"] / PFLOP


def test_the_formula_counts_a_conv_and_a_dense_layer_as_multiply_adds():
    # A 3x3 conv from 64 to 256 channels over 16x16 outputs, and a 256 -> 10 dense layer.
    assert conv_flops(16 * 16, 256, (3, 3), 64) == 2 * 16 * 16 * 256 * 3 * 3 * 64
    assert conv_flops(16 * 16, 64, (3, 3), 64, groups=64) == 2 * 16 * 16 * 64 * 3 * 3
    assert dense_flops(10, 256) == 2 * 10 * 256


@pytest.mark.parametrize("budget", [0.01, 0.03, 0.1, 0.3])
def test_the_peer_runs_the_whole_steps_nearest_its_budget(budget):
    plan = peer_plan(budget, PEER)
    # airbench's train94 runs ceil(steps per epoch x epochs) steps.
    assert math.ceil(PEER["steps_per_epoch"] * plan["epochs"]) == plan["steps"]
    assert abs(plan["steps"] * PEER["pflop_per_step"] - budget) <= PEER["pflop_per_step"] / 2


@pytest.mark.parametrize(("budget", "recipe"), [(0.01, "speed"), (0.03, "speed"), (0.3, "long")])
def test_ours_spends_the_budget_with_the_recipe_for_it(budget, recipe):
    from tasks.lib.model import build_model
    from tasks.lib.params import LONG_TRAIN

    plan = our_plan(budget, PEER["train_images"])
    assert plan["recipe"] == recipe
    widths = LONG_TRAIN["widths"] if recipe == "long" else (32, 128, 128)
    forward = sum(  # the Keras count, through the same formula
        conv_flops(math.prod(layer.output.shape[1:-1]), layer.filters, layer.kernel_size, layer.input.shape[-1])
        for layer in build_model("speed_cnn", (32, 32, 3), 10, widths=tuple(widths)).layers
        if type(layer).__name__ == "Conv2D"
    )
    spent = TRAINING_PASSES * forward * PEER["train_images"] * plan["epochs"] / PFLOP
    assert spent == pytest.approx(budget, rel=0.02)


def test_the_table_gives_mean_and_spread_of_the_seeds():
    rows = [{"budget": 0.01, "system": "ours", "pflop": 0.01, "accuracies": [0.70, 0.72], "training_s": 60.0,
             "images_per_s": 900, "peak_gib": 1.5}]  # fmt: skip
    assert "| 0.01 | ours | 0.01 | 0.7100 ± 0.0100 | 2 | 60.0 | 900 | 1.5 |" in markdown(rows, "CPU: test")
