"""Select best: ranking by the monitored metric and mode."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.lib.io import DataError
from tasks.select_best import rank_checkpoints

HISTORY = pd.DataFrame(
    {"epoch": [1, 2, 3, 4], "val_loss": [1.2, 0.9, 0.9, 1.0], "val_accuracy": [0.5, 0.61, 0.64, 0.63]}
)


def test_min_mode_prefers_lowest_and_earliest_on_ties():
    assert rank_checkpoints(HISTORY, monitor="val_loss", mode="min")["epoch"].tolist() == [2, 3, 4, 1]


def test_max_mode_prefers_highest():
    assert rank_checkpoints(HISTORY, monitor="val_accuracy", mode="max").iloc[0]["epoch"] == 3


def test_unknown_monitor_and_empty_history_are_errors():
    with pytest.raises(DataError, match="no column 'val_auc'"):
        rank_checkpoints(HISTORY, monitor="val_auc", mode="max")
    with pytest.raises(DataError, match="history is empty"):
        rank_checkpoints(HISTORY.iloc[:0], monitor="val_loss", mode="min")
