"""Keras model files: reproducible bytes, safe-mode loading, and a failed save that loses nothing."""

from __future__ import annotations

import zipfile

import keras
import pytest

from tasks.lib.io import DataError
from tasks.lib.model import ScaledBias, build_model
from tasks.lib.model_files import load_model, save_model
from tests.conftest import on_a_small_disk


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


def test_a_model_file_names_our_layers_by_registered_name_so_moving_their_code_changes_no_byte(tmp_path):
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, ScaledBias(multiplier=2.0)(inputs))
    digest = save_model(tmp_path / "ours.keras", model)
    with zipfile.ZipFile(tmp_path / "ours.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = members["config.json"].decode()
    assert '"module": null, "class_name": "ScaledBias"' in config
    assert '"module": "tasks' not in config
    # Files written before, which name the layer's module as it then was, still load.
    members["config.json"] = config.replace('"module": null', '"module": "tasks.model"').encode()
    with zipfile.ZipFile(tmp_path / "older.keras", "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    assert members["config.json"] != config.encode()
    assert load_model(tmp_path / "older.keras").layers[-1].multiplier == 2.0
    assert load_model(tmp_path / "ours.keras", sha256=digest).layers[-1].multiplier == 2.0


def test_a_model_holding_code_is_refused_even_with_the_right_hash(tmp_path):
    # A Lambda layer's function is pickled code: loading it could run anything.
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    digest = save_model(tmp_path / "lambda.keras", model)
    with pytest.raises(DataError, match=r"lambda.keras: refused: the model holds code .*safe_mode"):
        load_model(tmp_path / "lambda.keras", sha256=digest)


# A model file is about 2.1 MB: a 3 MiB filesystem holds one, and runs out partway through the second.
MODEL_ON_A_FULL_DISK = """
import json, os, sys
from pathlib import Path
from tasks.lib.model import build_model
from tasks.lib.model_files import save_model
target = Path(sys.argv[1]) / "model.keras"
save_model(target, build_model("tutorial_cnn", (32, 32, 3), 10))
before, disk = target.read_bytes(), os.statvfs(target.parent)
try:
    save_model(target, build_model("tutorial_cnn", (32, 32, 3), 4))
    error = None
except OSError as failure:
    error = str(failure)
print(json.dumps({"error": error, "free": disk.f_bavail * disk.f_frsize, "size": len(before),
                  "kept": target.read_bytes() == before, "files": sorted(os.listdir(target.parent))}))
"""


def test_disk_full_mid_model_save_leaves_the_previous_file_byte_identical(tmp_path):
    outcome = on_a_small_disk(MODEL_ON_A_FULL_DISK, 3 * 1024, tmp_path / "disk")
    assert "No space left on device" in outcome["error"]
    assert 256 * 1024 <= outcome["free"] < outcome["size"]  # part of the new file fitted: the failure came mid-file
    assert outcome["kept"] and outcome["files"] == ["model.keras"]
