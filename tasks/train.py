"""Train: fit the configured model, checkpointing every epoch so a killed run resumes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.lib.cli import run_stage
from tasks.lib.io import (
    DataError,
    copy_verified,
    current_umask,
    read_arrays,
    read_json,
    read_table,
    sha256_file,
    verify_sha256,
    write_json,
    write_table,
)
from tasks.lib.model_files import save_model
from tasks.lib.numerics import keep_graph_arithmetic, run_precision
from tasks.lib.params import LookaheadParams, Params, TrainParams

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{3,})\.keras$")
# No wall-clock column: the history is a DVC dependency and must be identical on a rerun.
# loss is the training objective (label-smoothed when train.label_smoothing > 0); crossentropy
# is plain cross-entropy, the figure evaluate reports for the test set.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "crossentropy", "val_loss", "val_accuracy", "val_crossentropy")
RESUME_HISTORY = "history.csv"  # beside the checkpoints: RESUME_COLUMNS
# Each checkpoint's sha256 and its seed states' (random_state_name): both are checked on resume.
RESUME_COLUMNS = (*HISTORY_COLUMNS, "sha256", "random_sha256")


class TrainingDivergedError(DataError):
    """The loss stopped being a finite number; nothing after the last good epoch is kept."""


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after `epoch` (1-based)."""
    return f"epoch-{epoch:03d}.keras"


def random_state_name(epoch: int) -> str:
    """File name of the random layers' seed states after `epoch`, beside its checkpoint."""
    return checkpoint_name(epoch).removesuffix(".keras") + ".random.json"


def seed_states(model) -> list:
    """The seed state variables of the model's random layers (flips, shifts), in layer order."""
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def restore_seed_states(model, path: Path, sha256: str) -> None:
    """Give the random layers back the seed states saved in `path`: Keras does not restore them from a .keras file."""
    verify_sha256(path, sha256)
    saved, variables = read_json(path, required=("seed_states",))["seed_states"], seed_states(model)
    if len(saved) != len(variables):
        raise DataError(f"{path}: {len(saved)} seed states saved, the model has {len(variables)} random layers")
    for variable, state in zip(variables, saved, strict=True):
        variable.assign(np.asarray(state, dtype=variable.dtype))


def run_fingerprint(params: Params, *, data_sha256: str, code_sha256: str) -> dict:
    """What a checkpoint folder must match to be resumed: train params, seed, numerics, data and code."""
    return {
        "train": params.train.model_dump(),
        "seed": params.seed,
        "numerics": params.numerics.model_dump(),
        # auto resolves per machine: a native run resumed on a CPU without bf16 must not mix precisions.
        "precision": run_precision(params.numerics),
        "data_sha256": data_sha256,
        "code_sha256": code_sha256,
        # A run killed under one backend or library version resumes under none other.
        "software": software_versions(),
    }


def software_versions() -> dict[str, str | None]:
    """The Keras backend and the versions of the libraries that compute a training step (None: not installed)."""
    import keras

    versions: dict[str, str | None] = {"keras_backend": keras.config.backend()}
    for package in ("tensorflow", "keras", "numpy", "jax", "jaxlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def resumable_history(checkpoints: Path, fingerprint: dict) -> list[dict]:
    """History rows (with checkpoint sha256) of the epochs a rerun can resume after; [] when none.

    Anything that cannot be resumed (another fingerprint, no completed epoch) is cleared, and
    so are temporary files a killed write left behind.
    """
    if checkpoints.exists():
        for leftover in checkpoints.glob(".*.tmp*"):
            leftover.unlink()
    state = checkpoints / "fingerprint.json"
    history_path = checkpoints / RESUME_HISTORY
    if state.exists() and history_path.exists() and read_json(state) == fingerprint:
        history = read_table(history_path)
        checkpointed = {
            int(match[1]) for path in checkpoints.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))
        }
        # An epoch resumes from its checkpoint and its random layers' seed states together.
        saved = {epoch for epoch in checkpointed if (checkpoints / random_state_name(epoch)).exists()}
        completed = history[history["epoch"].isin(saved)].to_dict("records")
        if completed:
            return completed
    if checkpoints.exists():
        for path in checkpoints.iterdir():
            if path.is_file():
                path.unlink()
    return []


