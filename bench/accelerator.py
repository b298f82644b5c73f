"""A recipe on the machine's accelerator: time to each validation accuracy, test accuracy, compute per second.

Usage: python -m bench.accelerator [--recipe long|speed] [--epochs N] [--set KEY=VALUE ...] [--target 0.94]
                                    [--max-per-class N] [--source ZIP] [--workdir DIR] [--report FILE] [--seed N]

Runs the pipeline's own stage cores in one process (ingest, preprocess, split, train, select
best, test), without DVC or Prefect, so it also runs where only Keras and one backend are
installed: the device machines carry JAX and no TensorFlow (KERAS_BACKEND=jax there). Numerics
are native, so training computes in bfloat16 on a GPU (tasks.lib.numerics.run_precision).
Epoch times come from the checkpoint files, as in bench.speed_to_accuracy; the first epoch
includes compiling the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import yaml

from bench.predict import cpu_line
from bench.timeline import seconds_to_reach, with_epoch_seconds
from tasks.lib.cli import configure_logging, filter_native_stderr
from tasks.lib.numerics import apply_numerics, run_precision
from tasks.lib.params import LONG_TRAIN, NumericsParams, Params, ParamsError, TrainParams, load_params, parse_params

NATIVE = NumericsParams(mode="native", precision="auto")


def accelerator_line() -> str:
    """The Keras backend, its version and the devices it computes on (GPUs where it has them)."""
    import keras

    backend = keras.backend.backend()
    devices = ", ".join(keras.distribution.list_devices())
    return f"keras {keras.__version__}, {backend} {version(backend)}: {devices}"


def recipe_train(params: Params, recipe: str, overrides: list[str]) -> TrainParams:
    """The recipe's train section with `KEY=VALUE` overrides (VALUE in YAML, KEY dotted for nested keys), checked."""
    # A deep copy: the overrides may reach into LONG_TRAIN's own nested mappings.
    train = copy.deepcopy({**params.train.model_dump(), **(LONG_TRAIN if recipe == "long" else {})})
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE with a train key, for example epochs=2.5")
        *parents, leaf = key.split(".")
        section = train
        for depth, part in enumerate(parents, start=1):
            if not isinstance(section.get(part), dict):
                path = ".".join(parents[:depth])
                raise ParamsError(f"--set {item!r}: train.{path} is not a mapping in this recipe; set it whole")
            section = section[part]
        try:
            section[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML: {error}") from None
    return parse_params({**params.model_dump(), "train": train}, source="bench.accelerator --set").train


def load_dataset(source: Path, *, image_size: int, max_per_class: int | None, validation_fraction: float, seed: int):
    """Ingest, preprocess and split as the stages do: (train/val arrays, test arrays, class names)."""
    from tasks.ingest import read_image_folder
    from tasks.preprocess import prepare
    from tasks.split import split_arrays

    raw = read_image_folder(source, image_size=image_size, max_per_class=max_per_class)
    arrays = {key: getattr(raw, key) for key in ("x_train", "y_train", "x_test", "y_test")}
    prepared, report = prepare(arrays, list(raw.class_names), origin=str(source))
    split = split_arrays(prepared["x_train"], prepared["y_train"], validation_fraction=validation_fraction, seed=seed)
    return split, {"x_test": prepared["x_test"], "y_test": prepared["y_test"]}, report["class_names"]


def main() -> None:
    """Train one recipe here, print its timeline and figures, and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=["long", "speed"], default="long")
    parser.add_argument("--epochs", type=float, help="override the recipe's epochs (the schedule stretches with it)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one train key of the recipe, VALUE in YAML (repeatable): --set 'widths=[48, 192, 192]'",
    )
    parser.add_argument("--target", type=float, default=0.94, help="validation accuracy to time (airbench94's)")
    parser.add_argument("--max-per-class", type=int, help="a slice of the data, for a quick check")
    parser.add_argument("--source", type=Path, help="the image-folder zip (default: params.yaml's ingest.source)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--report", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--seed", type=int, help="training's seed (default: params.yaml's; the split keeps that one)")
    arguments = parser.parse_args()
    filter_native_stderr()  # TensorFlow's start-up notices, as for the stages
    configure_logging()  # training's progress lines
    apply_numerics(NATIVE)  # before the backend is imported

    from tasks.evaluate import score_predictions
    from tasks.lib.model import predict_in_batches
    from tasks.lib.model_files import load_model
    from tasks.select_best import rank_checkpoints
    from tasks.train import checkpoint_name, compute_record, fit, images_trained

    params = load_params()
    epochs = [f"epochs={arguments.epochs}"] if arguments.epochs else []
    try:
        train = recipe_train(params, arguments.recipe, [*epochs, *arguments.set])
    except ParamsError as error:
        parser.error(str(error))  # exits 2 with the usage line, as for any bad argument
    started = time.perf_counter()
    arrays, test, class_names = load_dataset(
        arguments.source or params.ingest.source,
        image_size=params.ingest.image_size,
        max_per_class=arguments.max_per_class,
        validation_fraction=params.split.validation_fraction,
        seed=params.seed,
    )
    loading_s = time.perf_counter() - started
    precision = run_precision(NATIVE)  # as the train stage resolves it
    accelerator = accelerator_line()
    print(f"[bench] {accelerator}; {cpu_line()}; precision {precision}", file=sys.stderr, flush=True)
    print(
        f"[bench] data ready in {loading_s:.1f} s: {arrays['y_train'].size} train images", file=sys.stderr, flush=True
    )

    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = arguments.workdir or Path(scratch)
        seed = params.seed if arguments.seed is None else arguments.seed
        history = fit(
            arrays,
            train=train,
            seed=seed,
            num_classes=len(class_names),
            checkpoints=checkpoints,
            fingerprint={"bench": "accelerator", "train": train.model_dump(), "precision": precision},
            precision=precision,
        )
        history = with_epoch_seconds(history, checkpoints)
        best = rank_checkpoints(history, monitor=params.select_best.monitor, mode=params.select_best.mode).iloc[0]
        model = load_model(checkpoints / checkpoint_name(int(best["epoch"])), sha256=str(best["sha256"]))
        predicting = time.perf_counter()
        probabilities = predict_in_batches(model, test["x_test"], batch_size=500)
        predict_s = time.perf_counter() - predicting
    scores = score_predictions(probabilities, test["y_test"].astype(np.int64), class_names)
    compute = compute_record(train, arrays, len(class_names))
    training_s = float(history["seconds"].iloc[-1])
    # The first epoch compiles the step; the rest show the steady rate.
    steady_s = training_s - float(history["seconds"].iloc[0])
    steady_epochs = len(history) - 1
    trained = images_trained(train.epochs, compute["train_images"], train.batch_size)
    figures = {
        "accelerator": accelerator,
        "host": cpu_line(),
        "python": platform.python_version(),
        "recipe": arguments.recipe,
        "seed": seed,
        "overrides": arguments.set,
        "epochs": train.epochs,
        "widths": train.widths,
        "precision": precision,
        "train_images": int(arrays["y_train"].size),
        "data_loading_s": round(loading_s, 1),
        "training_s": round(training_s, 1),
        "first_epoch_s": round(float(history["seconds"].iloc[0]), 1),
        # After the first epoch; a fractional last epoch counts the images its steps trained.
        "steady_images_per_s": round((trained - compute["train_images"]) / steady_s) if steady_epochs else None,
        "images_per_s": round(trained / training_s),  # every image trained, over the whole training time
        "training_pflop": compute["training_pflop"],
        "achieved_tflop_per_s": round((compute["training_pflop"] + compute["validation_pflop"]) * 1e3 / training_s, 2),
        f"train_s_to_val_{arguments.target}": seconds_to_reach(history, arguments.target),
        "best_epoch": int(best["epoch"]),
        "best_val_accuracy": float(best["val_accuracy"]),
        "test_accuracy": round(scores.accuracy, 4),
        "test_predict_s": round(predict_s, 2),
        "timeline": [
            {"epoch": int(row.epoch), "val_accuracy": round(row.val_accuracy, 4), "seconds": round(row.seconds, 1)}
            for row in history.itertuples()
        ],
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if arguments.report:
        arguments.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
