"""The scheduled deployment against a real `prefect server` on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

from tests.conftest import DVC, edit_params, project_environment, run_command, stop_process, wait_until

CRON = "0 3 * * *"
DEPLOYMENT = "cifar10-pipeline/nightly"


@pytest.fixture
def served(project, prefect_api):
    """The deployment served from a project copy against the session's Prefect server."""
    runner = subprocess.Popen(
        [sys.executable, "-m", "flows.schedule", "--cron", CRON],
        cwd=project,
        env=project_environment(project.parent) | {"PREFECT_RUNNER_POLL_FREQUENCY": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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


def _trigger_and_wait(client, deployment_id, count: int) -> list:
    runs = [client.create_flow_run_from_deployment(deployment_id) for _ in range(count)]

    def finished():
        states = [client.read_flow_run(run.id) for run in runs]
        return states if all(run.state and run.state.is_final() for run in states) else None

    return wait_until(finished, 600, f"{count} flow run(s) to finish", interval_s=1)


def test_scheduled_deployment_runs_one_at_a_time_and_publishes_artifacts(served):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    project, api_url = served
    with prefect_client(api_url) as client:
        deployment = wait_until(
            lambda: _deployment(client), 120, f"deployment {DEPLOYMENT} to be registered", interval_s=1
        )
        schedules = client.read_deployment_schedules(deployment.id)
        assert [schedule.schedule.cron for schedule in schedules] == [CRON]
        assert deployment.global_concurrency_limit.limit == 1

        edit_params(project, "train", epochs=3)
        (first,) = _trigger_and_wait(client, deployment.id, 1)
        assert first.state.is_completed(), first.state
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cifar10-pipeline-run"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0]
        assert "ran train, select_best, evaluate" in latest.data and "train.epochs" in latest.data
        assert "up to date" in run_command([*DVC, "status"], project).stdout

        both = _trigger_and_wait(client, deployment.id, 2)
        assert all(run.state.is_completed() for run in both), [run.state for run in both]
        earlier, later = sorted(both, key=lambda run: run.start_time)
        assert earlier.end_time <= later.start_time  # never overlapping
        summaries = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cifar10-pipeline-run"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=2,
        )
        assert all("up to date, no stage ran" in artifact.data for artifact in summaries)
        metrics = json.loads((project / "artifacts/metrics/metrics.json").read_text())
        table = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cifar10-pipeline-metrics"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0]
        data = json.loads(table.data) if isinstance(table.data, str) else table.data
        rows = {row["metric"]: row["value"] for row in data}
        assert rows["test accuracy"] == metrics["test"]["accuracy"]
        assert rows["validation cross-entropy"] == metrics["validation"]["crossentropy"]

        # A run whose stage refuses its input fails, and still says where and why in its artifact.
        (project / "broken.zip").write_bytes(b"PK\x03\x04" + bytes(200))
        edit_params(project, "ingest", source="broken.zip")
        (failed,) = _trigger_and_wait(client, deployment.id, 1)
        assert failed.state.is_failed(), failed.state
        summary = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cifar10-pipeline-run"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0]
        assert "failed at ingest" in summary.data and "broken.zip: not a readable zip archive" in summary.data


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return None
