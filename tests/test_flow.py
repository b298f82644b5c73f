"""The Prefect flow: same DAG as dvc.yaml, DVC as the only judge, dvc.lock as `dvc repro` leaves it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import PIPELINE, STAGES, describe_changes
from tests.conftest import ROOT, run_command
from tests.test_pipeline import DVC, edit_params

FLOW = [sys.executable, "-m", "flows.pipeline"]


def test_flow_and_dvc_yaml_agree_on_stages_and_order():
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [task.name for task in PIPELINE] == list(STAGES) == declared
    with Repo(str(ROOT)) as repo:
        planned = plan_repro(repo.index.graph, repo.stage.collect("evaluate"))
    order = [stage.addressing for stage in planned if not stage.addressing.endswith(".dvc")]
    assert order == list(STAGES)  # the flow's order is DVC's own execution order (data pointers aside)


def test_describe_changes_names_what_changed():
    status = [{"changed deps": {"params.yaml": {"train.epochs": "modified"}}}, "changed command"]
    assert describe_changes(status) == "changed deps: params.yaml ({'train.epochs': 'modified'}); changed command"


def flow_stages(output: str) -> dict[str, str]:
    """Per stage, 'running' or 'up to date', from the flow's log."""
    outcome = {}
    for stage in STAGES:
        if f"stage {stage}: running" in output:
            outcome[stage] = "running"
        elif f"stage {stage}: up to date" in output:
            outcome[stage] = "up to date"
    return outcome


@pytest.fixture
def project(tmp_path, reproduced) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(reproduced[0], copy, symlinks=True)
    return copy


def test_flow_after_repro_runs_nothing(project):
    result = run_command(FLOW, project)
    assert flow_stages(result.stderr + result.stdout) == dict.fromkeys(STAGES, "up to date")
    assert "up to date: no stage ran" in result.stderr + result.stdout
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_flow_reruns_what_dvc_would_and_leaves_the_same_lock(project, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(project, twin, symlinks=True)
    for copy in (project, twin):
        edit_params(copy, "train", epochs=3)
    result = run_command(FLOW, project)
    expected = {stage: "up to date" for stage in STAGES[:3]} | {stage: "running" for stage in STAGES[3:]}
    assert flow_stages(result.stderr + result.stdout) == expected
    assert "up to date" in run_command([*DVC, "status"], project).stdout
    run_command([*DVC, "repro"], twin)
    assert yaml.safe_load((project / "dvc.lock").read_text()) == yaml.safe_load((twin / "dvc.lock").read_text())


def test_flow_rejects_bad_params_before_any_work(project):
    edit_params(project, "train", epochs=0)
    lock_before = (project / "dvc.lock").read_bytes()
    result = run_command(FLOW, project, check=False)
    assert result.returncode != 0
    assert "train.epochs: Input should be greater than 0" in result.stderr + result.stdout
    assert flow_stages(result.stderr + result.stdout) == {}
    assert (project / "dvc.lock").read_bytes() == lock_before
