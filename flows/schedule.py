"""Serve the pipeline flow as a Prefect deployment on a cron schedule, one run at a time.

    prefect server start --host 127.0.0.1                 # terminal 1: API and UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2:
    python -m flows.schedule [--cron "0 2 * * *"] [--name nightly]

Each run reads params.yaml in the directory it is served from, as `dvc repro` does.

Runs that collide wait for the running one to finish (deployment concurrency limit 1,
ENQUEUE): two runs never work on the workspace at the same time.

A run whose process died with the machine, the server or this process (SIGKILL, OOM) would
hold that one slot for good: on start, before serving, runs of the deployment that are
still Pending, Running or Cancelling but whose process is gone are marked Crashed, which
releases their slot; the next run resumes training from its checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import cifar10_pipeline, process_start, this_boot

log = logging.getLogger("flows.schedule")

DEFAULT_CRON = "0 2 * * *"  # nightly, 02:00 in the server's time zone (UTC by default)
DEFAULT_NAME = "nightly"


def build_deployment(*, name: str, cron: str, root: Path, promote: bool = False):
    """The flow as a deployment: cron schedule, this workspace, at most one run at a time."""
    return cifar10_pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={"root": str(root.resolve()), "promote": promote},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Runs every stale stage of the CIFAR-10 pipeline; up to date runs finish in seconds.",
    )


def process_alive(tag: str | None) -> bool:
    """Whether the process a run recorded (`host:pid:start:boot id`) is alive on this host now."""
    if not tag or tag.count(":") < 3:
        return False  # never recorded: the run died before its flow started (Pending, Submitting)
    host, pid, start, boot_id = tag.rsplit(":", 3)
    if (host, boot_id) != this_boot():
        return False  # another boot of this machine: every process of it is gone
    # The start time, not the pid alone: pids wrap around (32,768 here) and get reused, by threads too.
    return process_start(int(pid)) == start


def crash_dead_runs(deployment_name: str) -> list[str]:
    """Mark the deployment's Pending/Running/Cancelling runs whose process is gone Crashed; their slots come free."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return []  # first start: nothing can be left over
        stuck = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
                ),
            )
        )
        crashed = []
        for run in stuck:
            if process_alive(run.infrastructure_pid):
                log.info(
                    "flow run %s is %s and its process %s is alive: left alone",
                    run.name,
                    run.state_name,
                    run.infrastructure_pid,
                )
                continue
            # force: a Cancelling run may not become Crashed otherwise; Prefect's rule that releases
            # the deployment's concurrency slot still runs on a forced transition.
            client.set_flow_run_state(
                run.id, Crashed(message="its process is gone (machine, server or scheduler crash)"), force=True
            )
            log.warning(
                "flow run %s (%s) was %s but its process is gone: marked Crashed", run.name, run.id, run.state_name
            )
            crashed.append(run.name)
    return crashed


def main() -> None:
    """Entry point for `python -m flows.schedule`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r}, nightly)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    parser.add_argument(
        "--promote",
        action="store_true",
        help="end each run with the promotion gate: a winner is committed on a branch of its own and registered",
    )
    arguments = parser.parse_args()
    # SIGTERM (from a service manager) stops serving the way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    crash_dead_runs(f"{cifar10_pipeline.name}/{arguments.name}")
    deployment = build_deployment(name=arguments.name, cron=arguments.cron, root=Path.cwd(), promote=arguments.promote)
    serve(deployment, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
