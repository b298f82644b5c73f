"""The pull-request report end to end in a temporary git repo, and the CI workflow's validity."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd

from tasks.lib.params import flatten_params
from tasks.promote import compare, mcnemar_two_sided
from tests.conftest import DVC, ROOT, edit_params, project_environment, run_command

WORKFLOW = ROOT / ".github" / "workflows" / "pipeline-report.yml"
PREDICTIONS = "artifacts/metrics/predictions.csv"
METRICS = "artifacts/metrics/metrics.json"
CHECK_WORKFLOW = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]


def change_run_commit_and_report(project, section: str, **changes) -> str:
    """Change params, `dvc repro`, commit, and return the report of HEAD against HEAD~1."""
    edit_params(project, section, **changes)
    run_command([*DVC, "repro"], project)
    return commit_and_report(project, f"{section}: {changes}")


def commit_and_report(project, message: str) -> str:
    """Commit the workspace as it is, and return the report of HEAD against HEAD~1."""
    run_command(["git", "add", "-A"], project)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", message], project)
    run_command(
        [sys.executable, "-m", "review.report", "--base", "HEAD~1", "--rev", "HEAD", "--out", "report"], project
    )
    return (project / "report" / "report.md").read_text()


def test_report_shows_param_metrics_plots_and_reruns(retrained_project):
    project = retrained_project  # train.epochs 2 -> 3, then `dvc repro`
    report = commit_and_report(project, "train: epochs 3")
    # Test accuracy's paired significance, computed here from the two committed prediction files.
    old, new = (
        pd.read_csv(io.StringIO(run_command(["git", "show", f"{rev}:{PREDICTIONS}"], project).stdout))
        for rev in ("HEAD~1", "HEAD")
    )
    expected = compare(old["actual"].to_numpy(), old["predicted"].to_numpy(), new["predicted"].to_numpy())
    assert f"{expected.champion_only} right only at `HEAD~1`, {expected.challenger_only} right only at `HEAD`" in report
    p_value = mcnemar_two_sided(expected.champion_only, expected.challenger_only)
    assert ("**significant at 0.05" if p_value < 0.05 else "**within noise**") in report
    assert "| `train.epochs` | 2 | 3 |" in report
    # Each metric that moved has its row; the rest are counted in one line.
    old_metrics, new_metrics = (
        flatten_params(json.loads(run_command(["git", "show", f"{rev}:{METRICS}"], project).stdout))
        for rev in ("HEAD~1", "HEAD")
    )
    moved = [key for key in new_metrics if new_metrics[key] != old_metrics.get(key)]
    for key in new_metrics:
        assert (f"| `{key}` |" in report) == (key in moved), key
    unchanged = len(new_metrics) - len(moved)
    assert (
        f"{unchanged} other metrics unchanged." if moved else f"No metric changed ({unchanged} unchanged)."
    ) in report
    for stage in ("train", "select_best", "evaluate"):
        assert f"| {stage} | yes |" in report and report.split(f"| {stage} | yes |")[1].split("\n")[0].endswith(
            "param `train.epochs` |"
        )
    for stage in ("ingest", "preprocess", "split"):
        assert f"| {stage} | no |" in report
    for image in ("training_curves.png", "confusion_HEAD_1.png", "confusion_HEAD.png"):
        assert f"]({image})" in report
        assert (project / "report" / image).read_bytes()[:4] == b"\x89PNG"
    # Each row of a metric that moved carries the right old, new and change.
    old, new = (committed_metrics(project, rev) for rev in ("HEAD~1", "HEAD"))
    for key in ("test.accuracy", "test.crossentropy", "validation.crossentropy"):
        section, name = key.split(".")
        before, after = old[section][name], new[section][name]
        row = f"| `{key}` | {before:.4f} | {after:.4f} | {after - before:.4f} |"
        assert (row in report) == (before != after), key


def committed_metrics(project, rev: str) -> dict:
    shown = subprocess.run(
        ["git", "show", f"{rev}:artifacts/metrics/metrics.json"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)


def report_rows(report: str) -> dict[str, str]:
    """The stages table: stage -> its whole row."""
    return {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "|" in line}


def test_report_traces_a_data_change_back_to_the_param_behind_it(project):
    rows = report_rows(change_run_commit_and_report(project, "ingest", max_per_class=10))
    # split reads data/prepared/dataset.npz, a file inside preprocess's output folder data/prepared.
    assert "`data/prepared/dataset.npz` changed (output of preprocess)" in rows["split"]
    for stage in ("preprocess", "split", "train", "evaluate"):
        assert rows[stage].endswith("| param `ingest.max_per_class` |"), rows[stage]


def test_report_of_a_revision_against_itself_says_nothing_changed(project):
    run_command(["git", "branch", "-f", "reviewed", "HEAD"], project)  # two names for one commit
    run_command(
        [sys.executable, "-m", "review.report", "--base", "reviewed", "--rev", "HEAD", "--out", "report"], project
    )
    report = (project / "report" / "report.md").read_text()
    assert "No params changed." in report and "No stage reran" in report


def test_report_on_unchanged_workspace_says_nothing_reran(project):
    run_command([sys.executable, "-m", "review.report", "--base", "HEAD", "--out", "report"], project)
    report = (project / "report" / "report.md").read_text()
    assert "No params changed." in report and "No stage reran" in report


def test_workflow_file_passes_the_github_schema(tmp_path):
    run_command([*CHECK_WORKFLOW, str(WORKFLOW)], tmp_path)
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04"))
    assert run_command([*CHECK_WORKFLOW, str(broken)], tmp_path, check=False).returncode != 0


def test_metrics_that_moved_with_no_input_change_name_the_environment():
    from review.report import StageSnapshot, environment_section

    stages = {"evaluate": StageSnapshot(cmd="x", outs=("m/metrics.json", "m/environment.json"))}
    moved = {
        "m/metrics.json": {"test.accuracy": {"old": 0.8384, "new": 0.8358}, "best_epoch": {"old": 4, "new": 4}},
        "m/environment.json": {"cpu_flags": {"old": "avx avx2 fma", "new": "avx avx2 fma avx512f"}},
    }
    lines = "\n".join(environment_section(moved, stages, reruns={}))
    assert "| `cpu_flags` | avx avx2 fma | avx avx2 fma avx512f |" in lines
    assert "**Root cause: environment.**" in lines
    # An input changed too: the environment is listed, but not called the cause.
    assert "Root cause" not in "\n".join(environment_section(moved, stages, reruns={"train": object()}))
    same = {"m/environment.json": {"cpu_flags": {"old": "avx2", "new": "avx2"}}}
    assert environment_section(same, stages, reruns={})[0].startswith("The metrics come from the same environment")


def test_report_shows_the_numerics_mode_and_the_environment_a_rerun_came_from(project):
    report = change_run_commit_and_report(project, "numerics", mode="native")
    assert "| `numerics.mode` | 'portable' | 'native' |" in report
    assert "| `numerics` | portable | native |" in report  # environment.json's record of it
    # Native mode takes the shell's oneDNN settings: the same commit, another environment (a cap
    # other than the one this shell may already set, as CI does to stand in for a CPU without AVX-512).
    shell_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    other_cap = "SSE41" if shell_cap.upper() == "AVX2" else "AVX2"
    environment = project_environment(project.parent) | {"ONEDNN_MAX_CPU_ISA": other_cap}
    run_command([*DVC, "repro", "--force", "--single-item", "evaluate"], project, environment=environment)
    run_command([sys.executable, "-m", "review.report", "--base", "HEAD", "--out", "report"], project)
    report = (project / "report" / "report.md").read_text()
    assert f"| `onednn_max_cpu_isa` | {shell_cap} | {other_cap} |" in report
    assert "No stage reran" in report


def test_metrics_section_lists_what_moved_and_counts_the_rest():
    from review.report import metrics_section

    moved = {"old": 0.81, "new": 0.82, "diff": 0.01}
    same = {"old": 0.5, "new": 0.5, "diff": 0.0}
    diff = {"m.json": {"per_class.cat.f1": same, "test.accuracy": moved, "validation.loss": same, "best_epoch": same}}
    lines = metrics_section(diff, "m.json")
    assert lines == [
        "| metric | old | new | change |",
        "| --- | --- | --- | --- |",
        "| `test.accuracy` | 0.8100 | 0.8200 | 0.0100 |",
        "",
        "3 other metrics unchanged.",
    ]
    assert metrics_section({"m.json": {"test.accuracy": same, "best_epoch": same}}, "m.json") == [
        "No metric changed (2 unchanged)."
    ]
