"""The pull-request report end to end in a temporary git repo, and the CI workflow's validity."""

from __future__ import annotations

import sys

from tests.conftest import DVC, ROOT, edit_params, run_command

WORKFLOW = ROOT / ".github" / "workflows" / "pipeline-report.yml"
CHECK_WORKFLOW = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]


def test_report_shows_param_metrics_plots_and_reruns(project):
    edit_params(project, "train", epochs=3)
    run_command([*DVC, "repro"], project)
    run_command(["git", "add", "-A"], project)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "three epochs"], project)

    run_command(
        [sys.executable, "-m", "review.report", "--base", "HEAD~1", "--rev", "HEAD", "--out", "report"], project
    )
    report = (project / "report" / "report.md").read_text()
    assert "| `train.epochs` | 2 | 3 |" in report
    assert "| `test.accuracy` |" in report and "| `per_class.circle.f1` |" in report
    for stage in ("train", "select_best", "evaluate"):
        assert f"| {stage} | yes |" in report and report.split(f"| {stage} | yes |")[1].split("\n")[0].endswith(
            "param `train.epochs` |"
        )
    for stage in ("ingest", "preprocess", "split"):
        assert f"| {stage} | no |" in report
    for image in ("training_curves.png", "confusion_HEAD_1.png", "confusion_HEAD.png"):
        assert f"]({image})" in report
        assert (project / "report" / image).read_bytes()[:4] == b"\x89PNG"


def test_report_on_unchanged_workspace_says_nothing_reran(project):
    run_command([sys.executable, "-m", "review.report", "--base", "HEAD", "--out", "report"], project)
    report = (project / "report" / "report.md").read_text()
    assert "No params changed." in report and "No stage reran" in report


def test_workflow_file_passes_the_github_schema(tmp_path):
    run_command([*CHECK_WORKFLOW, str(WORKFLOW)], tmp_path)
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04"))
    assert run_command([*CHECK_WORKFLOW, str(broken)], tmp_path, check=False).returncode != 0
