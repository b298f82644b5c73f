"""The Prefect flow: same DAG as dvc.yaml, DVC as the only judge, dvc.lock as `dvc repro` leaves it."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import yaml

from flows.pipeline import PIPELINE, STAGES, describe_changes
from tests.conftest import (
    DVC,
    FLOW,
    RETRAINING,
    ROOT,
    build_cifar10_archive,
    cache_object,
    edit_params,
    flip_a_byte,
    project_environment,
    run_command,
    track_zip_source,
    wait_until,
)

# Flow runs report to one real Prefect server for the session instead of starting their own.
pytestmark = pytest.mark.usefixtures("prefect_api")


def test_flow_and_dvc_yaml_agree_on_stages_and_order():
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [task.name for task in PIPELINE] == list(STAGES) == declared
    with Repo(str(ROOT)) as repo:
        planned = plan_repro(repo.index.graph, repo.stage.collect("evaluate"))
    order = [stage.addressing for stage in planned if not stage.addressing.endswith(".dvc")]
    assert order == list(STAGES)  # the flow's order is DVC's own execution order (data pointers aside)


def test_dvc_yaml_lists_the_params_sections_each_stage_reads():
    from tasks.lib.params import Params

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: set(stage.get("params", [])) for name, stage in stages.items()}
    assert declared == {
        "ingest": {"ingest"},
        "preprocess": set(),
        "split": {"seed", "split"},
        "train": {"seed", "numerics", "train"},
        "select_best": {"select_best"},
        "evaluate": {"numerics"},
    }
    assert set().union(*declared.values()) <= set(Params.model_fields)


def test_describe_changes_names_what_changed():
    status = [{"changed deps": {"params.yaml": {"train": "modified"}, "tasks/train.py": "modified"}}, "changed command"]
    assert describe_changes(status, ["train.epochs: 2 → 3"]) == (
        "changed deps: train.epochs: 2 → 3, tasks/train.py modified; changed command"
    )
    assert describe_changes(status, []).startswith("changed deps: params.yaml: train modified")


def flow_stages(output: str) -> dict[str, str]:
    """Per stage, 'running' or 'up to date', from the flow's log."""
    outcome = {}
    for stage in STAGES:
        if f"stage {stage}: running" in output:
            outcome[stage] = "running"
        elif f"stage {stage}: up to date" in output:
            outcome[stage] = "up to date"
    return outcome


def test_flow_after_repro_runs_nothing_with_no_server_to_start(project):
    environment = project_environment(project.parent)
    environment.pop("PREFECT_API_URL", None)  # Prefect's temporary local server, as `make run` uses
    result = run_command(FLOW, project, environment=environment)
    assert flow_stages(result.stderr + result.stdout) == dict.fromkeys(STAGES, "up to date")
    assert "up to date: no stage ran" in result.stderr + result.stdout
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_flow_reruns_what_dvc_would_and_leaves_the_same_lock(project, retrained):
    edit_params(project, "train", **RETRAINING)
    result = run_command(FLOW, project)
    expected = {stage: "up to date" for stage in STAGES[:3]} | {stage: "running" for stage in STAGES[3:]}
    assert flow_stages(result.stderr + result.stdout) == expected
    assert "up to date" in run_command([*DVC, "status"], project).stdout
    twin = retrained[0]  # the same change, run by `dvc repro`
    assert yaml.safe_load((project / "dvc.lock").read_text()) == yaml.safe_load((twin / "dvc.lock").read_text())


def test_flow_rejects_bad_params_before_any_work(project):
    edit_params(project, "train", epochs=0)
    lock_before = (project / "dvc.lock").read_bytes()
    result = run_command(FLOW, project, check=False)
    assert result.returncode == 2  # bad input, told apart from a crash (1) and a busy workspace (75)
    assert "train.epochs: Input should be greater than 0" in result.stderr + result.stdout
    assert "Finished in state Failed" in result.stderr + result.stdout
    assert flow_stages(result.stderr + result.stdout) == {}
    assert (project / "dvc.lock").read_bytes() == lock_before


