"""The Prefect flow: same DAG as dvc.yaml, DVC as the only judge, dvc.lock as `dvc repro` leaves it."""

from __future__ import annotations

import shutil

import pytest
import yaml

from flows.pipeline import PIPELINE, STAGES, describe_changes
from tests.conftest import DVC, FLOW, ROOT, edit_params, project_environment, run_command

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
    from tasks.params import Params

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: set(stage.get("params", [])) for name, stage in stages.items()}
    assert declared == {
        "ingest": {"ingest"},
        "preprocess": set(),
        "split": {"seed", "split"},
        "train": {"seed", "train"},
        "select_best": {"select_best"},
        "evaluate": set(),
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
