"""bench.step: the recipe's own training step, timed by itself in the recipe's numerics mode."""

from __future__ import annotations

import pytest
import yaml

from bench.step import step_figures
from tasks.lib.params import TUTORIAL_TRAIN
from tests.conftest import ROOT


def write_recipe(path, train: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"] = train
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_step_is_the_recipes_own_with_its_counted_flops(tmp_path):
    write_recipe(tmp_path / "params.yaml", {**TUTORIAL_TRAIN, "batch_size": 16})
    figures = step_figures(tmp_path / "params.yaml", seconds=0.5)
    # The tutorial's CNN by hand: three 2x2 convs (16, 32, 64 filters, each after a 2x2 pool but
    # the first), then dense 1024 -> 500 -> 10; 2 FLOPs a multiply-add, 3 passes a training image.
    convolutions = 32 * 32 * 16 * 2 * 2 * 3 + 16 * 16 * 32 * 2 * 2 * 16 + 8 * 8 * 64 * 2 * 2 * 32
    forward = 2 * (convolutions + 1024 * 500 + 500 * 10)
    assert figures["gflop_per_step"] == pytest.approx(3 * forward * 16 / 1e9)
    assert figures["precision"] == "float32"  # params.yaml's numerics: portable
    assert figures["steps"] >= 5
    assert figures["gflop_per_s"] == pytest.approx(figures["gflop_per_step"] / figures["step_s"])


def test_a_recipe_that_cannot_build_names_its_params_file(tmp_path):
    write_recipe(tmp_path / "params.yaml", {**TUTORIAL_TRAIN, "model": "no_such_cnn"})
    with pytest.raises(RuntimeError, match=r"(?s)bench.step on .*params.yaml failed:.*train.model"):
        step_figures(tmp_path / "params.yaml", seconds=0.5)