def training_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps in `epochs` passes: a fractional last pass stops that share of the way through."""
    # Rounded first: 0.3 * 10 is 3.0000000000000004 in floats, which is 3 steps, not 4.
    return math.ceil(round(epochs * steps_per_epoch, 9))


def images_trained(epochs: float, train_images: int, batch_size: int) -> int:
    """Images the training passes see: every whole pass, then the full batches of a fractional last one."""
    steps_per_epoch = math.ceil(train_images / batch_size)
    runs = epoch_runs(training_steps(epochs, steps_per_epoch), steps_per_epoch, start_epoch=0)
    return sum((last - first) * train_images if steps is None else steps * batch_size for first, last, steps in runs)


def compile_model(model, train: TrainParams, *, steps_per_epoch: int) -> None:
    """Compile with the configured optimizer, learning-rate schedule, loss and accuracy."""
    import keras

    learning_rate = train.learning_rate
    if train.warmup_fraction is not None:
        total_steps = training_steps(train.epochs, steps_per_epoch)
        warmup_steps = int(total_steps * train.warmup_fraction)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, max(total_steps - warmup_steps, 1), warmup_target=train.learning_rate, warmup_steps=warmup_steps
        )
    options = {"learning_rate": learning_rate, "weight_decay": train.weight_decay or None}
    if train.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=train.momentum, nesterov=train.momentum > 0, **options)
    elif train.optimizer == "muon":
        from tasks.lib.optimizers import Muon

        optimizer = Muon(
            momentum=train.momentum,
            # The kernels' rate follows the same warm-up and decay, scaled to peak at muon.learning_rate.
            kernel_learning_rate_scale=train.muon.learning_rate / train.learning_rate,
            kernel_momentum=train.muon.momentum,
            **options,
        )
    else:
        optimizer = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}[train.optimizer](**options)
    # Label smoothing needs one-hot targets; without it the tutorial's sparse loss is kept as it was.
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
        if train.label_smoothing
        else "sparse_categorical_crossentropy"
    )
    # Plain cross-entropy beside the objective: comparable with evaluate's test cross-entropy.
    crossentropy = (
        keras.metrics.CategoricalCrossentropy(name="crossentropy")
        if train.label_smoothing
        else keras.metrics.SparseCategoricalCrossentropy(name="crossentropy")
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy", crossentropy])


def training_targets(labels: np.ndarray, train: TrainParams, num_classes: int) -> np.ndarray:
    """Labels as the compiled loss wants them: one-hot for label smoothing, else as given."""
    if train.label_smoothing:
        return np.eye(num_classes, dtype=np.float32)[labels]
    return labels


def model_options(train: TrainParams) -> dict:
    """The architecture options a recipe passes to build_model (none for the tutorial's CNN)."""
    from tasks.lib.model import SPEED_CNN_WIDTHS

    if train.model == "tutorial_cnn":
        return {}
    return {
        "widths": tuple(train.widths or SPEED_CNN_WIDTHS),
        "flip": train.augment.flip,
        "translate": train.augment.translate,
        "test_time_flip": train.test_time_flip,
        "test_time_translate": train.test_time_translate,
    }


def _epoch_checkpointer(checkpoints: Path, history: list[dict]):
    """A Keras callback that saves each finite epoch atomically and refuses a NaN loss."""
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            row = {"epoch": epoch + 1, **{key: float(logs[key]) for key in HISTORY_COLUMNS[1:] if key in logs}}
            if not all(math.isfinite(value) for value in row.values()):
                self.model.stop_training = True
                raise TrainingDivergedError(
                    f"epoch {epoch + 1}: loss is not finite ({row}); lower train.learning_rate. "
                    f"Checkpoints up to epoch {epoch} are kept in {checkpoints}"
                )
            # The checkpoint's hash goes in the resume state so a tampered file is refused on resume.
            row["sha256"] = save_model(checkpoints / checkpoint_name(epoch + 1), self.model)
            # The augmentation's place in its random streams, so a resumed run draws what this one would.
            states = [state.numpy().tolist() for state in seed_states(self.model)]
            written = write_json(checkpoints / random_state_name(epoch + 1), {"seed_states": states})
            row["random_sha256"] = sha256_file(written)
            history.append(row)
            # The history is written after the checkpoint: a row always has its checkpoint.
            write_table(checkpoints / RESUME_HISTORY, pd.DataFrame(history, columns=RESUME_COLUMNS))

    return EpochCheckpoint()


# A progress line at least this often inside an epoch: a default epoch takes about 3 minutes on
# the pool's slowest CPU, and Keras prints nothing until it ends.
PROGRESS_EVERY_S = 20.0


def _progress_logger(*, epochs: float, steps_per_epoch: int, total_steps: int, batch_size: int):
    """A Keras callback that logs the epoch, step, images/s, and the time left in the epoch and the run."""
    import keras

    class ProgressLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.started = epoch, time.monotonic()
            self.last = self.started

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if now - self.last < PROGRESS_EVERY_S:
                return
            self.last, steps = now, batch + 1
            seconds_per_step = (now - self.started) / steps
            in_epoch = min(steps_per_epoch, total_steps - self.epoch * steps_per_epoch)
            left_in_run = total_steps - self.epoch * steps_per_epoch - steps
            log.info(
                "epoch %d/%g, step %d/%d: %.0f images/s; epoch %s elapsed, %s left; about %s left in the run",
                self.epoch + 1,
                epochs,
                steps,
                in_epoch,
                batch_size / seconds_per_step,
                minutes(now - self.started),
                minutes((in_epoch - steps) * seconds_per_step),
                minutes(left_in_run * seconds_per_step),
            )

    return ProgressLog()


def minutes(seconds: float) -> str:
    """A duration as m:ss."""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def lookahead_decay(step: int, total_steps: int, lookahead: LookaheadParams) -> float:
    """The share of the average an update at `step` keeps: near 0 early, rising to decay**every_steps at the end."""
    return lookahead.decay**lookahead.every_steps * (step / total_steps) ** 3


def first_lookahead_step(total_steps: int, lookahead: LookaheadParams) -> int:
    """The step the average starts at (as the weights): the first multiple of every_steps from start_fraction on."""
    return math.ceil(lookahead.start_fraction * total_steps / lookahead.every_steps) * lookahead.every_steps


def _lookahead_averager(lookahead: LookaheadParams, *, total_steps: int, steps_per_epoch: int, start_epoch: int):
    """A Keras callback that applies airbench's lookahead to every float variable (weights and BatchNorm statistics)."""
    import keras

    start_step = first_lookahead_step(total_steps, lookahead)

    class Lookahead(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.variables = [v for v in self.model.weights if keras.backend.is_float_dtype(v.dtype)]
            self.averages = None
            # The weights equal the average at every epoch end (below), so a run resumed from a
            # checkpoint takes the checkpoint's weights as the average: nothing else to save.
            if start_step <= start_epoch * steps_per_epoch:
                self.averages = [v.numpy() for v in self.variables]

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step % lookahead.every_steps == 0 and step >= start_step:
                if self.averages is None:
                    self.averages = [v.numpy() for v in self.variables]
                    return
                keep = lookahead_decay(step, total_steps, lookahead)
                for average, variable in zip(self.averages, self.variables, strict=True):
                    average += (1 - keep) * (variable.numpy() - average)
            elif self.averages is None or (step % steps_per_epoch and step != total_steps):
                return
            # Copied back every update, and at each epoch end (a fractional last one ends at total_steps),
            # so validation and checkpoints see the average.
            for average, variable in zip(self.averages, self.variables, strict=True):
                variable.assign(average)

    return Lookahead()


def epoch_runs(total_steps: int, steps_per_epoch: int, start_epoch: int) -> list[tuple[int, int, int | None]]:
    """(initial_epoch, epochs, steps_per_epoch) of each Keras fit: the whole epochs, then a fractional last one."""
    whole = total_steps // steps_per_epoch
    runs = [
        (start_epoch, whole, None),
        # Its own fit, that many steps long, so Keras' progress line counts the steps it runs.
        (max(start_epoch, whole), math.ceil(total_steps / steps_per_epoch), total_steps - whole * steps_per_epoch),
    ]
    return [run for run in runs if run[0] < run[1]]


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The training images' order in `epoch` (from 1), drawn from (seed, epoch) alone: a resumed run draws it too."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def batched(images: np.ndarray, targets: np.ndarray, *, batch_size: int, orders: list[np.ndarray]):
    """A tf.data pipeline of (images, targets) batches that takes the rows in each of `orders` in turn.

    Built here rather than by Keras from the arrays: Keras' pipeline autotunes, and deleting
    its iterator at an epoch's end waits, idle, up to 2.5 s for the tuning thread (docs/speed.md).
    """
    import tensorflow as tf

    rows = tf.data.Dataset.from_tensor_slices(orders[0]).batch(batch_size)
    for order in orders[1:]:
        rows = rows.concatenate(tf.data.Dataset.from_tensor_slices(order).batch(batch_size))
    # As Keras does: the arrays enter once, zipped beside every batch of rows, and are gathered from.
    whole = tf.data.Dataset.from_tensors((images, targets)).repeat()

    # Plain graph code, as Keras' own steps: AutoGraph would rewrite it into a file it writes to /tmp.
    @tf.autograph.experimental.do_not_convert
    def gather(batch, data):
        return tuple(tf.gather(array, batch) for array in data)

    dataset = tf.data.Dataset.zip(rows, whole).map(gather)
    options = tf.data.Options()
    options.autotune.enabled = False
    # No static rewrites either (as Keras): they would serialise the arrays into a graph.
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.prefetch(2).with_options(options)


def numpy_batches(images: np.ndarray, targets: np.ndarray, *, batch_size: int, orders: list[np.ndarray]):
    """The batches `batched` gives, as numpy arrays from a generator: for backends without tf.data."""
    for order in orders:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield images[rows], targets[rows]


def fit_inputs(
    arrays: dict, targets: dict, *, batch_size: int, seed: int, epochs: range, backend: str | None = None
) -> dict:
    """model.fit's data arguments for `epochs` (from 1), each epoch's images in `epoch_order`.

    On TensorFlow, `batched` pipelines; other backends (JAX on the device machines) have no
    tf.data and get the same batches from `numpy_batches`.
    """
    import keras

    orders = [epoch_order(seed, epoch, len(targets["train"])) for epoch in epochs]
    if (backend or keras.backend.backend()) != "tensorflow":
        # Not the arrays with shuffle=True: Keras would draw the order from numpy's global state,
        # which a resumed run cannot put back.
        return {
            "x": numpy_batches(arrays["x_train"], targets["train"], batch_size=batch_size, orders=orders),
            "shuffle": False,
            "validation_data": (arrays["x_val"], targets["val"]),
            "validation_batch_size": batch_size,
        }
    return {
        "x": batched(arrays["x_train"], targets["train"], batch_size=batch_size, orders=orders),
        "shuffle": False,  # the orders above are the shuffle
        "validation_data": batched(
            arrays["x_val"], targets["val"], batch_size=batch_size, orders=[np.arange(len(targets["val"]))]
        ),
    }


def set_up_backend(precision: str, seed: int) -> None:
    """Make Keras build layers computing in `precision`, seeded, with graphs that run the same on every CPU."""
    import keras

    # Layers built from now on compute in `precision` (weights stay float32); a saved model keeps
    # each layer's policy, so evaluate and predict compute as training did.
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    keras.utils.set_random_seed(seed)
    keep_graph_arithmetic()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def fit(
    arrays: dict[str, np.ndarray],
    *,
    train: TrainParams,
    seed: int,
    num_classes: int,
    checkpoints: Path,
    fingerprint: dict,
    precision: str = "float32",
) -> pd.DataFrame:
    """Fit from scratch or from the last completed epoch in `checkpoints`; return the history with sha256s."""
    from tasks.lib.model import build_model, initialize_from_data
    from tasks.lib.model_files import load_model

    set_up_backend(precision, seed)
    checkpoints.mkdir(parents=True, exist_ok=True)
    history = resumable_history(checkpoints, fingerprint)
    start_epoch = int(history[-1]["epoch"]) if history else 0
    steps_per_epoch = math.ceil(arrays["y_train"].size / train.batch_size)
    if start_epoch:
        log.info(
            "resuming from %s (epoch %d of %g)", checkpoints / checkpoint_name(start_epoch), start_epoch, train.epochs
        )
        model = load_model(checkpoints / checkpoint_name(start_epoch), sha256=str(history[-1]["sha256"]))
        restore_seed_states(model, checkpoints / random_state_name(start_epoch), str(history[-1]["random_sha256"]))
    else:
        write_json(checkpoints / "fingerprint.json", fingerprint)
        model = build_model(train.model, arrays["x_train"].shape[1:], num_classes, **model_options(train))
        initialize_from_data(train.model, model, arrays["x_train"], seed)
        compile_model(model, train, steps_per_epoch=steps_per_epoch)
    total_steps = training_steps(train.epochs, steps_per_epoch)
    targets = {part: training_targets(arrays[f"y_{part}"], train, num_classes) for part in ("train", "val")}
    for first, last, steps in epoch_runs(total_steps, steps_per_epoch, start_epoch):
        progress = {"epochs": train.epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        callbacks = [
            _progress_logger(**progress, batch_size=train.batch_size),
            _epoch_checkpointer(checkpoints, history),
        ]
        if train.lookahead:
            # Started afresh for a fractional last epoch, it takes the weights as its average, as on resume.
            callbacks.append(
                _lookahead_averager(
                    train.lookahead, total_steps=total_steps, steps_per_epoch=steps_per_epoch, start_epoch=first
                )
            )
        model.fit(
            **fit_inputs(arrays, targets, batch_size=train.batch_size, seed=seed, epochs=range(first + 1, last + 1)),
            epochs=last,
            initial_epoch=first,
            steps_per_epoch=steps or steps_per_epoch,
            callbacks=callbacks,
            verbose=2,
        )
    frame = pd.DataFrame(history, columns=[*HISTORY_COLUMNS, "sha256"])
    # A fractional last epoch counts as one: it is validated and checkpointed like the others.
    return frame[frame["epoch"] <= math.ceil(train.epochs)]


def compute_record(train: TrainParams, arrays: dict[str, np.ndarray], num_classes: int) -> dict:
    """The run's compute counted from its model: FLOPs per image, PFLOP of training and validation."""
    from tasks.lib.flops import forward_flops, run_compute
    from tasks.lib.model import build_model, test_time_view_weights

    model = build_model(train.model, arrays["x_train"].shape[1:], num_classes, **model_options(train))
    train_images = int(arrays["y_train"].size)
    return run_compute(
        forward_flops(model),
        train_images=train_images,
        epochs=train.epochs,
        trained_images=images_trained(train.epochs, train_images, train.batch_size),
        validated_images=math.ceil(train.epochs) * int(arrays["y_val"].size),
        copies=len(test_time_view_weights(train.test_time_flip, train.test_time_translate)),
    )


def training_code_files() -> list[Path]:
    """The source of every module training runs: the train stage's code deps in dvc.yaml."""
    from tasks.lib import cli, flops, imports, io, model, model_files, numerics, optimizers
    from tasks.lib import params as params_module

    modules = (cli, flops, imports, io, model, model_files, numerics, optimizers, params_module)
    return sorted([Path(__file__), *(Path(module.__file__) for module in modules)])


def code_fingerprint() -> str:
    """sha256 over the source of every module training runs: a resume from other code is refused."""
    digest = hashlib.sha256()
    for module_file in training_code_files():
        digest.update(module_file.read_bytes())
    return digest.hexdigest()


def publish_checkpoints(resume: Path, history: pd.DataFrame, destination: Path) -> Path:
    """Copy the run's checkpoints and history (with sha256s) into the stage's output folder, whole or not at all."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
    try:
        for row in history.itertuples():
            name = checkpoint_name(int(row.epoch))
            copy_verified(resume / name, row.sha256, staging / name)
        write_table(staging / RESUME_HISTORY, history)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the usual mode
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def run(params: Params) -> list[Path]:
    """Train on data/split and write checkpoints plus the per-epoch history."""
    source = params.paths.split / "train_val.npz"
    arrays = read_arrays(source, ("x_train", "y_train", "x_val", "y_val"))
    report = read_json(params.paths.prepared / "report.json", required=("num_classes",))
    num_classes = int(report["num_classes"])
    if arrays["y_train"].size == 0 or arrays["y_val"].size == 0:
        raise DataError(f"{source}: train and validation sets must both hold images")
    fingerprint = run_fingerprint(params, data_sha256=sha256_file(source), code_sha256=code_fingerprint())
    log.info(
        "training %s on %d images (%d validation) for %g epochs, batch size %d, %s",
        params.train.model,
        arrays["y_train"].size,
        arrays["y_val"].size,
        params.train.epochs,
        params.train.batch_size,
        fingerprint["precision"],
    )
    history = fit(
        arrays,
        train=params.train,
        seed=params.seed,
        num_classes=num_classes,
        checkpoints=params.paths.resume,
        fingerprint=fingerprint,
        precision=fingerprint["precision"],
    )
    return [
        publish_checkpoints(params.paths.resume, history, params.paths.checkpoints),
        write_table(params.paths.training / "history.csv", history.drop(columns="sha256")),
        write_json(params.paths.training / "compute.json", compute_record(params.train, arrays, num_classes)),
    ]


def main() -> None:
    """Entry point for `python -m tasks.train`."""
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
