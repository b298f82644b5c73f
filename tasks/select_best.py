"""Select best: the checkpoint with the best validation metric becomes the model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from tasks.cli import run_stage
from tasks.io import DataError, atomic_path, read_table, sha256_file, write_json
from tasks.params import Params
from tasks.train import checkpoint_name

log = logging.getLogger(__name__)


def rank_checkpoints(history: pd.DataFrame, *, monitor: str, mode: str) -> pd.DataFrame:
    """History rows best first by `monitor` (`mode` min or max); ties go to the earlier epoch."""
    if monitor not in history.columns:
        raise DataError(f"history has no column {monitor!r}; found {list(history.columns)}")
    if history.empty:
        raise DataError("history is empty: training completed no epoch")
    return history.sort_values([monitor, "epoch"], ascending=[mode == "min", True], kind="stable")


def run(params: Params) -> list[Path]:
    """Copy the best checkpoint to artifacts/model and describe it in best.json."""
    history_path = params.paths.training / "history.csv"
    history = read_table(history_path)
    best = rank_checkpoints(history, monitor=params.select_best.monitor, mode=params.select_best.mode).iloc[0]
    epoch = int(best["epoch"])
    checkpoint = params.paths.checkpoints / checkpoint_name(epoch)
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: checkpoint of best epoch {epoch} (per {history_path}) is missing")
    model_path = params.paths.model / "model.keras"
    with atomic_path(model_path, suffix=".keras") as temporary:
        shutil.copyfile(checkpoint, temporary)
    summary = {
        "epoch": epoch,
        "monitor": params.select_best.monitor,
        "mode": params.select_best.mode,
        "val_loss": float(best["val_loss"]),
        "val_accuracy": float(best["val_accuracy"]),
        "epochs_trained": int(history["epoch"].max()),
        "sha256": sha256_file(model_path),
    }
    log.info("best epoch %d: %s %.4f", epoch, params.select_best.monitor, best[params.select_best.monitor])
    return [model_path, write_json(params.paths.model / "best.json", summary)]


def main() -> None:
    """Entry point for `python -m tasks.select_best`."""
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
