"""The scheduled deployment against a real `prefect server` on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DVC, edit_params, project_environment, run_command, stop_process, wait_until

CRON = "0 3 * * *"
# The run's pytest-xdist workers share one Prefect server (tests/conftest.py): a deployment name each.
NAME = f"nightly-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
DEPLOYMENT = f"cifar10-pipeline/{NAME}"


def start_serving(project, environment: dict | None = None) -> subprocess.Popen:
    """`python -m flows.schedule` in its own process group, serving from `project`."""
    # Its output goes to a log beside the project, to read when a test fails.
    with open(project.parent / "schedule.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.schedule", "--cron", CRON, "--name", NAME],
            cwd=project,
            env=(environment or project_environment(project.parent)) | {"PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def served(project, prefect_api):
    """The deployment served from a project copy against the session's Prefect server."""
    runner = start_serving(project)
    try:
        yield project, prefect_api
    finally:
        stop_process(runner)


@contextlib.contextmanager
def prefect_client(api_url: str):
    """A synchronous Prefect client talking to `api_url`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _trigger_and_wait(client, deployment_id, count: int, timeout_s: float = 600) -> list:
    runs = [client.create_flow_run_from_deployment(deployment_id) for _ in range(count)]

    def finished():
        states = [client.read_flow_run(run.id) for run in runs]
        return states if all(run.state and run.state.is_final() for run in states) else None

    return wait_until(finished, timeout_s, f"{count} flow run(s) to finish", interval_s=1)


def test_scheduled_deployment_runs_one_at_a_time_and_publishes_artifacts(served):

    project, api_url = served
    with prefect_client(api_url) as client:
        deployment = wait_until(
            lambda: _deployment(client, project), 120, f"deployment {DEPLOYMENT} to be registered", interval_s=1
        )
        schedules = client.read_deployment_schedules(deployment.id)
        assert [schedule.schedule.cron for schedule in schedules] == [CRON]
        assert deployment.global_concurrency_limit.limit == 1

        edit_params(project, "train", epochs=3)
        (first,) = _trigger_and_wait(client, deployment.id, 1)
        assert first.state.is_completed(), first.state
        latest = _run_artifact(client, first, "cifar10-pipeline-run")
        assert "ran train, select_best, evaluate" in latest.data and "train.epochs" in latest.data
        assert "up to date" in run_command([*DVC, "status"], project).stdout

        both = _trigger_and_wait(client, deployment.id, 2)
        assert all(run.state.is_completed() for run in both), [run.state for run in both]
        earlier, later = sorted(both, key=lambda run: run.start_time)
        assert earlier.end_time <= later.start_time  # never overlapping
        summaries = [_run_artifact(client, run, "cifar10-pipeline-run") for run in both]
        assert all("up to date, no stage ran" in artifact.data for artifact in summaries)
        metrics = json.loads((project / "artifacts/metrics/metrics.json").read_text())
        table = _run_artifact(client, later, "cifar10-pipeline-metrics")
        data = json.loads(table.data) if isinstance(table.data, str) else table.data
        rows = {row["metric"]: row["value"] for row in data}
        assert rows["test accuracy"] == metrics["test"]["accuracy"]
        assert rows["validation cross-entropy"] == metrics["validation"]["crossentropy"]

        # A run whose stage refuses its input fails, and still says where and why in its artifact.
        (project / "broken.zip").write_bytes(b"PK\x03\x04" + bytes(200))
        edit_params(project, "ingest", source="broken.zip")
        (failed,) = _trigger_and_wait(client, deployment.id, 1)
        assert failed.state.is_failed(), failed.state
        summary = _run_artifact(client, failed, "cifar10-pipeline-run")
        assert "failed at ingest" in summary.data and "broken.zip: not a readable zip archive" in summary.data


def _run_artifact(client, run, key: str):
    """The artifact `run` published under `key` (the server's other flow runs publish under the same keys)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    wanted = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    (artifact,) = client.read_artifacts(artifact_filter=wanted)
    return artifact


def _deployment(client, project):
    """The deployment once `project`'s scheduler has registered it (a worker's tests share one name)."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return None
    return deployment if deployment.parameters.get("root") == str(project.resolve()) else None


# ---- crashes: a run whose process is gone must not hold the deployment's one slot ----


def _slots_in_use(client, deployment_id) -> int:
    return client.read_deployment(deployment_id).global_concurrency_limit.active_slots


def test_a_run_left_pending_by_a_dead_scheduler_is_crashed_on_restart(project, prefect_api):
    from prefect.states import Pending

    runner = start_serving(project)
    with prefect_client(prefect_api) as client:
        deployment = wait_until(
            lambda: _deployment(client, project), 120, f"{DEPLOYMENT} to be registered", interval_s=1
        )
        stop_process(runner)
        # What the scheduler does when it submits a run (Pending takes the deployment's one
        # slot), after which it dies before the run's process starts.
        orphan = client.create_flow_run_from_deployment(deployment.id)
        client.set_flow_run_state(orphan.id, Pending())
        assert _slots_in_use(client, deployment.id) == 1
        time.sleep(2)  # older than the limit below: no process recorded, so taken for dead
        runner = start_serving(project, project_environment(project.parent) | {"CIFAR10_PENDING_LIMIT_S": "1"})
        try:
            (run,) = _trigger_and_wait(client, deployment.id, 1, timeout_s=240)
        finally:
            stop_process(runner)
        assert run.state.is_completed(), run.state
        assert client.read_flow_run(orphan.id).state.is_crashed()
        assert _slots_in_use(client, deployment.id) == 0


def _serve_held_before_epoch_2(project, *, epochs: int, pause_s: float, **settings) -> subprocess.Popen:
    """A scheduler whose runs train `epochs` epochs and hold still `pause_s` s before landing epoch 2."""
    from tests.test_faults import environment_with_fault

    edit_params(project, "train", epochs=epochs)
    held = environment_with_fault(
        project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause", FAULT_PAUSE_S=pause_s, **settings
    )
    return start_serving(project, held)


def _start_held_before_epoch_2(project, client, deployment_id):
    """A run of the deployment, once it has finished epoch 1 and holds still before landing epoch 2."""
    from tests.test_faults import RESUME, checkpoint_history

    run = client.create_flow_run_from_deployment(deployment_id)
    wait_until(
        lambda: list((project / RESUME).glob(".epoch-002.keras.*")) and checkpoint_history(project) == [1],
        300,
        "the run to finish epoch 1 and hold still before landing epoch 2",
    )
    return run


def _kill_while_training(project, client, deployment_id, runner) -> tuple:
    """Start a run, wait until it trains (held still before landing epoch 2), SIGKILL `runner`'s whole group."""
    from tests.test_faults import checkpoint_bytes

    run = _start_held_before_epoch_2(project, client, deployment_id)
    first_epoch = checkpoint_bytes(project, (1,))
    _kill_run_and_scheduler(client, run, runner)
    return run, first_epoch


def _kill_run_and_scheduler(client, run, runner: subprocess.Popen) -> None:
    """SIGKILL `run`'s process group, with dvc and training under it, and the scheduler's."""
    # The flow run's process (it recorded itself) and the scheduler: killed at once (the same
    # group, or two), as a reboot or an OOM kill of both would.
    flow_pid = int(client.read_flow_run(run.id).infrastructure_pid.split(":")[1])
    for group in {os.getpgid(flow_pid), runner.pid}:
        os.killpg(group, signal.SIGKILL)
    runner.wait(timeout=30)


def _assert_recovers(project, client, deployment_id, dead_run, first_epoch) -> None:
    """The dead run is Crashed, its slot free, and the next run completes, resuming training."""
    from tests.test_faults import checkpoint_bytes, checkpoint_history

    wait_until(lambda: client.read_flow_run(dead_run.id).state.is_crashed(), 120, "the dead run to be marked Crashed")
    (run,) = _trigger_and_wait(client, deployment_id, 1, timeout_s=300)
    assert run.state.is_completed(), run.state
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logged = "\n".join(
        line.message for line in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    )
    assert "resuming from" in logged and "epoch-001.keras" in logged, logged[-2000:]
    assert checkpoint_history(project) == [1, 2, 3, 4]
    assert checkpoint_bytes(project, (1,)) == first_epoch  # resumed after epoch 1, not started over
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_scheduler_killed_while_a_run_trains_recovers_on_restart(project, prefect_api):
    runner = _serve_held_before_epoch_2(project, epochs=4, pause_s=600)
    with prefect_client(prefect_api) as client:
        deployment = wait_until(
            lambda: _deployment(client, project), 120, f"{DEPLOYMENT} to be registered", interval_s=1
        )
        dead_run, first_epoch = _kill_while_training(project, client, deployment.id, runner)
        assert client.read_flow_run(dead_run.id).state.is_running()  # the server cannot know
        runner = start_serving(project)
        try:
            _assert_recovers(project, client, deployment.id, dead_run, first_epoch)
        finally:
            stop_process(runner)


def test_the_scheduler_killed_alone_leaves_its_run_going_and_a_restart_leaves_it_alone(project, prefect_api):
    from tests.test_faults import checkpoint_history

    # Held still 30 s before landing epoch 2: time to kill the scheduler and start it again.
    runner = _serve_held_before_epoch_2(project, epochs=3, pause_s=30)
    with prefect_client(prefect_api) as client:
        deployment = wait_until(
            lambda: _deployment(client, project), 120, f"{DEPLOYMENT} to be registered", interval_s=1
        )
        run = _start_held_before_epoch_2(project, client, deployment.id)
        # The scheduler's process alone (an OOM kill picks one): the run's output pipe loses its
        # reader, and without flows.streams the run's next log line would end it (rich: SystemExit).
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=30)
        runner = start_serving(project)
        try:
            log = project.parent / "schedule.log"
            # It looks for dead runs before it serves: by then it has looked at this one, held still.
            wait_until(lambda: log.read_text().count("being served") == 2, 60, "the restarted scheduler to serve")
            assert client.read_flow_run(run.id).state.is_running()
            finished = wait_until(
                lambda: (current := client.read_flow_run(run.id)).state.is_final() and current, 300, "the run to end"
            )
            assert finished.state.is_completed(), finished.state
            assert checkpoint_history(project) == [1, 2, 3]  # trained on, never restarted
            wait_until(lambda: _slots_in_use(client, deployment.id) == 0, 30, "the slot to come free")
        finally:
            stop_process(runner)


