"""Train: resuming from the last completed epoch, and failing closed on a NaN loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks import ingest, preprocess, split, train
from tasks.io import DataError, sha256_file
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


def test_disk_full_during_a_checkpoint_keeps_earlier_epochs_and_resumes(split_params, monkeypatch, caplog):
    import keras

    params = with_train(split_params, epochs=3)
    real_save = keras.Model.save
    calls = []

    def save_then_fill_the_disk(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 2:  # epoch 2's checkpoint: half written, then the disk is full
            Path(filepath).write_bytes(b"PK partial")
            raise OSError(28, "No space left on device")
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        train.run(params)
    checkpoints = params.paths.checkpoints
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch-001.keras", "fingerprint.json", "history.csv"]
    history = pd.read_csv(checkpoints / "history.csv")
    assert history["epoch"].tolist() == [1]
    assert sha256_file(checkpoints / "epoch-001.keras") == history["sha256"].iloc[0]

    monkeypatch.setattr(keras.Model, "save", real_save)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    assert "epoch 1 of 3" in caplog.text
    assert pd.read_csv(params.paths.training / "history.csv")["epoch"].tolist() == [1, 2, 3]


def test_failed_model_save_leaves_the_previous_file_byte_identical(tmp_path, monkeypatch):
    import keras

    from tasks.io import save_model
    from tasks.model import build_model

    model = build_model("tutorial_cnn", (32, 32, 3), 10)
    target = tmp_path / "model.keras"
    save_model(target, model)
    before = target.read_bytes()

    def disk_full(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(target, model)
    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]


def test_tampered_checkpoint_is_refused_on_resume(split_params):
    params = with_train(split_params, epochs=3)
    train.run(params)
    checkpoints = params.paths.checkpoints
    (checkpoints / "epoch-003.keras").unlink()
    payload = bytearray((checkpoints / "epoch-002.keras").read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    (checkpoints / "epoch-002.keras").write_bytes(bytes(payload))
    with pytest.raises(DataError, match="epoch-002.keras: sha256 is"):
        train.run(params)
