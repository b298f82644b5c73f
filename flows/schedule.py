"""Serve the pipeline flow as a Prefect deployment on a cron schedule, one run at a time.

    prefect server start --host 127.0.0.1                 # terminal 1: API and UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2:
    python -m flows.schedule [--cron "0 2 * * *"] [--name nightly]

Each run reads params.yaml in the directory it is served from, as `dvc repro` does.

Runs that collide wait for the running one to finish (deployment concurrency limit 1,
ENQUEUE): two runs never work on the workspace at the same time.

A run whose process died with the machine, the server or this process (SIGKILL, OOM) would
hold that one slot for good. A run is taken for dead only on evidence, and unknown is alive:
on start and every minute while serving, runs of the deployment that are still Pending,
Running or Cancelling whose process recorded on this host is gone (or ran before this boot),
or that recorded none for 5 minutes after they were submitted, are proposed Crashed (never
forced: a run that finished meanwhile stays finished), which releases their slot; the next
run resumes training from its checkpoints. Runs on other hosts are left to Prefect's heartbeats:
an automation, created once per deployment, marks a run Crashed after three missed heartbeats.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.liveness import liveness
from flows.pipeline import cifar10_pipeline

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


# A run with no process recorded yet is starting: its flow records itself within seconds of its
# process starting. Only after this long without a record is it taken for dead (the scheduler
# died while submitting it). CIFAR10_PENDING_LIMIT_S overrides it.
PENDING_LIMIT_S = 300.0
SWEEP_EVERY_S = 60.0  # how often a serving scheduler looks for dead runs again
# The zombie automation marks a run Crashed after this many heartbeats missed in a row.
MISSED_HEARTBEATS = 3


def pending_limit_s() -> float:
    """PENDING_LIMIT_S, or CIFAR10_PENDING_LIMIT_S from the environment."""
    return float(os.environ.get("CIFAR10_PENDING_LIMIT_S", PENDING_LIMIT_S))


def crash_dead_runs(deployment_name: str) -> list[str]:
    """Mark the deployment's Pending/Running/Cancelling runs that are dead on evidence Crashed; their slots come free.

    The transition is proposed, never forced: a run that reached a final state meanwhile
    (Completed between the read and the write) stays as it is, as Prefect's rules say.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    limit = pending_limit_s()
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
            age = (datetime.now(UTC) - run.state.timestamp).total_seconds()
            alive, why = liveness(run.infrastructure_pid, age, limit)
            if alive is not False:
                log.info("flow run %s is %s: %s; left alone", run.name, run.state_name, why)
                continue
            if not propose_crashed(client, run, f"{why} (machine, server or scheduler crash)"):
                continue
            log.warning("flow run %s (%s) was %s but %s: ended", run.name, run.id, run.state_name, why)
            crashed.append(run.name)
    return crashed


def propose_crashed(client, run, message: str) -> bool:
    """Propose the end of a dead run, unforced, so Prefect refuses it for a run already final; whether it took.

    Crashed, or Cancelled for a run that was Cancelling: its cancellation is complete, and
    Prefect lets a Cancelling run end in Cancelled only.
    """
    from prefect.states import Cancelled, Crashed

    end = Cancelled if run.state is not None and run.state.type.value == "CANCELLING" else Crashed
    result = client.set_flow_run_state(run.id, end(message=message))
    if result.status.value != "ACCEPT":
        log.info("flow run %s: not marked %s (%s)", run.name, end.__name__, result.details.reason)
    return result.status.value == "ACCEPT"


def zombie_automation_name(deployment_name: str) -> str:
    """The name of the deployment's zombie automation (one per deployment)."""
    return f"{deployment_name}: crash runs whose heartbeats stopped"


def ensure_zombie_automation(deployment_name: str) -> str:
    """Create, or bring up to date, the automation that marks the deployment's silent runs Crashed; its id.

    Prefect's documented zombie detection: a run that has sent a heartbeat and then sends
    neither another nor a final state within MISSED_HEARTBEATS heartbeat periods is Crashed,
    which frees its slot even when no scheduler is restarted. Idempotent: one per deployment.
    """
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        heartbeat_s = get_current_settings().flows.heartbeat_frequency
        silence = timedelta(seconds=MISSED_HEARTBEATS * heartbeat_s)
        wanted = Automation(
            name=zombie_automation_name(deployment_name),
            description=f"No heartbeat for {silence.total_seconds():.0f} s ({MISSED_HEARTBEATS} missed): dead.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                },
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                match_related=ResourceSpecification(
                    {
                        "prefect.resource.role": "deployment",
                        "prefect.resource.id": f"prefect.deployment.{deployment.id}",
                    }
                ),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=silence,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"no heartbeat for {silence.total_seconds():.0f} s: its process is gone",
                )
            ],
        )
        existing = client.read_automations_by_name(name=wanted.name)
    if not existing:
        created = wanted.create()
        log.info("created the automation %r", wanted.name)
        return str(created.id)
    first, *duplicates = existing
    for duplicate in duplicates:  # two schedulers that started at the same moment
        Automation(**duplicate.model_dump()).delete()
    current = Automation(**first.model_dump())
    if (current.trigger, current.actions) != (wanted.trigger, wanted.actions):
        wanted.id = current.id
        wanted.update()
        log.info("updated the automation %r", wanted.name)
    return str(current.id)


def sweep_dead_runs_forever(deployment_name: str, stop: threading.Event) -> None:
    """Look for dead runs every SWEEP_EVERY_S while serving: a run orphaned now is freed without a restart."""
    while not stop.wait(SWEEP_EVERY_S):
        try:
            crash_dead_runs(deployment_name)
        except Exception as error:  # the server restarting, say: try again at the next sweep
            log.warning("looking for dead runs failed: %s", error)


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
    deployment_name = f"{cifar10_pipeline.name}/{arguments.name}"
    crash_dead_runs(deployment_name)
    deployment = build_deployment(name=arguments.name, cron=arguments.cron, root=Path.cwd(), promote=arguments.promote)
    deployment.apply()  # registered before serving, so that its automation can name it
    ensure_zombie_automation(deployment_name)
    threading.Thread(
        target=sweep_dead_runs_forever, args=(deployment_name, threading.Event()), name="dead-runs", daemon=True
    ).start()
    serve(deployment, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