def test_flow_has_no_params_option_that_the_stages_would_ignore(project):
    # The stages run through dvc.yaml, which reads params.yaml: another params file cannot be honoured.
    result = run_command([*FLOW, "--params", "other.yaml"], project, check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --params" in result.stderr


# Takes DVC's own repository lock, as any dvc command does, and keeps it for argv[1] seconds.
# Holds the workspace's DVC lock until its stdin closes (or argv[1] seconds pass).
HOLD_DVC_LOCK = (
    "import select, sys; from dvc.repo import Repo; repo = Repo('.'); repo.lock.lock(); "
    "print('locked', flush=True); select.select([sys.stdin], [], [], float(sys.argv[1])); repo.lock.unlock()"
)
MET_THE_LOCK = "another DVC process holds"


def test_flow_retries_while_another_dvc_process_holds_the_lock(project, tmp_path):
    edit_params(project, "train", epochs=3)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, "600"], cwd=project, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"locked"
    log = tmp_path / "flow.log"
    with open(log, "w") as output:
        flow = subprocess.Popen(
            FLOW, cwd=project, env=project_environment(project.parent), stdout=output, stderr=subprocess.STDOUT
        )
    try:
        # Held until the flow's first try met it, however long the flow took to start: then released.
        wait_until(lambda: MET_THE_LOCK in log.read_text() or flow.poll() is not None, 300, "the flow to meet the lock")
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
        returncode = flow.wait(timeout=600)
    finally:
        holder.kill()
        flow.kill()
    output = log.read_text()
    assert returncode == 0, output
    assert MET_THE_LOCK in output and "Retry" in output  # the first try met the lock
    assert flow_stages(output)["train"] == "running"
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_a_lock_held_past_every_retry_ends_the_run_busy_after_the_set_delays(project):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, "120"], cwd=project, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        environment = project_environment(project.parent) | {"CIFAR10_DVC_BUSY_RETRY_DELAYS_S": "1,2,4"}
        started = time.monotonic()
        result = run_command(FLOW, project, check=False, environment=environment)
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
    output = result.stdout + result.stderr
    assert result.returncode == 75, output  # busy: the same run later will work
    tries = f"Task run failed with exception: PipelineBusyError('stage ingest: {MET_THE_LOCK}"
    assert output.count(tries) == 4, output  # the first try and 3 retries
    for number, delay in enumerate(("1.0", "2.0", "4.0"), start=1):
        assert f"Retry {number}/3 will start {delay} second(s) from now" in output, output
    assert elapsed >= 1 + 2 + 4
    assert "Retry 4/" not in output and f"error: stage ingest: {MET_THE_LOCK}" in output


def test_a_stage_that_refuses_its_input_is_not_retried_and_exits_2(project):
    (project / "broken.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    edit_params(project, "ingest", source="broken.zip")
    lock_before = (project / "dvc.lock").read_bytes()
    result = run_command(FLOW, project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "stage ingest refused its input: " in output and "broken.zip: not a readable zip archive" in output
    assert "Retry" not in output and "Finished in state Failed" in output
    assert (project / "dvc.lock").read_bytes() == lock_before


def test_missing_source_is_pulled_through_its_dvc_pointer_from_the_remote(project, tmp_path):
    with zipfile.ZipFile(project / "images.zip", "w") as archive:
        for path in sorted((project / "source").rglob("*.png")):
            archive.write(path, path.relative_to(project / "source").as_posix())
    remote = tmp_path / "remote"
    for command in (
        [*DVC, "add", "images.zip"],
        [*DVC, "remote", "add", "-d", "store", str(remote)],
        [*DVC, "push", "images.zip.dvc"],
    ):
        run_command(command, project)
    expected = (project / "images.zip").read_bytes()
    (project / "images.zip").unlink()
    md5 = yaml.safe_load((project / "images.zip.dvc").read_text())["outs"][0]["md5"]
    cache_object(project, md5).unlink()  # only the remote has it now
    edit_params(project, "ingest", source="images.zip")
    result = run_command(FLOW, project)
    assert "pulling images.zip.dvc with DVC" in result.stdout + result.stderr
    assert (project / "images.zip").read_bytes() == expected
    assert flow_stages(result.stdout + result.stderr)["ingest"] == "running"
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_missing_source_is_downloaded_from_its_url_and_verified(project, tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    build_cifar10_archive(archive)
    payload = archive.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        edit_params(
            project,
            "ingest",
            kind="cifar10_binary",
            source="downloads/cifar.tar.gz",
            url=f"http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz",
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        result = run_command(FLOW, project)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (project / "downloads" / "cifar.tar.gz").read_bytes() == payload
    assert flow_stages(result.stdout + result.stderr)["evaluate"] == "running"
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_flow_refuses_a_corrupted_tracked_source_before_dvc_repoints_it(project):
    good = track_zip_source(project)
    lock_before = (project / "dvc.lock").read_bytes()
    flip_a_byte(project / "images.zip")
    result = run_command(FLOW, project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "images.zip.dvc: the tracked source no longer matches its pointer (images.zip modified)" in output
    assert "python -m tasks.ingest --restore" in output and flow_stages(output) == {}
    run_command(["git", "diff", "--exit-code", "HEAD", "--", "images.zip.dvc"], project)  # pointer untouched
    assert (project / "dvc.lock").read_bytes() == lock_before
    run_command([sys.executable, "-m", "tasks.ingest", "--restore"], project)
    assert (project / "images.zip").read_bytes() == good
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_the_run_ends_with_one_summary_a_person_can_read():
    from flows.pipeline import StageOutcome, run_summary
    from tasks.lib.params import load_params

    paths = load_params(ROOT / "params.yaml").paths
    outcomes = [StageOutcome("split", False, "up to date"), StageOutcome("train", True, "train: epochs 4 → 5", 192.4)]
    summary = run_summary(outcomes, {"test": {"accuracy": 0.85184, "crossentropy": 0.62551}}, paths)
    assert summary.splitlines() == [
        "pipeline done: test accuracy 0.8518 (cross-entropy 0.6255)",
        "  ran: train 3:12; up to date: split",
        "  metrics: artifacts/metrics/metrics.json (dvc metrics show); plots: artifacts/plots/ (dvc plots show)",
    ]
