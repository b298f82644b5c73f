"""Train: resuming from the last completed epoch, and failing closed on a NaN loss."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import yaml

from tasks import ingest, preprocess, split, train
from tasks.params import load_params
from tasks.train import TrainingDivergedError


@pytest.fixture
def split_params(params_path):
    params = load_params(params_path)
    for module in (ingest, preprocess, split):
        module.run(params)
    return params_path


def with_train(path, **changes):
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(changes)
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_rerun_resumes_after_the_last_completed_epoch(split_params, caplog):
    params = with_train(split_params, epochs=3)
    train.run(params)
    checkpoints = params.paths.checkpoints
    first_epoch = (checkpoints / "epoch-001.keras").read_bytes()
    # As if killed during epoch 3: its checkpoint and history row never landed.
    (checkpoints / "epoch-003.keras").unlink()
    history = pd.read_csv(checkpoints / "history.csv")
    history[history["epoch"] < 3].to_csv(checkpoints / "history.csv", index=False)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    assert "resuming from" in caplog.text and "epoch 2 of 3" in caplog.text
    assert pd.read_csv(params.paths.training / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert (checkpoints / "epoch-001.keras").read_bytes() == first_epoch


def test_changed_params_start_afresh(split_params):
    params = with_train(split_params, epochs=2)
    train.run(params)
    params = with_train(split_params, epochs=1, learning_rate=0.01)
    train.run(params)
    assert sorted(path.name for path in params.paths.checkpoints.glob("*.keras")) == ["epoch-001.keras"]


def test_nan_loss_fails_without_writing_history(split_params):
    params = with_train(split_params, optimizer="sgd", learning_rate=1e30, epochs=2)
    with pytest.raises(TrainingDivergedError, match="loss is not finite"):
        train.run(params)
    assert not (params.paths.training / "history.csv").exists()
    assert not list(params.paths.checkpoints.glob("*.keras"))
