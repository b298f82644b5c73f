"""Select best: the checkpoint with the best validation metric becomes the model."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from tasks.lib.cli import run_stage
from tasks.lib.io import DataError, copy_verified, read_table, write_json
from tasks.lib.params import Params
from tasks.train import RESUME_HISTORY, checkpoint_name

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("val_loss", "val_accuracy", "val_crossentropy")  # copied into best.json


def rank_checkpoints(history: pd.DataFrame, *, monitor: str, mode: str) -> pd.DataFrame:
    """History rows best first by `monitor` (`mode` min or max); ties go to the earlier epoch."""
    if monitor not in history.columns:
        raise DataError(f"history has no column {monitor!r}; found {list(history.columns)}")
    if history.empty:
        raise DataError("history is empty: training completed no epoch")
    return history.sort_values([monitor, "epoch"], ascending=[mode == "min", True], kind="stable")


def run(params: Params) -> list[Path]:
    """Copy the best checkpoint to artifacts/model, verified against its training hash, and describe it in best.json."""
    history_path = params.paths.checkpoints / RESUME_HISTORY
    history = read_table(history_path)
    missing = sorted({"epoch", "sha256", *SUMMARY_COLUMNS, params.select_best.monitor} - set(history.columns))
    if missing:
        raise DataError(f"{history_path}: missing columns {missing}; found {list(history.columns)} (train writes them)")
    best = rank_checkpoints(history, monitor=params.select_best.monitor, mode=params.select_best.mode).iloc[0]
    epoch = int(best["epoch"])
    model_path = params.paths.model / "model.keras"
    sha256 = copy_verified(params.paths.checkpoints / checkpoint_name(epoch), str(best["sha256"]), model_path)
    summary = {
        "epoch": epoch,
        "monitor": params.select_best.monitor,
        "mode": params.select_best.mode,
        **{key: float(best[key]) for key in SUMMARY_COLUMNS},
        "epochs_trained": int(history["epoch"].max()),
        "sha256": sha256,
    }
    log.info("best epoch %d: %s %.4f", epoch, params.select_best.monitor, best[params.select_best.monitor])
    return [model_path, write_json(params.paths.model / "best.json", summary)]


def main() -> None:
    """Entry point for `python -m tasks.select_best`."""
    run_stage(run, __doc__)


if __name__ == "__main__":
    main()
