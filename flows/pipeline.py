"""The Prefect flow: one task per DVC stage, in dvc.yaml's order, with DVC as the only judge of staleness.

Each task asks DVC whether its stage is stale and, if so, runs it with
`dvc repro --single-item`, so dvc.lock ends exactly as `dvc repro` leaves it and
`dvc status` is clean after either entry point. Params come from params.yaml, the file
dvc.yaml's stages read: there is no other params file to pass.

    python -m flows.pipeline

Exit status: 0 done; 2 bad input (params or data; the stage's message says which);
75 busy (another run or DVC process holds the workspace: try again later); 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment

from flows import stage_command_environment
from flows.liveness import process_tag
from flows.streams import survive_a_dead_reader
from tasks.ingest import RESTORE_HINT, fetch_source, source_pointer
from tasks.lib.cli import EXIT_BAD_INPUT, EXIT_BUSY
from tasks.lib.io import DataError, WorkspaceBusyError, read_json
from tasks.lib.params import DEFAULT_PARAMS_PATH, ParamsError, flatten_params, load_params
from tasks.lib.workspace import LOCK_FD_VARIABLE, exclusive_workspace
from tasks.train import minutes

STAGES = ("ingest", "preprocess", "split", "train", "select_best", "evaluate")

# A DVC lock held by someone else (a user's `dvc status` at 02:00) goes away by itself:
# retry the stage after these pauses (CIFAR10_DVC_BUSY_RETRY_DELAYS_S="2,5,10" sets others),
# then exit 75. A stage's own failure is never retried.
DEFAULT_DVC_BUSY_RETRY_DELAYS_S = (2, 5, 10, 20, 40, 60)


def dvc_busy_retry_delays(setting: str | None) -> tuple[float, ...]:
    """The pauses between a busy stage's tries: the setting's comma-separated seconds, or the defaults."""
    if not setting:
        return DEFAULT_DVC_BUSY_RETRY_DELAYS_S
    try:
        delays = tuple(float(part) for part in setting.split(","))
    except ValueError:
        delays = ()
    if not delays or min(delays) < 0:
        raise ParamsError(f"CIFAR10_DVC_BUSY_RETRY_DELAYS_S={setting!r}: expected seconds such as 2,5,10")
    return delays


DVC_BUSY_RETRY_DELAYS_S = dvc_busy_retry_delays(os.environ.get("CIFAR10_DVC_BUSY_RETRY_DELAYS_S"))


class StageFailedError(RuntimeError):
    """A stage's command exited non-zero; DVC left dvc.lock and the cached outputs as they were."""


class StageBadInputError(StageFailedError):
    """A stage refused its input (exit 2): the params or data need fixing, not a rerun."""


class PipelineBusyError(WorkspaceBusyError):
    """Another DVC process holds this workspace's repository lock."""


# How DVC reports a stage command's exit status, e.g. "failed to run: python -m tasks.train, exited with 2".
_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")
_DVC_LOCKED = "Unable to acquire lock"


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool
    reason: str  # what DVC found changed, or "up to date"
    seconds: float = 0.0  # how long its `dvc repro --single-item` took


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
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            status = repo.status(targets=[stage]).get(stage, [])
            if not status:
                return None
            (pipeline_stage,) = repo.stage.collect(stage)
            return describe_changes(status, _param_changes(pipeline_stage))
    except LockError as error:
        raise PipelineBusyError(f"stage {stage}: another DVC process holds {root / '.dvc' / 'tmp'}: {error}") from error
    except DvcException as error:  # a corrupted dvc.lock, ...
        raise StageFailedError(f"stage {stage}: DVC cannot tell whether it is up to date: {error}") from error


