"""Evaluate: the only stage that touches the test set; metrics, per-class figures, plots and the drift reference."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.lib.cli import run_stage
from tasks.lib.drift import reference_profile
from tasks.lib.io import (
    DataError,
    atomic_path,
    read_arrays,
    read_class_names,
    read_json,
    read_table,
    write_json,
    write_table,
)
from tasks.lib.model_files import load_model
from tasks.lib.params import NumericsParams, Params

log = logging.getLogger(__name__)

# What evaluate reads of select_best's best.json: the epoch, the hash the model must match, its validation scores.
BEST_KEYS = ("epoch", "sha256", "val_accuracy", "val_crossentropy", "val_loss")
SAMPLE_GRID = (3, 12)  # rows x columns of test images, as the tutorial shows 36
# The CPU features that decide which oneDNN kernels run, and so the float results.
RECORDED_CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True)
class Scores:
    accuracy: float
    crossentropy: float  # plain (not label-smoothed), as the history's val_crossentropy
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    confusion: np.ndarray  # [actual, predicted] counts


def score_predictions(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Scores:
    """Accuracy, plain cross-entropy, per-class precision/recall/F1 and the confusion matrix."""
    num_classes = len(class_names)
    if probabilities.shape != (labels.size, num_classes):
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected ({labels.size}, {num_classes})")
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted_totals = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted_totals, out=np.zeros(num_classes), where=predicted_totals > 0)
    recall = np.divide(true_positives, support, out=np.zeros(num_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    # Clip so one confident mistake costs a large but finite loss (1e-7 as Keras' epsilon).
    picked = np.clip(probabilities[np.arange(labels.size), labels], 1e-7, 1.0)
    per_class = pd.DataFrame(
        {"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    return Scores(
        accuracy=float((predicted == labels).mean()),
        crossentropy=float(-np.log(picked).mean()),
        per_class=per_class,
        confusion=confusion,
    )


def metrics_summary(scores: Scores, best: dict) -> dict:
    """The metrics file: test figures, per-class figures, and the selected epoch's validation figures.

    Test and validation cross-entropy are the same function (plain, not label-smoothed), so they
    compare; the label-smoothed training objective is left in history.csv, where it is named loss.
    """
    per_class = {
        row["class"]: {key: round(float(row[key]), 4) for key in ("precision", "recall", "f1")}
        for row in scores.per_class.to_dict("records")
    }
    return {
        "test": {
            "accuracy": round(scores.accuracy, 4),
            "crossentropy": round(scores.crossentropy, 4),
            "macro_f1": round(float(scores.per_class["f1"].mean()), 4),
        },
        "per_class": per_class,
        "best_epoch": best["epoch"],
        # Unrounded: sweeps rank candidates by these, and a rounding would tie figures that differ.
        "validation": {
            "accuracy": float(best["val_accuracy"]),
            "crossentropy": float(best["val_crossentropy"]),
            # The training objective (label-smoothed when train.label_smoothing > 0): select_best's default monitor.
            "loss": float(best["val_loss"]),
        },
    }


def cpu_description(cpuinfo: str) -> tuple[str, str]:
    """(model name, the RECORDED_CPU_FLAGS it has) from the text of /proc/cpuinfo."""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.processor() or "unknown"), " ".join(
        flag for flag in RECORDED_CPU_FLAGS if flag in flags
    )


def environment_record(numerics: NumericsParams, precision: str) -> dict:
    """What produced the metrics: CPU, cores, GPUs, numerics mode, oneDNN settings, backend and library versions."""
    import keras

    from tasks.lib.numerics import visible_gpus

    backend = keras.backend.backend()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model, flags = cpu_description(cpuinfo)
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "gpus": visible_gpus(),
        "numerics": numerics.mode,
        "precision": precision,  # what the evaluation computed in
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
        "intra_op_threads": os.environ.get("TF_NUM_INTRAOP_THREADS", "all cores"),
        "python": platform.python_version(),
        backend: version(backend),  # "tensorflow": "2.21.0", or jax's
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def confusion_summary(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Confusion counts as {actual: {predicted: count}}, a metrics file DVC can diff."""
    return {
        actual: {predicted: int(confusion[row, column]) for column, predicted in enumerate(class_names)}
        for row, actual in enumerate(class_names)
    }


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_training_curves(history: pd.DataFrame, best_epoch: int, path: Path) -> Path:
    """Cross-entropy and accuracy per epoch, train and validation, with the selected epoch marked."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("crossentropy", "accuracy"), strict=True):
        axis.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"validation {metric}")
        axis.axvline(best_epoch, color="grey", linestyle="--", label=f"selected epoch {best_epoch}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    return _save_figure(figure, path)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> Path:
    """The confusion matrix as a heat map with counts."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 7))
    axis.imshow(confusion, cmap="Blues")
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    threshold = confusion.max() / 2
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    axis.set_title("test confusion matrix")
    return _save_figure(figure, path)


