"""Each stage's run(params) on the synthetic dataset, in order, in one process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks import evaluate, ingest, preprocess, select_best, split, train
from tasks.lib.io import DataError, read_arrays, sha256_file
from tasks.lib.params import load_params
from tests.conftest import CLASS_NAMES, ROOT, TEST_PER_CLASS, TRAIN_PER_CLASS, small_params


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, image_folder):
    """Run all six stages once; tests read what they wrote."""
    root = tmp_path_factory.mktemp("stages")
    raw = small_params(yaml.safe_load((ROOT / "params.yaml").read_text()), root / "work", image_folder)
    raw["train"]["epochs"] = 3
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    written = {
        module.__name__.split(".")[-1]: module.run(params)
        for module in (ingest, preprocess, split, train, select_best, evaluate)
    }
    return params, written


def test_ingest_writes_arrays_and_manifest(pipeline_run):
    params, _ = pipeline_run
    manifest = json.loads((params.paths.raw / "manifest.json").read_text())
    assert manifest["class_names"] == list(CLASS_NAMES)
    assert manifest["counts"]["train"] == dict.fromkeys(CLASS_NAMES, TRAIN_PER_CLASS)
    arrays = read_arrays(params.paths.raw / "dataset.npz", ("x_train", "y_test"))
    assert arrays["x_train"].dtype == np.uint8 and arrays["y_test"].size == TEST_PER_CLASS * 4


def test_preprocess_reports_and_split_holds_out_a_quarter(pipeline_run):
    params, _ = pipeline_run
    report = json.loads((params.paths.prepared / "report.json").read_text())
    assert report["counts"] == {"train": 48, "test": 16} and report["duplicates"]["test_in_train"] == 0
    arrays = read_arrays(params.paths.split / "train_val.npz", ("y_train", "y_val"))
    assert np.bincount(arrays["y_val"]).tolist() == [3] * 4


def test_train_checkpoints_every_epoch_with_history(pipeline_run):
    params, _ = pipeline_run
    history = pd.read_csv(params.paths.training / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert list(history.columns) == [
        "epoch",
        "loss",
        "accuracy",
        "crossentropy",
        "val_loss",
        "val_accuracy",
        "val_crossentropy",
    ]
    assert sorted(path.name for path in params.paths.checkpoints.glob("*.keras")) == [
        "epoch-001.keras",
        "epoch-002.keras",
        "epoch-003.keras",
    ]


def test_select_best_copies_the_best_checkpoint(pipeline_run):
    params, _ = pipeline_run
    best = json.loads((params.paths.model / "best.json").read_text())
    history = pd.read_csv(params.paths.training / "history.csv")
    assert best["epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert best["sha256"] == sha256_file(params.paths.checkpoints / f"epoch-{best['epoch']:03d}.keras")
    assert best["sha256"] == sha256_file(params.paths.model / "model.keras")


def test_evaluate_writes_metrics_tables_and_plots(pipeline_run):
    params, _ = pipeline_run
    metrics = json.loads((params.paths.metrics / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(CLASS_NAMES)
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["crossentropy"] > 0
    # Four distinct patterns: even three epochs on 36 images beat chance (0.25) clearly.
    assert metrics["test"]["accuracy"] >= 0.5
    predictions = pd.read_csv(params.paths.metrics / "predictions.csv")
    assert len(predictions) == 16 and set(predictions["actual"]) == set(CLASS_NAMES)
    for name in ("training_curves.png", "confusion_matrix.png", "sample_predictions.png"):
        assert (params.paths.plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_a_tampered_model(pipeline_run, tmp_path):
    params, _ = pipeline_run
    model = params.paths.model / "model.keras"
    original = model.read_bytes()
    try:
        model.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(DataError, match="model.keras: sha256 is"):
            evaluate.run(params)
    finally:
        model.write_bytes(original)


def test_evaluate_refuses_a_best_json_without_the_model_hash(pipeline_run):
    params, _ = pipeline_run
    best = params.paths.model / "best.json"
    metrics = params.paths.metrics / "metrics.json"
    original, scored = best.read_text(), metrics.read_bytes()
    try:
        # Without the hash the model could not be checked: evaluate must stop, not score it unverified.
        best.write_text(json.dumps({key: value for key, value in json.loads(original).items() if key != "sha256"}))
        with pytest.raises(DataError, match=r"best\.json: missing keys \['sha256'\]"):
            evaluate.run(params)
        assert metrics.read_bytes() == scored
    finally:
        best.write_text(original)


def test_evaluate_tables_agree_with_the_predictions(pipeline_run):
    params, _ = pipeline_run
    predictions = pd.read_csv(params.paths.metrics / "predictions.csv")
    confusion = json.loads((params.paths.metrics / "confusion.json").read_text())
    counted = pd.crosstab(predictions["actual"], predictions["predicted"])
    for actual in CLASS_NAMES:
        for predicted in CLASS_NAMES:
            expected = int(counted.loc[actual, predicted]) if predicted in counted.columns else 0
            assert confusion[actual][predicted] == expected, (actual, predicted)
    per_class = pd.read_csv(params.paths.metrics / "per_class.csv").set_index("class")
    metrics = json.loads((params.paths.metrics / "metrics.json").read_text())
    for name in CLASS_NAMES:
        hits = ((predictions["actual"] == name) & (predictions["predicted"] == name)).sum()
        recall, predicted = hits / (predictions["actual"] == name).sum(), (predictions["predicted"] == name).sum()
        assert per_class.loc[name, "support"] == (predictions["actual"] == name).sum()
        assert per_class.loc[name, "recall"] == pytest.approx(recall, abs=1e-4)
        assert per_class.loc[name, "precision"] == pytest.approx(hits / predicted if predicted else 0.0, abs=1e-4)
        assert metrics["per_class"][name]["recall"] == pytest.approx(recall, abs=1e-4)
    accuracy = (predictions["actual"] == predictions["predicted"]).mean()
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_select_best_refuses_a_checkpoint_changed_after_training(pipeline_run):
    params, _ = pipeline_run
    best = json.loads((params.paths.model / "best.json").read_text())
    checkpoint = params.paths.checkpoints / f"epoch-{best['epoch']:03d}.keras"
    model_before, original = (params.paths.model / "model.keras").read_bytes(), checkpoint.read_bytes()
    try:
        checkpoint.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(DataError, match=rf"epoch-{best['epoch']:03d}.keras: sha256 is [0-9a-f]{{64}}, expected"):
            select_best.run(params)
        # Nothing blessed: the model and its description are the last good ones.
        assert (params.paths.model / "model.keras").read_bytes() == model_before
        assert json.loads((params.paths.model / "best.json").read_text()) == best
    finally:
        checkpoint.write_bytes(original)


def test_known_harmless_native_lines_are_dropped_and_errors_kept():
    from tasks.lib.cli import HARMLESS_NATIVE_LOG

    harmless = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795703297.209042    3161 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1795703299.376554    3161 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
        "E0000 00:00:1795703299.376554    3161 meta_optimizer.cc:967] NodeDef mentions attribute "
        "use_unbounded_threadpool which is not in the op definition",
        "I0000 00:00:1795703297.209042    3161 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use "
        "available CPU instructions in performance-critical operations.",
        "To enable the following instructions: AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    kept = [
        "E0000 00:00:1795703299.376554    3161 op_kernel.cc:1830] OP_REQUIRES failed: out of memory",
        "F0000 00:00:1795703299.376554    3161 cuda_platform.cc:52] failed call to cuInit: fatal",
        "error: data/raw/dataset.npz: not a readable .npz array file",
        "Epoch 1/4",
    ]
    assert all(HARMLESS_NATIVE_LOG.search(line) for line in harmless)
    assert not any(HARMLESS_NATIVE_LOG.search(line) for line in kept)
