"""The Prefect flow: one task per DVC stage, in dvc.yaml's order, with DVC as the only judge of staleness.

Each task asks DVC whether its stage is stale and, if so, runs it with
`dvc repro --single-item`, so dvc.lock ends exactly as `dvc repro` leaves it and
`dvc status` is clean after either entry point.

    python -m flows.pipeline [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.cli import EXIT_BAD_INPUT
from tasks.ingest import fetch_source
from tasks.io import DataError
from tasks.params import ParamsError, load_params

STAGES = ("ingest", "preprocess", "split", "train", "select_best", "evaluate")


class StageFailedError(RuntimeError):
    """A stage's command exited non-zero; DVC left dvc.lock and the cached outputs as they were."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool
    reason: str  # what DVC found changed, or "up to date"


def describe_changes(status: list) -> str:
    """Turn DVC's status entries for one stage into a short 'why it reruns' line."""
    reasons = []
    for entry in status:
        if isinstance(entry, str):
            reasons.append(entry)
            continue
        for kind, changes in entry.items():
            if isinstance(changes, dict):
                detail = ", ".join(f"{name} ({state})" for name, state in sorted(changes.items()))
                reasons.append(f"{kind}: {detail}")
            else:
                reasons.append(f"{kind}: {changes}")
    return "; ".join(reasons) or "changed"


def stage_status(root: Path, stage: str) -> list:
    """DVC's status entries for one stage alone (empty when up to date)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status(targets=[stage]).get(stage, [])


def _stage_environment() -> dict[str, str]:
    # Stage commands say `python -m tasks.x`: make `python` this interpreter.
    environment = dict(os.environ)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def reproduce_stage(root: Path, stage: str) -> StageOutcome:
    """Run one stage through `dvc repro --single-item` if DVC says it is stale, streaming its output."""
    logger = get_run_logger()
    status = stage_status(root, stage)
    if not status:
        logger.info("stage %s: up to date, skipped", stage)
        return StageOutcome(stage, ran=False, reason="up to date")
    reason = describe_changes(status)
    logger.info("stage %s: running (%s)", stage, reason)
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with subprocess.Popen(
        command, cwd=root, env=_stage_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            if line.strip():
                logger.info("%s | %s", stage, line.rstrip())
    if process.returncode != 0:
        raise StageFailedError(f"stage {stage} failed (dvc repro exit {process.returncode}); see its output above")
    logger.info("stage %s: done", stage)
    return StageOutcome(stage, ran=True, reason=reason)


def _stage_task(stage: str):
    # NO_CACHE: DVC alone decides what is stale; a Prefect cache could disagree with dvc.lock.
    return task(name=stage, cache_policy=NO_CACHE, persist_result=False)(lambda root: reproduce_stage(root, stage))


PIPELINE = tuple(_stage_task(stage) for stage in STAGES)


@flow(name="cifar10-pipeline", persist_result=False)
def cifar10_pipeline(params_path: str = "params.yaml", root: str = ".") -> list[StageOutcome]:
    """Validate params, make sure the source is present, then run each stage that DVC finds stale."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / params_path)  # bad params fail the run before any work
    ensure_source(root_path, params.ingest)
    outcomes = [stage_task(root_path) for stage_task in PIPELINE]
    ran = [outcome.stage for outcome in outcomes if outcome.ran]
    logger.info("pipeline %s", f"ran {', '.join(ran)}" if ran else "up to date: no stage ran")
    return outcomes


def ensure_source(root: Path, ingest) -> None:
    """Bring the dataset source in when missing: `dvc pull` its pointer, or download its URL."""
    source = root / ingest.source
    pointer = source.with_name(source.name + ".dvc")
    if source.exists():
        return
    if pointer.exists():
        get_run_logger().info("pulling %s with DVC", pointer.relative_to(root))
        subprocess.run([sys.executable, "-m", "dvc", "pull", str(pointer)], cwd=root, check=True)
    else:
        fetch_source(ingest.model_copy(update={"source": source}))


def main() -> None:
    """Entry point for `python -m flows.pipeline`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the project root")
    arguments = parser.parse_args()
    # Exit through Python on SIGTERM so Prefect stops its temporary server instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cifar10_pipeline(params_path=arguments.params)
    except (ParamsError, DataError, StageFailedError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if not isinstance(error, StageFailedError) else 1)


if __name__ == "__main__":
    main()
