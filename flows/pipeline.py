"""The Prefect flow: one task per DVC stage, in dvc.yaml's order, with DVC as the only judge of staleness.

Each task asks DVC whether its stage is stale and, if so, runs it with
`dvc repro --single-item`, so dvc.lock ends exactly as `dvc repro` leaves it and
`dvc status` is clean after either entry point.

    python -m flows.pipeline [--params params.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.cli import EXIT_BAD_INPUT
from tasks.ingest import fetch_source
from tasks.io import DataError, read_json
from tasks.params import ParamsError, flatten_params, load_params

STAGES = ("ingest", "preprocess", "split", "train", "select_best", "evaluate")


class StageFailedError(RuntimeError):
    """A stage's command exited non-zero; DVC left dvc.lock and the cached outputs as they were."""


class PipelineBusyError(RuntimeError):
    """Another flow run holds this workspace."""


@contextlib.contextmanager
def exclusive_workspace(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the workspace for one flow run; refuse at once if another holds it.

    flock is released by the kernel when the process dies, even by SIGKILL: no stale locks.
    """
    lock_path = root / ".dvc" / "tmp" / "flow.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusyError(
                f"{lock_path}: another pipeline run is in progress in {root}; try again when it has finished"
            ) from None
        yield


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool
    reason: str  # what DVC found changed, or "up to date"


def describe_changes(status: list, param_changes: list[str]) -> str:
    """Turn DVC's status entries for one stage into a short 'why it reruns' line.

    DVC reports a params section as a whole ("train: modified"); `param_changes` names the
    keys inside it, old → new.
    """
    reasons = []
    for entry in status:
        if isinstance(entry, str):
            reasons.append(entry)
            continue
        for kind, changes in entry.items():
            if not isinstance(changes, dict):
                reasons.append(f"{kind}: {changes}")
                continue
            details = []
            for path, state in sorted(changes.items()):
                if isinstance(state, dict):  # a params file
                    details += param_changes or [f"{path}: {key} {change}" for key, change in sorted(state.items())]
                else:
                    details.append(f"{path} {state}")
            reasons.append(f"{kind}: {', '.join(details)}")
    return "; ".join(reasons) or "changed"


def _param_changes(stage) -> list[str]:
    """Each params key whose value differs from the one dvc.lock recorded, as 'key: old → new'."""
    from dvc.dependency.param import ParamsDependency

    changes = []
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            recorded = flatten_params(dep.hash_info.value or {}) if dep.hash_info else {}
            current = flatten_params(dep.read_params())
            changes += [
                f"{key}: {recorded.get(key)!r} → {current.get(key)!r}"
                for key in sorted(set(recorded) | set(current))
                if recorded.get(key) != current.get(key)
            ]
    return changes


def stage_changes(root: Path, stage: str) -> str | None:
    """Why DVC finds one stage stale, or None when it is up to date."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            status = repo.status(targets=[stage]).get(stage, [])
            if not status:
                return None
            (pipeline_stage,) = repo.stage.collect(stage)
            return describe_changes(status, _param_changes(pipeline_stage))
    except DvcException as error:  # a corrupted dvc.lock, another DVC process holding the lock, ...
        raise StageFailedError(f"stage {stage}: DVC cannot tell whether it is up to date: {error}") from error


def _stage_environment() -> dict[str, str]:
    # Stage commands say `python -m tasks.x`: make `python` this interpreter, and unbuffered
    # so per-epoch progress reaches the log as it happens.
    environment = dict(os.environ)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def reproduce_stage(root: Path, stage: str) -> StageOutcome:
    """Run one stage through `dvc repro --single-item` if DVC says it is stale, streaming its output."""
    logger = get_run_logger()
    reason = stage_changes(root, stage)
    if reason is None:
        logger.info("stage %s: up to date, skipped", stage)
        return StageOutcome(stage, ran=False, reason="up to date")
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
    with exclusive_workspace(root_path):
        ensure_source(root_path, params.ingest)
        outcomes = [stage_task(root_path) for stage_task in PIPELINE]
    ran = [outcome.stage for outcome in outcomes if outcome.ran]
    logger.info("pipeline %s", f"ran {', '.join(ran)}" if ran else "up to date: no stage ran")
    publish_summary(outcomes, read_json(root_path / params.paths.metrics / "metrics.json"))
    return outcomes


RUN_ARTIFACT_KEY = "cifar10-pipeline-run"
METRICS_ARTIFACT_KEY = "cifar10-pipeline-metrics"


def summary_markdown(outcomes: list[StageOutcome], metrics: dict) -> str:
    """What reran and why, then the headline metrics, as markdown."""
    ran = [outcome.stage for outcome in outcomes if outcome.ran]
    lines = [f"# Pipeline run: {'ran ' + ', '.join(ran) if ran else 'up to date, no stage ran'}", ""]
    lines += ["| stage | outcome | why |", "| --- | --- | --- |"]
    lines += [
        f"| {outcome.stage} | {'ran' if outcome.ran else 'up to date'} | {outcome.reason if outcome.ran else ''} |"
        for outcome in outcomes
    ]
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {row['metric']} | {row['value']} |" for row in metrics_rows(metrics)]
    return "\n".join(lines)


def metrics_rows(metrics: dict) -> list[dict]:
    """The headline test and validation figures of metrics.json as table rows."""
    test = metrics.get("test", {})
    return [
        {"metric": "test accuracy", "value": test.get("accuracy")},
        {"metric": "test loss", "value": test.get("loss")},
        {"metric": "test macro F1", "value": test.get("macro_f1")},
        {"metric": "best epoch", "value": metrics.get("best_epoch")},
        {"metric": "validation accuracy", "value": metrics.get("val_accuracy")},
    ]


def publish_summary(outcomes: list[StageOutcome], metrics: dict) -> None:
    """Publish this run's summary and metrics as Prefect artifacts under stable keys."""
    create_markdown_artifact(
        markdown=summary_markdown(outcomes, metrics), key=RUN_ARTIFACT_KEY, description="what reran and why"
    )
    create_table_artifact(table=metrics_rows(metrics), key=METRICS_ARTIFACT_KEY, description="test metrics")


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
    except (ParamsError, DataError, StageFailedError, PipelineBusyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if isinstance(error, ParamsError | DataError) else 1)


if __name__ == "__main__":
    main()