@pytest.mark.long_running
def test_heartbeats_alone_keep_a_long_step_running_and_crash_a_dead_run_with_no_restart(project, prefect_api):
    from datetime import UTC, datetime

    from flows.schedule import MISSED_HEARTBEATS

    heartbeat_s = 30  # Prefect's shortest period: silence counts after 3 x 30 = 90 s
    silence_s = MISSED_HEARTBEATS * heartbeat_s
    # Training holds still 110 s before landing epoch 2: a step longer than the silence.
    runner = _serve_held_before_epoch_2(project, epochs=3, pause_s=110, PREFECT_FLOWS_HEARTBEAT_FREQUENCY=heartbeat_s)
    with prefect_client(prefect_api) as client:
        deployment = wait_until(
            lambda: _deployment(client, project), 120, f"{DEPLOYMENT} to be registered", interval_s=1
        )
        run = _start_held_before_epoch_2(project, client, deployment.id)

        def running_for_s() -> float:
            return (datetime.now(UTC) - client.read_flow_run(run.id).start_time).total_seconds()

        # Healthy past the silence (PrefectHQ/prefect#21932 and #18653 list the automation's false
        # positives): its heartbeats keep it Running.
        wait_until(lambda: running_for_s() > silence_s + 10, 300, "the run to outlive the silence", interval_s=1)
        assert client.read_flow_run(run.id).state.is_running()
        # Then its process, and the scheduler's, die; nobody restarts anything.
        _kill_run_and_scheduler(client, run, runner)
        crashed = wait_until(
            lambda: (current := client.read_flow_run(run.id)).state.is_crashed() and current,
            silence_s + 90,
            "the automation to mark the silent run Crashed",
            interval_s=2,
        )
        assert f"no heartbeat for {silence_s} s" in crashed.state.message
        wait_until(lambda: _slots_in_use(client, deployment.id) == 0, 30, "the slot to come free")


