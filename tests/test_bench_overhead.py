"""bench.overhead: the flow's log read into stage spans, and parts that add up to the wall time."""

from __future__ import annotations

import pytest

from bench.overhead import breakdown, stage_spans
from flows.pipeline import STAGES


def flow_log(starts: dict[str, str], ends: dict[str, str]) -> str:
    """Console lines as the flow logs them (Prefect's format), with other lines between."""
    lines = ["23:59:58.100 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8033"]
    for stage in STAGES:
        task = f"Task run '{stage}-cc6'"
        lines.append(f"{starts[stage]} | INFO    | {task} - stage {stage}: running (changed outs: data not in cache)")
        lines.append(f"{starts[stage]} | INFO    | {task} - {stage} | > python -m tasks.{stage}")
        lines.append(f"{ends[stage]} | INFO    | {task} - stage {stage}: done in 0:01")
    return "\n".join(lines) + "\n"


# When each stage started and ended, from 23:59:59 on: the run crosses midnight.
STARTS = ["23:59:59.000", "00:00:10.000", "00:00:15.500", "00:00:18.000", "00:05:30.000", "00:05:32.000"]
ENDS = ["00:00:09.000", "00:00:15.000", "00:00:17.000", "00:05:20.000", "00:05:31.000", "00:05:50.000"]
STARTS, ENDS = dict(zip(STAGES, STARTS, strict=True)), dict(zip(STAGES, ENDS, strict=True))


def test_stage_spans_are_seconds_after_the_launch_across_midnight():
    launched = 23 * 3600 + 59 * 60 + 50.0  # 23:59:50
    spans = stage_spans(flow_log(STARTS, ENDS), launched)
    assert spans["ingest"] == pytest.approx((9.0, 19.0))
    assert spans["train"] == pytest.approx((28.0, 330.0))
    assert spans["evaluate"] == pytest.approx((342.0, 360.0))


def test_a_log_without_every_stage_is_refused():
    log = "\n".join(line for line in flow_log(STARTS, ENDS).splitlines() if "stage evaluate: done" not in line)
    with pytest.raises(ValueError, match="no start and end for evaluate"):
        stage_spans(log, 0.0)


def test_the_parts_add_up_to_the_wall_time_and_not_training_is_the_rest():
    spans = stage_spans(flow_log(STARTS, ENDS), 23 * 3600 + 59 * 60 + 50.0)
    rows = dict(breakdown(setup_s=30.0, run_s=372.0, spans=spans, epochs_s=290.0))
    total, not_training = rows.pop("**total**"), rows.pop("**not training** (total - epochs)")
    assert sum(rows.values()) == pytest.approx(total) == pytest.approx(402.0)
    assert not_training == pytest.approx(402.0 - 290.0)
    assert rows["train: the rest (imports, data, model, DVC)"] == pytest.approx(302.0 - 290.0)
    assert rows["between stages (DVC's status checks)"] == pytest.approx(1.0 + 0.5 + 1.0 + 10.0 + 1.0)
