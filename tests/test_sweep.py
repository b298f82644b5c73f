"""Sweeps: candidates as DVC experiments on a real Dask LocalCluster, through the real dvc CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.sweep_grid import (
    SweepError,
    candidate_grid,
    candidate_name,
    parse_sweep,
    rank,
    split_values,
    unrankable,
    validate_candidates,
)
from tests.conftest import DVC, edit_params, run_command, wait_until

SWEEP = [sys.executable, "-m", "flows.sweep", "--workers", "2"]


def test_grid_follows_dvcs_set_param_grammar_and_names_are_deterministic():
    assert split_values("[32,64],[32,128],7") == ["[32,64]", "[32,128]", "7"]
    axes = parse_sweep(["train.learning_rate=0.5,1.0", "train.widths=[32,64,128],[32,128,128]"])
    assert axes == {"train.learning_rate": [0.5, 1.0], "train.widths": [[32, 64, 128], [32, 128, 128]]}
    grid = candidate_grid(axes, max_candidates=4)
    assert [candidate.overrides for candidate in grid][:2] == [
        {"train.learning_rate": 0.5, "train.widths": [32, 64, 128]},
        {"train.learning_rate": 0.5, "train.widths": [32, 128, 128]},
    ]
    assert len({candidate.name for candidate in grid}) == 4
    assert grid[0].name == candidate_name({"train.widths": [32, 64, 128], "train.learning_rate": 0.5})
    assert grid[0].set_params() == ["-S", "train.learning_rate=0.5", "-S", "train.widths=[32,64,128]"]
    with pytest.raises(SweepError, match="4 candidates, more than --max-candidates 3"):
        candidate_grid(axes, max_candidates=3)
    with pytest.raises(SweepError, match="expected key=value"):
        parse_sweep(["train.epochs"])


def test_candidates_with_an_unknown_key_or_a_bad_value_are_refused_before_any_work():
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    with pytest.raises(SweepError, match="train.learnin_rate: unknown key"):
        validate_candidates(candidate_grid(parse_sweep(["train.learnin_rate=1.0,2.0"]), 8), params)
    with pytest.raises(SweepError, match="train.epochs: Input should be greater than 0"):
        validate_candidates(candidate_grid(parse_sweep(["train.epochs=2,0"]), 8), params)
    validate_candidates(candidate_grid(parse_sweep(["train.epochs=2,4"]), 8), params)


def test_winner_is_the_best_validation_figure_with_ties_broken_by_name():
    finished = {
        "b": {"metrics": {"validation": {"loss": 1.0, "accuracy": 0.7}}},
        "a": {"metrics": {"validation": {"loss": 1.0, "accuracy": 0.6}}},
        "c": {"metrics": {"validation": {"loss": 1.2, "accuracy": 0.9}}},
    }
    assert rank(finished, "val_loss") == ["a", "b", "c"]
    assert rank(finished, "val_accuracy") == ["c", "b", "a"]


def test_a_grid_whose_candidates_cannot_be_ranked_on_the_monitor_is_refused():
    assert unrankable(parse_sweep(["train.learning_rate=0.01,0.03"]), "val_loss") is None
    smoothing = parse_sweep(["train.label_smoothing=0,0.2"])
    assert "train.label_smoothing changes the objective that val_loss measures" in unrankable(smoothing, "val_loss")
    assert unrankable(smoothing, "val_crossentropy") is None and unrankable(smoothing, "val_accuracy") is None
    assert "seed changes which images validate" in unrankable(parse_sweep(["seed=1,2"]), "val_accuracy")
    split = parse_sweep(["split.validation_fraction=0.1,0.2"])
    assert "split.validation_fraction changes which images validate" in unrankable(split, "val_crossentropy")
    assert unrankable(parse_sweep(["seed=7", "train.epochs=2,3"]), "val_loss") is None  # one seed for all
    assert "one monitor ranks them all" in unrankable(parse_sweep(["select_best.monitor=val_loss,val_accuracy"]), "")


def test_the_sweeps_local_cluster_reruns_a_dead_workers_candidate_once():
    # A real LocalCluster, started from the sweep's task runner's settings after prefect_dask (and so
    # dask) was imported: its scheduler must allow one worker death per candidate, not dask's 3.
    script = (
        "import prefect_dask, flows.sweep as sweep\n"
        "from distributed import LocalCluster\n"
        "runner = sweep.task_runner(workers=1, address=None)\n"
        "options = runner.cluster_kwargs | {'n_workers': 0, 'processes': False}\n"
        "with LocalCluster(**options) as cluster:\n"
        "    print(cluster.scheduler.allowed_failures)\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DASK_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, env=environment
    )
    assert result.stdout.split()[-1] == "1", result.stdout + result.stderr


@pytest.fixture
def sweep_project(project, tmp_path):
    """The reproduced tiny project, committed, with a git identity and a local DVC remote."""
    for key, value in (("user.name", "Sweep Test"), ("user.email", "sweep@example.com")):
        run_command(["git", "config", key, value], project)
    run_command([*DVC, "remote", "add", "-d", "store", str(tmp_path / "dvc-remote")], project)
    run_command(["git", "commit", "-qam", "DVC remote"], project)
    return project


def exp_show(project) -> dict[str, dict]:
    """{experiment name: its data} from `dvc exp show --json`."""
    shown = json.loads(run_command([*DVC, "exp", "show", "--json"], project).stdout)
    # The first baseline is the workspace; experiments hang under their commit's baseline.
    return {group["name"]: group["revs"][0]["data"] for base in shown for group in base["experiments"] or []}


@pytest.mark.long_running
def test_three_candidates_on_two_workers_one_diverges_the_best_is_applied(sweep_project, prefect_api, tmp_path):
    project = sweep_project
    # Workers share nothing with this workspace: they clone a bare repository by URL, use a DVC
    # remote given by URL, and push their experiments there; the sweep pulls them back.
    bare = tmp_path / "shared.git"
    run_command(["git", "clone", "--quiet", "--bare", str(project), str(bare)], tmp_path)
    urls = ["--repo", f"file://{bare}", "--remote", str(tmp_path / "sweep-remote")]
    sets = ["-S", "train.optimizer=sgd", "-S", "train.learning_rate=0.01,0.03,1e30"]
    result = run_command([*SWEEP, *sets, *urls], project)
    names = [candidate.name for candidate in candidate_grid(parse_sweep(sets[1::2]), 8)]
    shown = exp_show(project)
    assert set(shown) == set(names[:2])  # the diverged one is no experiment
    for name, rate in zip(names[:2], (0.01, 0.03), strict=True):
        assert shown[name]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == rate
        assert "validation" in shown[name]["metrics"]["artifacts/metrics/metrics.json"]["data"]
    summary = (project / "artifacts/sweep/summary.md").read_text()
    assert f"| `{names[2]}` |" in summary and "failed: " in summary and "loss is not finite" in summary
    assert all((project / f"artifacts/sweep/{name}.png").exists() for name in names[:2])
    pids = {line.split("(pid ")[1].split(")")[0] for line in summary.splitlines() if "| trained |" in line}
    assert len(pids) == 2  # two candidates, two worker processes
    losses = {
        name: shown[name]["metrics"]["artifacts/metrics/metrics.json"]["data"]["validation"]["loss"]
        for name in names[:2]
    }
    winner = min(losses, key=lambda name: (losses[name], name))
    assert f"winner: {winner} (applied to the workspace)" in result.stdout
    assert "Data and pipelines are up to date" in run_command([*DVC, "status"], project).stdout
    assert json.loads((project / "artifacts/metrics/metrics.json").read_text())["validation"]["loss"] == losses[winner]
    # The finished candidates again, from the committed state: each is reused. (The diverged one,
    # no experiment, would train again: a run and a worker process more per CI run.)
    run_command(["git", "checkout", "--", "."], project)
    run_command([*DVC, "checkout", "--force"], project)
    # One worker is enough from here on, and each worker is a process to start.
    one_worker = [sys.executable, "-m", "flows.sweep", "--workers", "1"]
    finite = ["-S", "train.optimizer=sgd", "-S", "train.learning_rate=0.01,0.03"]
    again = run_command([*one_worker, *finite, *urls], project)
    assert again.stderr.count("reused: trained nothing") + again.stdout.count("reused: trained nothing") == 2
    assert set(exp_show(project)) == set(names[:2])
    assert "refs/exps/" in run_command(["git", "for-each-ref", "refs/exps"], bare).stdout  # pushed there
    # The winner committed, HEAD moves and the experiments stay with the old commit; each candidate
    # pushed its runs to DVC's run cache in the remote, so the same grid again trains nothing.
    run_command(["git", "commit", "--allow-empty", "-qam", "the sweep's winner"], project)
    third = run_command([*one_worker, *finite, *urls], project)
    log = third.stdout + third.stderr
    assert log.count("trained nothing") == 2 and "reused: DVC's run cache" in log, log[-3000:]
    assert set(exp_show(project)) == set(names[:2])  # now experiments on the new commit
    assert "Data and pipelines are up to date" in run_command([*DVC, "status"], project).stdout


def test_experiments_queued_the_plain_dvc_way_are_ranked_by_the_same_rule(sweep_project):
    project = sweep_project
    for rate in (0.02, 0.05):
        queue = [*DVC, "exp", "run", "--queue", "--name", f"plain-{rate}", "-S", f"train.learning_rate={rate}"]
        run_command(queue, project)
    run_command([*DVC, "queue", "start", "-j", "2"], project)
    wait_until(
        lambda: "Success" in (status := queue_status(project)) and "Queued" not in status and "Running" not in status,
        600,
        "the queue to finish",
        interval_s=3,  # each `dvc queue status` is a DVC process: most of a CPU-second
    )
    figures = {
        name: data["metrics"]["artifacts/metrics/metrics.json"]["data"]["validation"]["loss"]
        for name, data in exp_show(project).items()
    }
    assert set(figures) == {"plain-0.02", "plain-0.05"}, queue_status(project)
    best = min(figures, key=lambda name: (figures[name], name))
    chosen = run_command([sys.executable, "-m", "flows.sweep", "--apply-best"], project)
    assert f"winner: {best} (applied to the workspace)" in chosen.stdout
    assert "Data and pipelines are up to date" in run_command([*DVC, "status"], project).stdout
    summary = (project / "artifacts/sweep/summary.md").read_text()
    assert f"`train.learning_rate={best.removeprefix('plain-')}`" in summary  # each row names its params


def queue_status(project: Path) -> str:
    """`dvc queue status`: one line per queued, running, finished or failed experiment."""
    return run_command([*DVC, "queue", "status"], project).stdout


def test_a_sweep_from_a_workspace_that_differs_from_its_commit_is_refused(sweep_project, prefect_api):
    project = sweep_project
    edit_params(project, "train", epochs=3)
    refused = subprocess.run(
        [*SWEEP, "-S", "train.learning_rate=0.01,0.02"], cwd=project, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "tracked files differ from HEAD" in refused.stderr
    assert not exp_show(project)


def holding(scratch: Path, sweep: subprocess.Popen, log: Path | None = None) -> list[Path]:
    """The temporary epoch-2 checkpoint a held candidate waits to land; fails at once if the sweep ended."""
    if sweep.poll() is not None:
        pytest.fail(f"the sweep exited {sweep.returncode} early:\n{log.read_text()[-3000:] if log else ''}")
    return list(scratch.glob("sweep-*/repo/artifacts/resume/.epoch-002.keras.*"))


def candidate_processes(scratch: Path) -> list[int]:
    """Processes whose working directory is inside `scratch` (the candidates' workspaces)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        with contextlib.suppress(OSError):
            if cwd.resolve().is_relative_to(scratch.resolve()):
                found.append(int(cwd.parent.name))
    return found


def test_a_dead_workers_candidate_runs_once_more_then_is_reported_failed_and_the_rest_complete(
    sweep_project, prefect_api, tmp_path
):
    from tests.test_faults import environment_with_fault

    project = sweep_project
    scratch, record = tmp_path / "scratch", tmp_path / "kills"
    scratch.mkdir()
    record.mkdir()
    sets = ["-S", "train.learning_rate=0.002,0.003"]
    healthy, doomed = (candidate.name for candidate in candidate_grid(parse_sweep(sets[1::2]), 8))
    # Landing epoch 2, `doomed` kills its worker and itself (as an OOM kill of the lot) in each of
    # its first three runs: one more than the sweep may give it.
    environment = environment_with_fault(
        project,
        FAULT_AT_RENAME="epoch-002.keras",
        FAULT="kill_worker",
        FAULT_KILL_WORKER=f"{doomed}:3",
        FAULT_RECORD=record,
    )
    environment["TMPDIR"] = str(scratch)  # where candidates make their workspaces
    result = subprocess.run([*SWEEP, *sets], cwd=project, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Exactly two runs, each on its own worker process, both killed; then it is reported failed.
    kills = sorted(record.iterdir())
    assert [path.name for path in kills] == [f"{doomed}.1", f"{doomed}.2"]
    assert kills[0].read_text() != kills[1].read_text()
    summary = (project / "artifacts/sweep/summary.md").read_text()
    rows = {name: row for row in summary.splitlines() for name in (healthy, doomed) if f"| `{name}` |" in row}
    assert "failed: " in rows[doomed] and "workers died" in rows[doomed], rows[doomed]
    assert "| trained |" in rows[healthy]
    assert set(exp_show(project)) == {healthy}
    assert f"winner: {healthy}" in result.stdout


def test_ctrl_c_on_the_coordinator_leaves_workspace_and_lock_as_they_were(sweep_project, prefect_api, tmp_path):
    from tests.test_faults import environment_with_fault

    project = sweep_project
    lock, status = (project / "dvc.lock").read_bytes(), run_command(["git", "status", "--porcelain"], project).stdout
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    environment = environment_with_fault(project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause", FAULT_PAUSE_S=60)
    environment["TMPDIR"] = str(scratch)
    sweep = subprocess.Popen([*SWEEP, "-S", "train.learning_rate=0.002,0.003"], cwd=project, env=environment)
    try:
        wait_until(lambda: holding(scratch, sweep), 600, "training")
        sweep.send_signal(signal.SIGINT)  # Ctrl-C
        assert sweep.wait(timeout=120) != 0
    finally:
        sweep.kill()
    # Nothing of the candidates trains on as an orphan: their dvc and training died with the workers.
    wait_until(lambda: not candidate_processes(scratch), 30, "the candidates' processes to end")
    assert (project / "dvc.lock").read_bytes() == lock
    assert run_command(["git", "status", "--porcelain"], project).stdout == status
    assert not exp_show(project)  # nothing half-registered


def test_the_run_cache_push_leaves_uncached_outputs_behind_and_flows_run_cache_sends_them(project, tmp_path):
    remote = tmp_path / "remote"
    run_command([*DVC, "remote", "add", "-d", "store", str(remote)], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (metrics,) = [out for out in lock["stages"]["evaluate"]["outs"] if out["path"].endswith("metrics.json")]
    stored = remote / "files" / "md5" / metrics["md5"][:2] / metrics["md5"][2:]
    run_command([*DVC, "push", "--run-cache"], project)
    # The DVC behaviour flows.run_cache exists for: the records went, metrics.json's object did not.
    assert list((remote / "runs").rglob("*")) and not stored.exists()
    run_command([sys.executable, "-m", "flows.run_cache"], project)
    assert stored.exists()