def test_server_and_scheduler_killed_together_recover_on_restart(project, tmp_path):
    from tests.conftest import free_port, start_prefect_server
    from tests.test_faults import environment_with_fault

    # A server of its own, killed and restarted on the same database, as a reboot would.
    home, port = tmp_path / "server-home", free_port()
    home.mkdir()
    api_url = f"http://127.0.0.1:{port}/api"
    edit_params(project, "train", epochs=4)
    held = environment_with_fault(project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause", FAULT_PAUSE_S=600)
    server = start_prefect_server(home, port)
    runner = start_serving(project, held | {"PREFECT_API_URL": api_url})
    try:
        with prefect_client(api_url) as client:
            deployment = wait_until(
                lambda: _deployment(client, project), 120, f"{DEPLOYMENT} to be registered", interval_s=1
            )
            dead_run, first_epoch = _kill_while_training(project, client, deployment.id, runner)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        server = start_prefect_server(home, port)
        runner = start_serving(project, project_environment(project.parent) | {"PREFECT_API_URL": api_url})
        with prefect_client(api_url) as client:
            _assert_recovers(project, client, deployment.id, dead_run, first_epoch)
    finally:
        stop_process(runner)
        stop_process(server)


def test_a_recorded_process_counts_as_alive_only_while_that_very_process_runs():
    from flows.liveness import process_alive, process_start, process_tag

    tag = process_tag()
    host, pid, start, boot_id = tag.rsplit(":", 3)
    assert process_alive(tag)
    assert not process_alive(f"{host}:{pid}:{int(start) + 1}:{boot_id}")  # the pid, reused by a later process
    assert not process_alive(f"{host}:{pid}:{start}:another-boot")
    assert not process_alive(None)  # a run that never recorded a process
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child_tag = f"{host}:{child.pid}:{process_start(child.pid)}:{boot_id}"
    assert process_alive(child_tag)
    child.kill()
    # Not reaped yet: a zombie, as a killed flow stays under an init that never reaps.
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z", 10, "a zombie")
    assert not process_alive(child_tag)
    child.wait(timeout=10)
    assert not process_alive(child_tag)


def test_only_runs_dead_on_evidence_are_crashed_and_a_final_run_is_never_overwritten(prefect_api, monkeypatch):
    import os
    import socket
    import uuid

    from prefect.states import Cancelling, Completed, Pending, Running

    from flows.liveness import process_start, process_tag, this_boot
    from flows.schedule import crash_dead_runs, propose_crashed

    host, boot_id = this_boot()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead_here = f"{host}:{child.pid}:{process_start(os.getpid())}:{boot_id}"  # a pid that is gone
    with prefect_client(prefect_api) as client:
        flow_id = client.create_flow_from_name("cifar10-pipeline")
        name = f"evidence-{uuid.uuid4().hex[:8]}"
        deployment_id = client.create_deployment(flow_id=flow_id, name=name)

        def run_in(state, tag=None):
            run = client.create_flow_run_from_deployment(deployment_id)
            if tag:  # first: Prefect cancels a Cancelling run at once when it has no process to stop
                client.update_flow_run(run.id, infrastructure_pid=tag)
                client.set_flow_run_state(run.id, Running(), force=True)
            client.set_flow_run_state(run.id, state, force=True)
            return run.id

        starting = run_in(Pending())  # just submitted: no process recorded yet
        elsewhere = run_in(Running(), f"{socket.gethostname()}-other:4242:1:{boot_id}")  # another host
        alive = run_in(Running(), process_tag())
        gone = run_in(Running(), dead_here)
        rebooted = run_in(Running(), f"{host}:{os.getpid()}:{process_start(os.getpid())}:a-boot-before-this-one")
        cancelling = run_in(Cancelling(), dead_here)
        monkeypatch.setenv("PREFECT_API_URL", prefect_api)
        crashed = crash_dead_runs(f"cifar10-pipeline/{name}")
        state = {
            run: client.read_flow_run(run).state for run in (starting, elsewhere, alive, gone, rebooted, cancelling)
        }
        assert [state[run].type.value for run in (starting, elsewhere, alive)] == ["PENDING", "RUNNING", "RUNNING"]
        assert [state[run].type.value for run in (gone, rebooted)] == ["CRASHED"] * 2
        assert state[cancelling].type.value == "CANCELLED"  # its cancellation is complete: its process is gone
        assert len(crashed) == 3
        assert "is gone" in state[gone].message and "before this machine's last boot" in state[rebooted].message
        # The same submitted run, once nothing was recorded for longer than the limit: dead.
        monkeypatch.setenv("CIFAR10_PENDING_LIMIT_S", "0")
        assert len(crash_dead_runs(f"cifar10-pipeline/{name}")) == 1
        assert client.read_flow_run(starting).state.is_crashed()
        assert client.read_flow_run(elsewhere).state.is_running()  # unknown stays alive: heartbeats decide
        # A run that completed between the read and the proposal stays Completed.
        finished = client.read_flow_run(run_in(Completed(), dead_here))
        assert not propose_crashed(client, finished, "its process is gone")
        assert client.read_flow_run(finished.id).state.is_completed()


def test_the_zombie_automation_is_created_once_and_watches_this_deployment(prefect_api, monkeypatch):
    import uuid

    from prefect.settings import get_current_settings

    from flows.schedule import MISSED_HEARTBEATS, ensure_zombie_automation, zombie_automation_name

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with prefect_client(prefect_api) as client:
        name = f"zombies-{uuid.uuid4().hex[:8]}"
        deployment_id = client.create_deployment(flow_id=client.create_flow_from_name("cifar10-pipeline"), name=name)
        first = ensure_zombie_automation(f"cifar10-pipeline/{name}")
        assert ensure_zombie_automation(f"cifar10-pipeline/{name}") == first  # a restart finds it
        (automation,) = client.read_automations_by_name(zombie_automation_name(f"cifar10-pipeline/{name}"))
    heartbeat_s = get_current_settings().flows.heartbeat_frequency
    assert automation.trigger.within.total_seconds() == MISSED_HEARTBEATS * heartbeat_s
    assert automation.trigger.posture.value == "Proactive" and "prefect.flow-run.heartbeat" in automation.trigger.after
    assert f"prefect.deployment.{deployment_id}" in str(automation.trigger.match_related)
    assert automation.actions[0].state.value == "CRASHED"
    assert automation.actions[0].force is False  # a run that completed meanwhile stays Completed
