"""End to end through the real `dvc` CLI on a temporary git + DVC project with synthetic data."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from tests.conftest import DVC, build_cifar10_archive, edit_params, ran_stages, run_command

STAGES = ["ingest", "preprocess", "split", "train", "select_best", "evaluate"]


def test_first_repro_runs_every_stage_in_order(reproduced):
    project, output = reproduced
    assert ran_stages(output) == STAGES
    metrics = json.loads((project / "artifacts/metrics/metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.5  # four easy synthetic classes; chance is 0.25


def test_second_repro_runs_nothing_and_status_is_clean(project):
    result = run_command([*DVC, "repro"], project)
    assert ran_stages(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_train_param_change_reruns_train_and_below_only(project):
    edit_params(project, "train", epochs=3)
    status = json.loads(run_command([*DVC, "status", "--json"], project).stdout)
    assert sorted(status) == ["train"]  # downstream stages go stale only once train reruns
    result = run_command([*DVC, "repro"], project)
    assert ran_stages(result.stdout) == ["train", "select_best", "evaluate"]
    params_diff = json.loads(run_command([*DVC, "params", "diff", "--json"], project).stdout)
    assert params_diff["params.yaml"]["train.epochs"] == {"old": 2, "new": 3, "diff": 1}
    metrics_diff = json.loads(run_command([*DVC, "metrics", "diff", "--json", "--all"], project).stdout)
    assert "test.accuracy" in metrics_diff["artifacts/metrics/metrics.json"]
    run_command([*DVC, "plots", "show", "-o", "plots_html"], project)
    page = (project / "plots_html" / "index.html").read_text()
    assert "training_curves.png" in page and "Confusion" in page
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_same_params_give_identical_metrics(tmp_path, pristine, reproduced):
    second = tmp_path / "again"
    shutil.copytree(pristine, second, symlinks=True)
    run_command([*DVC, "repro"], second)
    for name in ("metrics.json", "confusion.json", "predictions.csv"):
        assert (second / "artifacts/metrics" / name).read_bytes() == (
            reproduced[0] / "artifacts/metrics" / name
        ).read_bytes()


def assert_fails_closed(project: Path, expected: str) -> None:
    """`dvc repro` exits non-zero, says `expected`, leaves dvc.lock alone; git + dvc checkout restore."""
    lock_before = (project / "dvc.lock").read_bytes()
    result = run_command([*DVC, "repro"], project, check=False)
    assert result.returncode != 0
    assert re.search(expected, result.stderr + result.stdout), result.stderr
    assert (project / "dvc.lock").read_bytes() == lock_before
    run_command(["git", "checkout", "--", "params.yaml", "artifacts"], project)
    run_command([*DVC, "checkout", "--force"], project)
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_unknown_params_key_fails_closed(project):
    edit_params(project, "train", epoch=3)
    assert_fails_closed(project, r"train\.epoch: unknown key")


def test_zero_epochs_fails_closed(project):
    edit_params(project, "train", epochs=0)
    assert_fails_closed(project, r"train\.epochs: Input should be greater than 0")


def test_corrupted_archive_fails_closed(project):
    (project / "broken.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    edit_params(project, "ingest", source="broken.zip")
    assert_fails_closed(project, r"broken\.zip: not a readable zip archive")


def test_wrong_checksum_fails_closed(project):
    with zipfile.ZipFile(project / "images.zip", "w") as archive:
        for path in sorted((project / "source").rglob("*.png")):
            archive.write(path, path.relative_to(project / "source").as_posix())
    edit_params(project, "ingest", source="images.zip", sha256="0" * 64)
    assert_fails_closed(project, r"images\.zip: sha256 is [0-9a-f]{64}, expected 0{64}")


def test_label_out_of_range_fails_closed(project):
    build_cifar10_archive(project / "cifar.tar.gz", bad_label=12)
    edit_params(project, "ingest", kind="cifar10_binary", source="cifar.tar.gz")
    assert_fails_closed(project, r"cifar\.tar\.gz:data_batch_1\.bin: labels \[12\] are out of range 0\.\.9")
