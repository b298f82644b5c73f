"""bench.accelerator's recipe overrides: YAML values on the recipe's train keys, checked as params.yaml is."""

from __future__ import annotations

import pytest

from bench.accelerator import recipe_train
from tasks.lib.params import LONG_TRAIN, ParamsError, load_params
from tests.conftest import ROOT


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml")


def test_overrides_apply_to_the_chosen_recipe(params):
    train = recipe_train(params, "long", ["epochs=2.65", "widths=[48, 192, 192]", "muon.learning_rate=0.15"])
    assert train.widths == [48, 192, 192] and train.epochs == 2.65
    assert train.muon.learning_rate == 0.15 and train.muon.momentum == LONG_TRAIN["muon"]["momentum"]
    # Keys not overridden come from the long profile, not from params.yaml's default.
    assert train.test_time_translate == LONG_TRAIN["test_time_translate"] != params.train.test_time_translate
    # The long profile itself is left as it was for the next run.
    assert LONG_TRAIN["muon"]["learning_rate"] == 0.1
    assert recipe_train(params, "speed", []) == params.train
    assert recipe_train(params, "speed", ["lookahead=null"]).lookahead is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("widthz=[48,192,192]", "train.widthz: unknown key"),
        ("epochs=-1", "train.epochs"),
        ("epochs", "--set 'epochs': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("widths=[48, 192", "--set 'widths=[48, 192': the value is not valid YAML"),
        ("muon.rate=0.1", "train.muon.rate: unknown key"),
        ("widths.first=48", "--set 'widths.first=48': train.widths is not a mapping"),
    ],
)
def test_bad_overrides_name_the_key_and_what_was_expected(params, override, named):
    with pytest.raises(ParamsError) as raised:
        recipe_train(params, "speed", [override])
    assert named in str(raised.value)