def plot_samples(
    images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: Path
) -> Path:
    """The first test images with predicted (true) class names; wrong predictions in red."""
    import matplotlib.pyplot as plt

    rows, columns = SAMPLE_GRID
    height, width = images.shape[1:3]
    # One mosaic in one axes, not an axes per image: 0.14-0.20 s of CPU to draw, against 0.40-0.54 s.
    caption, gap = height * 3 // 8, width // 8  # room above each image for its two caption lines, and between
    cell_height, cell_width = height + caption, width + gap
    mosaic = np.full((rows * cell_height, columns * cell_width - gap, 3), 255, dtype=np.uint8)
    figure, axis = plt.subplots(figsize=(20, 5.5))
    for index in range(min(rows * columns, len(images))):
        top, left = (index // columns) * cell_height + caption, (index % columns) * cell_width
        mosaic[top : top + height, left : left + width] = images[index]
        axis.text(
            left + width / 2,
            top - 1,
            f"{class_names[predicted[index]]}\n({class_names[labels[index]]})",
            color="green" if predicted[index] == labels[index] else "red",
            fontsize=9,
            ha="center",
            va="bottom",
        )
    axis.imshow(mosaic)
    axis.set_axis_off()
    figure.suptitle("test images: predicted (true) class; red where wrong")
    return _save_figure(figure, path)


def run(params: Params) -> list[Path]:
    """Score the selected model on the test set; write metrics, tables and plots."""
    # Imports Keras: after run_stage has set the numerics.
    from tasks.lib.model import computes_in, predict_with_embeddings, with_embeddings

    paths = params.paths
    test = read_arrays(paths.prepared / "dataset.npz", ("x_test", "y_test"))
    class_names = read_class_names(paths.prepared / "report.json")
    best = read_json(paths.model / "best.json", required=BEST_KEYS)
    model = load_model(paths.model / "model.keras", sha256=best["sha256"])
    log.info("scoring %s (epoch %d) on %d test images", paths.model / "model.keras", best["epoch"], test["y_test"].size)
    # One pass gives the probabilities (the same bytes as the model alone) and the drift profile's embeddings.
    probabilities, embeddings = predict_with_embeddings(with_embeddings(model), test["x_test"])
    if not np.all(np.isfinite(probabilities)):
        raise DataError(f"{paths.model / 'model.keras'}: the model predicts non-finite probabilities")
    scores = score_predictions(probabilities, test["y_test"].astype(np.int64), class_names)
    predicted = probabilities.argmax(axis=1)
    names = np.asarray(class_names)
    # The test set is ordered by class: a stride shows every class in the sample grid.
    spread = slice(None, None, max(1, test["y_test"].size // (SAMPLE_GRID[0] * SAMPLE_GRID[1])))
    written = [
        write_json(paths.metrics / "metrics.json", metrics_summary(scores, best)),
        write_json(paths.metrics / "confusion.json", confusion_summary(scores.confusion, class_names)),
        # Tracked beside the metrics: a metrics change with no input change points here.
        write_json(paths.metrics / "environment.json", environment_record(params.numerics, computes_in(model))),
        write_table(paths.metrics / "per_class.csv", scores.per_class.round(4)),
        # What batches and the service compare their inputs with (tasks.lib.drift): no labels needed.
        write_json(
            paths.metrics / "reference_profile.json",
            reference_profile(test["x_test"], probabilities, embeddings, class_names),
        ),
        write_table(
            paths.metrics / "predictions.csv",
            pd.DataFrame({"actual": names[test["y_test"]], "predicted": names[predicted]}),
        ),
        plot_training_curves(
            read_table(paths.training / "history.csv"), best["epoch"], paths.plots / "training_curves.png"
        ),
        plot_confusion(scores.confusion, class_names, paths.plots / "confusion_matrix.png"),
        plot_samples(
            test["x_test"][spread],
            test["y_test"][spread],
            predicted[spread],
            class_names,
            paths.plots / "sample_predictions.png",
        ),
    ]
    log.info("test accuracy %.4f, cross-entropy %.4f", scores.accuracy, scores.crossentropy)
    return written


def main() -> None:
    """Entry point for `python -m tasks.evaluate`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on a server
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
