"""Champion and challenger: the McNemar gate, and promotion through the real dvc and gto CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from tasks.params import PromoteParams
from tasks.promote import ARTIFACT, compare, decide, mcnemar_exact
from tests.conftest import DVC, edit_params, run_command

GTO = [str(Path(sys.executable).with_name("gto"))]
PROMOTE = [sys.executable, "-m", "tasks.promote"]


# ---- the statistics, against values computed by hand ----


def test_mcnemar_exact_matches_hand_computed_binomial_tails():
    assert mcnemar_exact(0, 5) == 2 / 32  # all 5 discordant pairs one way: 2 * (1/2)^5
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)  # 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)  # two-sided: symmetric
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped; nothing discordant
    # A full-size test set: 10,000 images, 900 discordant pairs, no float underflow; exact to the last bit.
    exact = 2 * Fraction(sum(comb(900, k) for k in range(431)), 2**900)
    assert mcnemar_exact(430, 470) == float(exact)
    assert 0.1 < mcnemar_exact(430, 470) < 0.3


def test_paired_comparison_counts_discordant_images():
    actual = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    champion = np.array([0, 1, 2, 3, 1, 1, 0, 0])  # right on 0-3, 5
    challenger = np.array([0, 1, 0, 3, 0, 1, 2, 3])  # right on all but 2
    result = compare(actual, champion, challenger)
    assert (result.champion_only, result.challenger_only) == (1, 3)
    assert (result.champion_accuracy, result.challenger_accuracy) == (5 / 8, 7 / 8)
    assert result.p_value == mcnemar_exact(1, 3) == 2 * 5 / 16
    with pytest.raises(ValueError, match="one label per image"):
        compare(actual, champion[:4], challenger)


def test_gate_promotes_only_a_gain_that_is_large_enough_and_significant():
    gate = PromoteParams(min_gain=0.01, alpha=0.05)
    promoted, reason = decide(None, gate)
    assert promoted and "no model is in prod" in reason
    actual = np.zeros(1000, dtype=int)
    champion = np.where(np.arange(1000) < 800, 0, 1)  # 80.0 %
    significant = np.where(np.arange(1000) < 850, 0, 1)  # 85.0 %: c = 50, b = 0
    promoted, reason = decide(compare(actual, champion, significant), gate)
    assert promoted and "significantly better" in reason and "b = 0, c = 50" in reason
    noisy = np.where((np.arange(1000) < 805) | (np.arange(1000) == 999), 0, 1)  # 80.6 %: c = 6, b = 0, p = 0.03
    promoted, reason = decide(compare(actual, champion, noisy), PromoteParams(min_gain=0.001, alpha=0.01))
    assert not promoted and "within noise" in reason
    promoted, reason = decide(compare(actual, champion, noisy), gate)
    assert not promoted and "below promote.min_gain" in reason
    worse = np.where(np.arange(1000) < 700, 0, 1)
    promoted, reason = decide(compare(actual, champion, worse), gate)
    assert not promoted and "the challenger is worse" in reason and "b = 100, c = 0" in reason


# ---- promotion end to end: real dvc, gto and git in a temporary repository ----


def git(project: Path, *arguments: str) -> str:
    return run_command(["git", *arguments], project).stdout.strip()


@pytest.fixture
def registry_project(project, tmp_path):
    """The reproduced tiny project with a git identity and a local DVC remote, as promotion needs."""
    git(project, "config", "user.name", "Pipeline Test")
    git(project, "config", "user.email", "pipeline@example.com")
    run_command([*DVC, "remote", "add", "-d", "store", str(tmp_path / "dvc-remote")], project)
    git(project, "commit", "-qam", "DVC remote")
    return project


def retrain(project: Path, **train) -> None:
    edit_params(project, "train", **train)
    run_command([*DVC, "repro"], project)


def promote(project: Path) -> dict:
    run_command(PROMOTE, project)
    return json.loads((project / "artifacts/promotion/decision.json").read_text())


def prod(project: Path) -> dict:
    (current,) = json.loads(run_command([*GTO, "show", f"{ARTIFACT}#prod", "--json"], project).stdout)
    return current


def test_weak_model_then_strong_one_promoted_then_weak_one_refused(registry_project):
    project = registry_project
    head, branch = git(project, "rev-parse", "HEAD"), git(project, "branch", "--show-current")
    # A model that has barely moved from its random start: the first champion, as nothing is in prod.
    retrain(project, learning_rate=1e-7, epochs=1)
    first = promote(project)
    assert first["decision"] == "promote" and first["champion"] is None
    assert prod(project)["version"] == first["version"] == "v0.1.0"
    # The tiny recipe as committed (DVC's run cache restores it): far better, so promoted.
    retrain(project, learning_rate=0.001, epochs=2)
    second = promote(project)
    assert second["decision"] == "promote", second["reason"]
    assert second["champion"]["version"] == "v0.1.0" and second["comparison"]["p_value"] < 0.05
    assert prod(project)["version"] == "v0.2.0"
    # The weak model again: refused, with its McNemar numbers; prod stays.
    retrain(project, learning_rate=1e-7, epochs=1)
    result = run_command(PROMOTE, project)
    third = json.loads((project / "artifacts/promotion/decision.json").read_text())
    assert third["decision"] == "keep champion" and third["version"] is None
    comparison = third["comparison"]
    assert comparison["champion_only"] > comparison["challenger_only"]
    assert f"b = {comparison['champion_only']}, c = {comparison['challenger_only']}" in result.stderr
    assert prod(project)["version"] == "v0.2.0"
    # The user's branch never moved; each promotion is a commit on a branch of its own, with its record.
    assert (git(project, "rev-parse", "HEAD"), git(project, "branch", "--show-current")) == (head, branch)
    shown = git(project, "show", "cifar10-cnn/v0.2.0:artifacts/promotion/decision.json")
    assert json.loads(shown)["version"] == "v0.2.0"
    card = git(project, "show", "cifar10-cnn/v0.2.0:artifacts/promotion/model-card.md")
    assert card.startswith("# Model card: cifar10-cnn v0.2.0") and "| circle |" in card
    # The previous champion stays retrievable through the registry, from the DVC remote.
    run_command(["rm", "-rf", ".dvc/cache"], project)
    out = project.parent / "v0.1.0.keras"
    run_command([*DVC, "artifacts", "get", ".", ARTIFACT, "--rev", "v0.1.0", "-o", str(out), "-q"], project)
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == first["challenger"]["sha256"]


def test_promotion_from_a_workspace_it_cannot_register_changes_nothing(registry_project):
    project = registry_project
    (project / "tasks" / "model.py").write_text((project / "tasks" / "model.py").read_text() + "\n# edited\n")
    result = run_command(PROMOTE, project, check=False)
    assert result.returncode == 2
    assert "cannot promote from this workspace" in result.stderr and "tasks/model.py" in result.stderr
    assert not (project / "artifacts/promotion").exists()
    assert git(project, "tag") == "" and git(project, "branch", "--list", "cifar10-cnn/*") == ""
    subprocess.run(["git", "checkout", "--", "tasks/model.py"], cwd=project, check=True)
    run_command([*DVC, "remote", "remove", "store"], project)
    result = run_command(PROMOTE, project, check=False)
    assert result.returncode == 2 and "no default DVC remote" in result.stderr


def test_flow_with_promote_registers_the_first_champion_on_its_own_branch(registry_project, prefect_api):
    project = registry_project
    head = git(project, "rev-parse", "HEAD")
    result = run_command([sys.executable, "-m", "flows.pipeline", "--promote"], project)
    decision = json.loads((project / "artifacts/promotion/decision.json").read_text())
    assert decision["decision"] == "promote" and decision["branch"] == "cifar10-cnn/v0.1.0"
    assert "promote | " in result.stdout + result.stderr  # the gate's log is in the run's log
    assert prod(project)["version"] == "v0.1.0"
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "rev-parse", "cifar10-cnn/v0.1.0~1") == head
