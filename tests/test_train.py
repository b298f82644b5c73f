"""Train: resuming from the last completed epoch, and failing closed on a NaN loss."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks import train
from tasks.lib.io import DataError, sha256_file
from tasks.lib.params import load_params
from tasks.train import TrainingDivergedError
from tests.conftest import ROOT


def with_train(path, **changes):
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(changes)
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def checkpoint_weights(path: Path) -> list:
    """The weights saved in the checkpoint at `path` (load_model wants a sha256; its own is given)."""
    from tasks.lib.model_files import load_model

    return load_model(path, sha256=sha256_file(path)).get_weights()


def as_if_killed_during(checkpoints: Path, epoch: int) -> None:
    """Leave `checkpoints` as a run killed during `epoch` would: its checkpoint and history row never landed."""
    (checkpoints / train.checkpoint_name(epoch)).unlink()
    rows = pd.read_csv(checkpoints / "history.csv")
    rows[rows["epoch"] < epoch].to_csv(checkpoints / "history.csv", index=False)


def test_rerun_resumes_after_the_last_completed_epoch(split_params, caplog):
    params = with_train(split_params, epochs=3)
    train.run(params)
    checkpoints = params.paths.resume
    first_epoch = (checkpoints / "epoch-001.keras").read_bytes()
    as_if_killed_during(checkpoints, 3)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    assert "resuming from" in caplog.text and "epoch 2 of 3" in caplog.text
    assert pd.read_csv(params.paths.training / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert (checkpoints / "epoch-001.keras").read_bytes() == first_epoch
    assert (params.paths.checkpoints / "epoch-001.keras").read_bytes() == first_epoch  # published as trained


def test_a_run_killed_under_another_backend_or_library_version_starts_over(split_params, caplog):
    params = with_train(split_params, epochs=2)
    train.run(params)
    checkpoints = params.paths.resume
    for killed_under in ({"keras_backend": "jax"}, {"tensorflow": "2.20.0"}, {"numpy": "1.26.4"}, {"keras": "3.14"}):
        as_if_killed_during(checkpoints, 2)
        fingerprint = json.loads((checkpoints / "fingerprint.json").read_text())
        assert fingerprint["software"] == train.software_versions() and fingerprint["software"]["keras_backend"]
        fingerprint["software"] |= killed_under  # as if the killed run had another backend or lock
        (checkpoints / "fingerprint.json").write_text(json.dumps(fingerprint))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tasks.train"):
            train.run(params)
        assert "resuming from" not in caplog.text, killed_under
        assert pd.read_csv(params.paths.training / "history.csv")["epoch"].tolist() == [1, 2]


def test_training_logs_its_progress_inside_each_epoch(split_params, caplog, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)  # a line after every batch, not every 20 s
    params = with_train(split_params, epochs=2)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    lines = [record.getMessage() for record in caplog.records if "images/s" in record.getMessage()]
    steps = math.ceil(36 / 8)  # 36 training images (48 less a quarter for validation), batch size 8
    assert len(lines) == 2 * steps and lines[0].startswith(f"epoch 1/2, step 1/{steps}: "), lines
    last = (
        rf"epoch 2/2, step {steps}/{steps}: \d+ images/s; epoch \d+:\d\d elapsed, 0:00 left; about 0:00 "
        r"left in the run"
    )
    assert re.fullmatch(last, lines[-1]), lines[-1]


def test_checkpoints_are_published_with_their_hashes_and_resume_state_kept_apart(split_params):
    params = with_train(split_params, epochs=2)
    train.run(params)
    published = pd.read_csv(params.paths.checkpoints / "history.csv")
    assert sorted(path.name for path in params.paths.checkpoints.iterdir()) == [
        "epoch-001.keras",
        "epoch-002.keras",
        "history.csv",
    ]
    for row in published.itertuples():
        assert sha256_file(params.paths.checkpoints / f"epoch-{row.epoch:03d}.keras") == row.sha256
    # The resume state is not inside the stage's outputs (DVC deletes and caches those).
    assert not params.paths.resume.is_relative_to(params.paths.checkpoints)
    assert (params.paths.resume / "fingerprint.json").exists()


def test_validation_crossentropy_is_computed_as_the_test_crossentropy(split_params):
    import numpy as np

    from tasks.evaluate import score_predictions
    from tasks.lib.io import read_arrays
    from tasks.lib.model_files import load_model

    params = with_train(split_params, epochs=1, **SPEED_RECIPE)  # label smoothing 0.2: loss is not cross-entropy
    train.run(params)
    history = pd.read_csv(params.paths.training / "history.csv")
    checkpoint = params.paths.checkpoints / "epoch-001.keras"
    model = load_model(checkpoint, sha256=sha256_file(checkpoint))
    arrays = read_arrays(params.paths.split / "train_val.npz", ("x_val", "y_val"))
    scores = score_predictions(
        np.asarray(model.predict(arrays["x_val"], verbose=0)), arrays["y_val"].astype(np.int64), ["a", "b", "c", "d"]
    )
    assert history["val_crossentropy"].iloc[0] == pytest.approx(scores.crossentropy, rel=1e-4)
    assert history["val_loss"].iloc[0] != pytest.approx(scores.crossentropy, rel=1e-2)  # the smoothed objective


def test_changed_params_start_afresh(split_params):
    params = with_train(split_params, epochs=2)
    train.run(params)
    params = with_train(split_params, epochs=1, learning_rate=0.01)
    train.run(params)
    assert sorted(path.name for path in params.paths.checkpoints.glob("*.keras")) == ["epoch-001.keras"]


# The speed recipe at toy widths: every knob on, so each is built, saved and resumed once.
SPEED_RECIPE = {
    "model": "speed_cnn",
    "widths": [8, 16],
    "optimizer": "muon",
    "muon": {"learning_rate": 0.05, "momentum": 0.6},
    "learning_rate": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,
    "warmup_fraction": 0.25,
    "augment": {"flip": True, "translate": 2},
    "test_time_flip": True,
    "lookahead": {"start_fraction": 0.3, "every_steps": 2, "decay": 0.9},
}


def test_speed_recipe_resumes_its_schedule_and_predicts_without_augmenting(split_params, caplog):
    import numpy as np

    from tasks.lib.io import read_arrays
    from tasks.lib.model_files import load_model

    params = with_train(split_params, epochs=3, **SPEED_RECIPE)
    train.run(params)
    checkpoints = params.paths.resume
    (checkpoints / "epoch-003.keras").unlink()
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    assert "epoch 2 of 3" in caplog.text
    history = pd.read_csv(params.paths.training / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and np.isfinite(history.drop(columns="epoch").to_numpy()).all()

    model = load_model(checkpoints / "epoch-003.keras", sha256=sha256_file(checkpoints / "epoch-003.keras"))
    arrays = read_arrays(params.paths.split / "train_val.npz", ("x_train",))
    steps_per_epoch = -(-arrays["x_train"].shape[0] // params.train.batch_size)
    # The resumed run carried on from the saved step count: the schedule was not restarted.
    assert int(model.optimizer.iterations.numpy()) == 3 * steps_per_epoch
    x = arrays["x_train"][:8]
    first, second = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)  # flips and shifts are training-only
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-5)
    # Test-time flips: an image and its mirror image get the same prediction.
    np.testing.assert_allclose(model.predict(x[:, :, ::-1], verbose=0), first, rtol=1e-4, atol=1e-6)


def test_a_resumed_run_ends_with_the_weights_and_history_of_a_run_never_stopped(split_params):
    import numpy as np

    def final_weights(params):
        return checkpoint_weights(params.paths.resume / "epoch-003.keras")

    params = with_train(split_params, epochs=3, **SPEED_RECIPE)  # flips and shifts on
    train.run(params)
    uninterrupted, history = final_weights(params), (params.paths.training / "history.csv").read_bytes()
    # The same order comes from epoch_order, the same augmentation from the seed states saved
    # beside epoch 2's checkpoint.
    as_if_killed_during(params.paths.resume, 3)
    train.run(params)
    assert (params.paths.training / "history.csv").read_bytes() == history
    for resumed, before in zip(final_weights(params), uninterrupted, strict=True):
        np.testing.assert_array_equal(resumed, before)


def test_a_resumed_run_on_jax_ends_where_an_unbroken_one_does(split_params):
    """The device machines train on JAX (no tf.data): the stage there, in processes of its own."""
    import numpy as np

    params = with_train(split_params, epochs=3, **SPEED_RECIPE)
    environment = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    # XLA's compiled steps kept on disk, as a device machine would keep them: the resumed run loads
    # what the unbroken one compiled (about 14 of its 19 CPU-seconds) and computes the same programs.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(split_params.parent / "jax-cache")}
    environment |= cache | {
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        # XLA's CPU backend unoptimised: both runs compile the same programs either way, and the
        # claim is that they meet; the test then takes 19 CPU-seconds instead of 31 (Zen 4).
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }

    def train_on_jax():
        stage = [sys.executable, "-m", "tasks.train", "--params", str(split_params)]
        result = subprocess.run(stage, cwd=ROOT, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return checkpoint_weights(params.paths.resume / "epoch-003.keras")

    uninterrupted, history = train_on_jax(), (params.paths.training / "history.csv").read_bytes()
    as_if_killed_during(params.paths.resume, 3)
    resumed = train_on_jax()
    assert (params.paths.training / "history.csv").read_bytes() == history
    for after, before in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(after, before)


def test_each_epoch_feeds_every_image_once_in_the_order_its_seed_and_number_draw():
    import numpy as np

    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    arrays, targets = {"x_train": images, "x_val": images[:3]}, {"train": np.arange(10) * 10, "val": np.arange(3)}

    def batches(epochs):
        inputs = train.fit_inputs(arrays, targets, batch_size=4, seed=7, epochs=epochs)
        assert [y.numpy().tolist() for _, y in inputs["validation_data"]] == [[0, 1, 2]]  # as stored
        assert inputs["x"].options().autotune.enabled is False  # no tuning thread for a deleted iterator to wait on
        return [(x.numpy(), y.numpy()) for x, y in inputs["x"]]

    whole_run = batches(range(1, 3))
    assert [len(y) for _, y in whole_run] == [4, 4, 2, 4, 4, 2]  # each epoch ends on its own partial batch
    # Backends without tf.data (JAX) get the same batches from numpy, and validation as stored.
    numpy_inputs = train.fit_inputs(arrays, targets, batch_size=4, seed=7, epochs=range(1, 3), backend="jax")
    assert numpy_inputs["shuffle"] is False and numpy_inputs["validation_data"][1].tolist() == [0, 1, 2]
    for (x, y), (x_numpy, y_numpy) in zip(whole_run, numpy_inputs["x"], strict=True):
        np.testing.assert_array_equal(x_numpy, x)
        np.testing.assert_array_equal(y_numpy, y)
    orders = [train.epoch_order(7, epoch, 10) for epoch in (1, 2)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in whole_run]), np.concatenate(orders) * 10)
    for x, y in whole_run:
        np.testing.assert_array_equal(x, images[y // 10])  # images and targets stay paired
    assert sorted(orders[0]) == list(range(10)) and not np.array_equal(orders[0], orders[1])
    # A run resumed after epoch 1 gets epoch 2's batches again, whatever the global random state.
    np.random.seed(0)
    for (x, y), (x_again, y_again) in zip(whole_run[3:], batches(range(2, 3)), strict=True):
        np.testing.assert_array_equal(y_again, y)
        np.testing.assert_array_equal(x_again, x)


def test_a_fractional_last_epoch_stops_early_is_validated_and_counted_as_run(split_params):
    from tasks.lib.flops import TRAINING_PASSES
    from tasks.lib.io import read_arrays, read_json
    from tasks.lib.model_files import load_model

    params = with_train(split_params, epochs=1.5, **SPEED_RECIPE)
    train.run(params)
    train_images = read_arrays(params.paths.split / "train_val.npz", ("y_train",))["y_train"].size
    steps_per_epoch = -(-train_images // params.train.batch_size)
    history = pd.read_csv(params.paths.training / "history.csv")
    assert history["epoch"].tolist() == [1, 2]  # the half epoch is validated and checkpointed too
    checkpoint = params.paths.checkpoints / "epoch-002.keras"
    model = load_model(checkpoint, sha256=sha256_file(checkpoint))
    steps = int(model.optimizer.iterations.numpy())
    assert steps == math.ceil(1.5 * steps_per_epoch) < 2 * steps_per_epoch
    compute = read_json(params.paths.training / "compute.json")
    seen = train_images + (steps - steps_per_epoch) * params.train.batch_size
    forward = compute["forward_mflop_per_image"] * 1e6
    assert compute["training_pflop"] == pytest.approx(TRAINING_PASSES * forward * seen / 1e15, rel=1e-3)
    assert compute["epochs"] == 1.5


@pytest.mark.parametrize("optimizer", [{"optimizer": "muon"}, {"optimizer": "sgd", "muon": None}])
def test_speed_recipe_trains_the_same_weights_twice(split_params, optimizer):
    import shutil

    import numpy as np

    def final_weights(params):
        return checkpoint_weights(params.paths.checkpoints / "epoch-002.keras")

    params = with_train(split_params, epochs=2, **{**SPEED_RECIPE, **optimizer})
    train.run(params)
    first_history, first = (params.paths.training / "history.csv").read_bytes(), final_weights(params)
    shutil.rmtree(params.paths.checkpoints)
    shutil.rmtree(params.paths.resume)
    train.run(params)  # seeded flips and shifts, op determinism: the same weights again
    assert (params.paths.training / "history.csv").read_bytes() == first_history
    for again, before in zip(final_weights(params), first, strict=True):
        np.testing.assert_array_equal(again, before)


def _weights_per_step(lookahead: dict, *, epochs: float, steps_per_epoch: int, start_epoch: int = 0):
    """Fit a tiny real model with the lookahead callback; return its weights before and after it, per step."""
    import keras
    import numpy as np

    from tasks.lib.params import LookaheadParams

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    before, after = [], []

    class Recorder(keras.callbacks.Callback):
        def __init__(self, into):
            super().__init__()
            self.into = into

        def on_train_batch_end(self, batch, logs=None):
            # Through self.model, which brings the weights up to date under JAX (its fit keeps them apart).
            self.into.append([v.numpy().copy() for v in self.model.weights])

    total_steps = train.training_steps(epochs, steps_per_epoch)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8 * steps_per_epoch, 4)), rng.normal(size=(8 * steps_per_epoch, 3))
    model.optimizer.iterations.assign(start_epoch * steps_per_epoch)
    for first, last, steps in train.epoch_runs(total_steps, steps_per_epoch, start_epoch):
        # As train.fit does: a fractional last epoch is its own fit, with a lookahead started afresh.
        averager = train._lookahead_averager(
            LookaheadParams(**lookahead), total_steps=total_steps, steps_per_epoch=steps_per_epoch, start_epoch=first
        )
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=last,
            initial_epoch=first,
            steps_per_epoch=steps,
            verbose=0,
            callbacks=[Recorder(before), averager, Recorder(after)],
        )
    return before, after


# 3 epochs: 12 steps, the average starts at step 6 (the first multiple of 3 from 0.3 x 12). 2.5 epochs:
# 10 steps, it starts at step 3, and the last epoch ends at step 10, which is no update and no multiple of 4.
@pytest.mark.parametrize(("epochs", "total_steps", "first_update"), [(3, 12, 6), (2.5, 10, 3)])
def test_lookahead_moves_the_weights_to_their_rising_average_and_hands_it_over_at_epoch_ends(
    epochs, total_steps, first_update
):
    import numpy as np

    from tasks.lib.params import LookaheadParams

    lookahead = {"start_fraction": 0.3, "every_steps": 3, "decay": 0.9}
    steps_per_epoch = 4
    before, after = _weights_per_step(lookahead, epochs=epochs, steps_per_epoch=steps_per_epoch)
    assert len(before) == total_steps
    average = None
    for step, (raw, seen) in enumerate(zip(before, after, strict=True), start=1):
        if step % 3 == 0 and step >= first_update:
            if average is None:
                average = [w.copy() for w in raw]  # starts as the weights
            else:
                keep = train.lookahead_decay(step, total_steps, LookaheadParams(**lookahead))
                assert 0 < keep <= 0.9**3 + 1e-12
                average = [a + (1 - keep) * (w - a) for a, w in zip(average, raw, strict=True)]
        elif average is None or (step % steps_per_epoch and step != total_steps):
            for got, expected in zip(seen, raw, strict=True):
                np.testing.assert_array_equal(got, expected)  # untouched between updates
            continue
        for got, expected in zip(seen, average, strict=True):  # BatchNorm's statistics included
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert average is not None and not np.allclose(before[-1][0], after[-1][0])


def test_lookahead_resumed_after_it_started_takes_the_checkpoint_weights_as_its_average():
    import numpy as np

    lookahead = {"start_fraction": 0.25, "every_steps": 2, "decay": 0.9}
    # Resumed at epoch 2 of 4 (8 steps of 16 done; the average started at step 4): the first step
    # that is not an update (9) leaves the weights alone, the next (10) averages from the checkpoint's.
    before, after = _weights_per_step(lookahead, epochs=4, steps_per_epoch=4, start_epoch=2)
    np.testing.assert_array_equal(after[0][0], before[0][0])
    assert not np.array_equal(after[1][0], before[1][0])


def test_nan_loss_fails_without_writing_history(split_params):
    params = with_train(split_params, optimizer="sgd", learning_rate=1e30, epochs=2)
    with pytest.raises(TrainingDivergedError, match="loss is not finite"):
        train.run(params)
    assert not (params.paths.training / "history.csv").exists()
    assert not params.paths.checkpoints.exists() and not list(params.paths.resume.glob("*.keras"))


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
    checkpoints = params.paths.resume
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "epoch-001.keras",
        "epoch-001.random.json",
        "fingerprint.json",
        "history.csv",
    ]
    history = pd.read_csv(checkpoints / "history.csv")
    assert history["epoch"].tolist() == [1]
    assert sha256_file(checkpoints / "epoch-001.keras") == history["sha256"].iloc[0]

    monkeypatch.setattr(keras.Model, "save", real_save)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train.run(params)
    assert "epoch 1 of 3" in caplog.text
    assert pd.read_csv(params.paths.training / "history.csv")["epoch"].tolist() == [1, 2, 3]


def test_tampered_checkpoint_or_seed_states_are_refused_on_resume(split_params):
    params = with_train(split_params, epochs=3, **SPEED_RECIPE)  # random layers: seed states to save
    train.run(params)
    checkpoints = params.paths.resume
    as_if_killed_during(checkpoints, 3)
    for tampered in ("epoch-002.keras", "epoch-002.random.json"):  # each on its own, the other as written
        original = (checkpoints / tampered).read_bytes()
        payload = bytearray(original)
        # One digit changed: the seed states still parse, and would be used if nothing checked them.
        index = next(i for i in range(len(payload) // 2, len(payload)) if chr(payload[i]).isdigit())
        payload[index] = ord("1" if payload[index] != ord("1") else "2")
        (checkpoints / tampered).write_bytes(bytes(payload))
        with pytest.raises(DataError, match=f"{tampered}: sha256 is"):
            train.run(params)
        (checkpoints / tampered).write_bytes(original)