def reproduce_stage(root: Path, stage: str) -> StageOutcome:
    """Run one stage through `dvc repro --single-item` if DVC says it is stale, streaming its output."""
    logger = get_run_logger()
    reason = stage_changes(root, stage)
    if reason is None:
        logger.info("stage %s: up to date, skipped", stage)
        return StageOutcome(stage, ran=False, reason="up to date")
    logger.info("stage %s: running (%s)", stage, reason)
    started = time.monotonic()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    output = []
    with subprocess.Popen(
        command, cwd=root, env=stage_command_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            if line.strip():
                output.append(line.rstrip())
                logger.info("%s | %s", stage, line.rstrip())
    if process.returncode != 0:
        raise stage_failure(stage, process.returncode, output)
    seconds = time.monotonic() - started
    logger.info("stage %s: done in %s", stage, minutes(seconds))
    return StageOutcome(stage, ran=True, reason=reason, seconds=seconds)


def stage_failure(stage: str, dvc_status: int, output: list[str]) -> Exception:
    """The error for a failed `dvc repro --single-item`: busy, bad input (the stage exited 2) or a failure."""
    if any(_DVC_LOCKED in line for line in output):
        return PipelineBusyError(f"stage {stage}: another DVC process holds the repository lock; try again later")
    exits = [int(match[1]) for line in output if (match := _STAGE_EXIT.search(line))]
    # The stage's own one-line error ("error: ..."), which names the file or key.
    message = next((line for line in reversed(output) if line.startswith("error: ")), "see its output above")
    if exits and exits[-1] == EXIT_BAD_INPUT:
        return StageBadInputError(f"stage {stage} refused its input: {message.removeprefix('error: ')}")
    status = f"exited {exits[-1]}" if exits else f"dvc repro exited {dvc_status}"
    return StageFailedError(f"stage {stage} failed ({status}): {message.removeprefix('error: ')}")


def retry_when_busy(task, task_run, state) -> bool:
    """Prefect retry condition: retry only a stage that found the workspace locked by another DVC process."""
    return isinstance(state.result(raise_on_failure=False), PipelineBusyError)


def _stage_task(stage: str):
    # NO_CACHE: DVC alone decides what is stale; a Prefect cache could disagree with dvc.lock.
    return task(
        name=stage,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=len(DVC_BUSY_RETRY_DELAYS_S),
        retry_delay_seconds=list(DVC_BUSY_RETRY_DELAYS_S),
        retry_condition_fn=retry_when_busy,
    )(lambda root: reproduce_stage(root, stage))


PIPELINE = tuple(_stage_task(stage) for stage in STAGES)


@task(name="promote", cache_policy=NO_CACHE, persist_result=False)
def promote_challenger(root: Path, lock_fd: int) -> dict:
    """Run the promotion gate (`python -m tasks.promote`) on the evaluated workspace; publish its decision."""
    logger = get_run_logger()
    result = subprocess.run(
        [sys.executable, "-m", "tasks.promote"],
        cwd=root,
        # The gate runs under this run's workspace lock, shared with it: no other run can land between.
        env=stage_command_environment() | {LOCK_FD_VARIABLE: str(lock_fd)},
        pass_fds=(lock_fd,),
        capture_output=True,
        text=True,
    )
    for line in result.stderr.splitlines():
        logger.info("promote | %s", line)
    if result.returncode != 0:
        message = result.stderr[result.stderr.rfind("error: ") :].removeprefix("error: ").strip()
        error_type = StageBadInputError if result.returncode == EXIT_BAD_INPUT else StageFailedError
        raise error_type(f"promote failed (exited {result.returncode}): {message or 'see its output above'}")
    decision = read_json(root / load_params(root / DEFAULT_PARAMS_PATH).paths.promotion / "decision.json")
    where = f" Registered as `{decision['version']}` on branch `{decision['branch']}`." if decision["branch"] else ""
    create_markdown_artifact(
        key=PROMOTION_ARTIFACT_KEY,
        markdown=f"# Promotion: {decision['decision']}\n\n{decision['reason']}.{where}\n",
        description="the champion/challenger gate's decision",
    )
    return decision


@flow(name="cifar10-pipeline", persist_result=False)
def cifar10_pipeline(root: str = ".", promote: bool = False) -> list[StageOutcome]:
    """Validate params.yaml, make sure the source is present, run each stale stage, then the gate if `promote`."""
    logger = get_run_logger()
    if deployment.id:  # a served run: its output must not die with the scheduler
        survive_a_dead_reader()
    record_run_process()
    root_path = Path(root).resolve()
    params = load_params(root_path / DEFAULT_PARAMS_PATH)  # bad params fail the run before any work
    outcomes: list[StageOutcome] = []
    try:
        with exclusive_workspace(root_path) as lock_fd:
            ensure_source(root_path, params.ingest)
            for stage_task in PIPELINE:
                outcomes.append(stage_task(root_path))
            if promote:
                promote_challenger(root_path, lock_fd)
    except Exception as error:
        # A failed run still says what it did and where it stopped, in the same artifact.
        publish_failure(outcomes, error)
        raise
    metrics = read_json(root_path / params.paths.metrics / "metrics.json")
    logger.info("%s", run_summary(outcomes, metrics, params.paths))
    publish_summary(outcomes, metrics)
    return outcomes


def record_run_process() -> None:
    """Store this process on the flow run, so a restarted scheduler can tell a dead run from a live one."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=process_tag())


RUN_ARTIFACT_KEY = "cifar10-pipeline-run"
METRICS_ARTIFACT_KEY = "cifar10-pipeline-metrics"
PROMOTION_ARTIFACT_KEY = "cifar10-promotion"


def _stage_rows(outcomes: list[StageOutcome]) -> list[str]:
    lines = ["| stage | outcome | why |", "| --- | --- | --- |"]
    lines += [
        f"| {outcome.stage} | {'ran' if outcome.ran else 'up to date'} | {outcome.reason if outcome.ran else ''} |"
        for outcome in outcomes
    ]
    return lines


def summary_markdown(outcomes: list[StageOutcome], metrics: dict) -> str:
    """What reran and why, then the headline metrics, as markdown."""
    ran = [outcome.stage for outcome in outcomes if outcome.ran]
    lines = [f"# Pipeline run: {'ran ' + ', '.join(ran) if ran else 'up to date, no stage ran'}", ""]
    lines += [*_stage_rows(outcomes), "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {row['metric']} | {row['value']} |" for row in metrics_rows(metrics)]
    return "\n".join(lines)


def failure_markdown(outcomes: list[StageOutcome], error: Exception) -> str:
    """What ran before the failure, which stage failed and the error, as markdown."""
    failed = STAGES[len(outcomes)] if len(outcomes) < len(STAGES) else "the end of the run"
    lines = [f"# Pipeline run: failed at {failed}", "", f"**{type(error).__name__}**: {error}", ""]
    lines += _stage_rows(outcomes)
    lines += [f"| {stage} | not run | |" for stage in STAGES[len(outcomes) :]]
    return "\n".join(lines)


def metrics_rows(metrics: dict) -> list[dict]:
    """The headline test and validation figures of metrics.json as table rows."""
    test, validation = metrics.get("test", {}), metrics.get("validation", {})
    return [
        {"metric": "test accuracy", "value": test.get("accuracy")},
        {"metric": "test cross-entropy", "value": test.get("crossentropy")},
        {"metric": "test macro F1", "value": test.get("macro_f1")},
        {"metric": "best epoch", "value": metrics.get("best_epoch")},
        {"metric": "validation accuracy", "value": validation.get("accuracy")},
        {"metric": "validation cross-entropy", "value": validation.get("crossentropy")},
    ]


def run_summary(outcomes: list[StageOutcome], metrics: dict, paths) -> str:
    """What a person reads at the end of a run: the test accuracy, what ran and how long, where the results are."""
    ran = ", ".join(f"{item.stage} {minutes(item.seconds)}" for item in outcomes if item.ran)
    skipped = ", ".join(item.stage for item in outcomes if not item.ran)
    test = metrics["test"]
    return "\n".join(
        [
            f"pipeline done: test accuracy {test['accuracy']:.4f} (cross-entropy {test['crossentropy']:.4f})",
            f"  ran: {ran}" + (f"; up to date: {skipped}" if skipped else "") if ran else "  up to date: no stage ran",
            f"  metrics: {paths.metrics}/metrics.json (dvc metrics show); plots: {paths.plots}/ (dvc plots show)",
        ]
    )


def publish_summary(outcomes: list[StageOutcome], metrics: dict) -> None:
    """Publish this run's summary and metrics as Prefect artifacts under stable keys."""
    create_markdown_artifact(
        markdown=summary_markdown(outcomes, metrics), key=RUN_ARTIFACT_KEY, description="what reran and why"
    )
    create_table_artifact(table=metrics_rows(metrics), key=METRICS_ARTIFACT_KEY, description="test metrics")


def publish_failure(outcomes: list[StageOutcome], error: Exception) -> None:
    """Publish a failed run's summary under the run artifact's key (the metrics table stays the last good one)."""
    create_markdown_artifact(
        markdown=failure_markdown(outcomes, error), key=RUN_ARTIFACT_KEY, description="failed: where and why"
    )


def ensure_source(root: Path, ingest) -> None:
    """Bring the dataset source in when missing (`dvc pull` its pointer, or download its URL); refuse a modified one."""
    source = root / ingest.source
    pointer = source_pointer(source)
    if source.exists():
        if pointer is not None:
            refuse_modified_source(root, pointer)
        return
    if pointer is not None:
        get_run_logger().info("pulling %s with DVC", pointer.relative_to(root))
        pulled = subprocess.run(
            [sys.executable, "-m", "dvc", "pull", str(pointer)], cwd=root, capture_output=True, text=True
        )
        if pulled.returncode != 0 or not source.exists():
            raise DataError(f"{pointer}: `dvc pull` could not bring {ingest.source} in: {pulled.stderr.strip()}")
    else:
        fetch_source(ingest.model_copy(update={"source": source}))


def refuse_modified_source(root: Path, pointer: Path) -> None:
    """Stop before any stage when a DVC-tracked source differs from its pointer.

    `dvc repro` would first re-point the .dvc file at the modified bytes ("verifying data
    sources"); the flow runs stages one by one (--single-item), so it can refuse before that.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (stage,) = repo.stage.collect(str(pointer))
        changed = {path: state for out in stage.outs for path, state in out.workspace_status().items()}
    if changed:
        details = ", ".join(f"{path} {state}" for path, state in sorted(changed.items()))
        raise DataError(
            f"{pointer.relative_to(root)}: the tracked source no longer matches its pointer ({details}); "
            f"nothing was run. {RESTORE_HINT}"
        )


def main() -> None:
    """Entry point for `python -m flows.pipeline`."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Params come from params.yaml in the project root; try other values with `dvc exp run -S key=value`.",
    )
    parser.add_argument(
        "--promote", action="store_true", help="then promote the model if it beats prod's (python -m tasks.promote)"
    )
    arguments = parser.parse_args()
    # Exit through Python on SIGTERM so Prefect stops its temporary server instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cifar10_pipeline(promote=arguments.promote)
    except (ParamsError, DataError, StageFailedError, WorkspaceBusyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(exit_status(error))


def exit_status(error: Exception) -> int:
    """The flow command's exit status for an error: 2 bad input, 75 busy, 1 any other failure."""
    if isinstance(error, ParamsError | DataError | StageBadInputError):
        return EXIT_BAD_INPUT
    return EXIT_BUSY if isinstance(error, WorkspaceBusyError) else 1


if __name__ == "__main__":
    main()
