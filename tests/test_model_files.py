"""Keras model files: reproducible bytes, safe-mode loading, and a failed save that loses nothing."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest

from tasks.io import DataError
from tasks.model import build_model
from tasks.model_files import load_model, save_model


def test_saved_models_are_byte_identical_and_load_in_safe_mode(tmp_path):
    keras.backend.clear_session()  # layer names count up per session: start both builds at zero
    keras.utils.set_random_seed(0)
    model = build_model("tutorial_cnn", (32, 32, 3), 10)
    first = save_model(tmp_path / "a.keras", model)
    # A second build allocates new objects (new memory addresses) with the same names and weights.
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    second = save_model(tmp_path / "b.keras", build_model("tutorial_cnn", (32, 32, 3), 10))
    assert first == second
    assert load_model(tmp_path / "a.keras", sha256=first).count_params() == model.count_params()


def test_a_model_holding_code_is_refused_even_with_the_right_hash(tmp_path):
    # A Lambda layer's function is pickled code: loading it could run anything.
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    digest = save_model(tmp_path / "lambda.keras", model)
    with pytest.raises(DataError, match=r"lambda.keras: refused: the model holds code .*safe_mode"):
        load_model(tmp_path / "lambda.keras", sha256=digest)


def test_failed_model_save_leaves_the_previous_file_byte_identical(tmp_path, monkeypatch):
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
