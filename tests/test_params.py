"""Params: one model, strict keys, clear errors naming the key."""

from __future__ import annotations

import math

import pytest
import yaml

from tasks.lib.params import LONG_TRAIN, TUTORIAL_TRAIN, ParamsError, load_params, parse_params
from tests.conftest import ROOT


@pytest.fixture
def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.train.model == "speed_cnn" and params.train.augment.flip
    assert params.select_best.monitor == "val_loss" and params.select_best.mode == "min"


def test_tutorial_recipe_is_a_whole_valid_train_section(raw_params):
    raw_params["train"] = TUTORIAL_TRAIN
    train = parse_params(raw_params).train
    assert train.model == "tutorial_cnn" and train.optimizer == "rmsprop" and train.batch_size == 32
    # Every key is spelled out, so swapping it in leaves nothing of the speed recipe behind.
    assert set(TUTORIAL_TRAIN) == set(type(train).model_fields)


def test_long_profile_is_a_whole_valid_train_section_within_its_compute_budget(raw_params):
    from tasks.lib.flops import forward_flops, run_compute
    from tasks.lib.model import build_model
    from tasks.train import model_options

    raw_params["train"] = LONG_TRAIN
    train = parse_params(raw_params).train
    assert set(LONG_TRAIN) == set(type(train).model_fields)
    model = build_model(train.model, (32, 32, 3), 10, **model_options(train))
    compute = run_compute(
        forward_flops(model),
        train_images=45_000,
        epochs=train.epochs,
        trained_images=train.epochs * 45_000,
        validated_images=train.epochs * 5_000,
        copies=2,
    )
    assert 0.3 < compute["training_pflop"] <= 0.36  # airbench94's budget, for its 94 %


def test_epochs_take_a_fraction_and_keep_whole_numbers_whole(raw_params):
    raw_params["train"]["epochs"] = 0.4
    assert parse_params(raw_params).train.epochs == 0.4
    for whole in (4, 4.0):
        raw_params["train"]["epochs"] = whole
        epochs = parse_params(raw_params).train.epochs
        assert epochs == 4 and type(epochs) is int  # compute.json and the logs read "4", as before


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "epochs", 0, "train.epochs"),
        ("train", "epochs", -3, "train.epochs"),
        ("train", "epochs", "ten", "train.epochs"),
        ("train", "epochs", True, "train.epochs"),
        ("train", "epochs", math.inf, "train.epochs"),
        ("train", "batch_size", 0, "train.batch_size"),
        ("train", "learning_rate", 0.0, "train.learning_rate"),
        ("train", "learning_rate", -0.1, "train.learning_rate"),
        ("train", "learning_rate", math.nan, "train.learning_rate"),
        ("train", "optimizer", "adamw2", "train.optimizer"),
        ("train", "model", "resnet", "train.model"),
        ("train", "widths", [], "train.widths"),
        ("train", "momentum", 1.0, "train.momentum"),
        ("train", "label_smoothing", -0.1, "train.label_smoothing"),
        ("train", "warmup_fraction", 1.5, "train.warmup_fraction"),
        ("train", "augment", {"flip": True, "translate": 9}, "train.augment.translate"),
        ("train", "augment", {"flip": True, "shift": 2}, "train.augment.shift"),
        ("train", "lookahead", {"start_fraction": 1.0}, "train.lookahead.start_fraction"),
        ("train", "lookahead", {"start_fraction": 0.3, "every_steps": 0}, "train.lookahead.every_steps"),
        ("train", "lookahead", {"start_fraction": 0.3, "decay": 1.0}, "train.lookahead.decay"),
        ("train", "lookahead", {"every_steps": 5}, "train.lookahead.start_fraction"),
        ("train", "test_time_translate", 5, "train.test_time_translate"),
        ("train", "test_time_translate", True, "train.test_time_translate"),
        ("train", "muon", {"learning_rate": 0.0}, "train.muon.learning_rate"),
        ("train", "muon", {"learning_rate": 0.1, "momentum": 1.0}, "train.muon.momentum"),
        ("split", "validation_fraction", 0.0, "split.validation_fraction"),
        ("split", "validation_fraction", 1.0, "split.validation_fraction"),
        ("select_best", "mode", "biggest", "select_best.mode"),
        ("ingest", "kind", "tfrecord", "ingest.kind"),
    ],
)
def test_bad_values_name_the_key(raw_params, section, key, value, expected):
    raw_params[section][key] = value
    with pytest.raises(ParamsError, match=expected.replace(".", r"\.")):
        parse_params(raw_params, source="params.yaml")


def test_misspelled_key_is_rejected(raw_params):
    raw_params["train"]["epoch"] = raw_params["train"].pop("epochs")
    with pytest.raises(ParamsError) as caught:
        parse_params(raw_params, source="params.yaml")
    message = str(caught.value)
    assert "train.epoch: unknown key" in message
    assert "train.epochs: required key is missing" in message


def test_url_without_checksum_is_rejected(raw_params):
    raw_params["ingest"].update(url="https://example.org/data.tar.gz", sha256=None)
    with pytest.raises(ParamsError, match="ingest.sha256"):
        parse_params(raw_params)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("test_time_flip", True),
        ("test_time_translate", 1),
        ("augment", {"flip": True, "translate": 0}),
        ("augment", {"translate": 2}),
        ("widths", [8]),
    ],
)
def test_speed_only_keys_are_refused_for_the_tutorial_model(raw_params, key, value):
    # tutorial_cnn would silently ignore them: an error, never a no-op.
    raw_params["train"] = {**TUTORIAL_TRAIN, key: value}
    with pytest.raises(ParamsError, match=f"train.{key} apply to model speed_cnn only; tutorial_cnn would ignore"):
        parse_params(raw_params)


@pytest.mark.parametrize(("optimizer", "muon"), [("muon", None), ("sgd", {"learning_rate": 0.1})])
def test_muon_section_goes_with_the_muon_optimizer_only(raw_params, optimizer, muon):
    # Without it muon has no kernel rate; with another optimizer it would be silently ignored.
    raw_params["train"].update(optimizer=optimizer, muon=muon)
    with pytest.raises(ParamsError, match="train.muon .* is required with optimizer muon and must be null with any"):
        parse_params(raw_params)


def test_muon_is_refused_for_a_model_without_batchnorm(raw_params):
    raw_params["train"] = {**TUTORIAL_TRAIN, "optimizer": "muon", "muon": {"learning_rate": 0.1}}
    with pytest.raises(ParamsError, match="train.optimizer muon needs BatchNorm after every conv"):
        parse_params(raw_params)


def test_missing_and_unparsable_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="nowhere.yaml: params file not found"):
        load_params(tmp_path / "nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="broken.yaml: not valid YAML"):
        load_params(broken)


def test_params_are_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
        params.train.epochs = 5


@pytest.mark.parametrize(("monitor", "mode", "fix"), [("val_accuracy", "min", "max"), ("val_loss", "max", "min")])
def test_select_best_mode_must_fit_the_monitor(params_path, monitor, mode, fix):
    raw = yaml.safe_load(params_path.read_text())
    raw["select_best"] = {"monitor": monitor, "mode": mode}
    with pytest.raises(
        ParamsError, match=f"select_best: .*mode {mode} with monitor {monitor} keeps the worst epoch: use mode {fix}"
    ):
        parse_params(raw)
