"""When each epoch of a training run finished, read from its checkpoint files: shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.train import checkpoint_name


def with_epoch_seconds(history: pd.DataFrame, checkpoints: Path) -> pd.DataFrame:
    """`history` with a `seconds` column: each epoch's checkpoint time since training wrote its fingerprint."""
    # fit() writes fingerprint.json before the first epoch and each checkpoint as its epoch ends.
    started = (checkpoints / "fingerprint.json").stat().st_mtime
    seconds = [(checkpoints / checkpoint_name(epoch)).stat().st_mtime - started for epoch in history["epoch"]]
    return history.assign(seconds=seconds)


def seconds_to_reach(history: pd.DataFrame, accuracy: float) -> float | None:
    """Training seconds until the first epoch whose validation accuracy reaches `accuracy`."""
    reached = history[history["val_accuracy"] >= accuracy]
    return None if reached.empty else float(reached["seconds"].iloc[0])
