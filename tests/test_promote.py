"""Champion and challenger: the McNemar gate, and promotion through the real dvc and gto CLIs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from tasks.lib.params import PromoteParams
from tasks.promote import (
    ARTIFACT,
    PromotionError,
    compare,
    decide,
    fetch_at_revision,
    mcnemar_one_sided,
    next_version,
    prod_from_refs,
    required_gain,
)
from tests.conftest import (
    DVC,
    WEAK_TRAINING,
    cache_object,
    edit_params,
    git,
    run_command,
    seed_run_cache,
    shared_remote,
    wait_until,
)
from tests.test_faults import environment_with_fault, run_killed

GTO = [str(Path(sys.executable).with_name("gto"))]
PROMOTE = [sys.executable, "-m", "tasks.promote"]
PREDICT = [sys.executable, "-m", "tasks.predict"]


# ---- the statistics, against values computed by hand ----


def test_one_sided_mcnemar_matches_hand_computed_binomial_tails():
    assert mcnemar_one_sided(0, 5) == Fraction(1, 32)  # all 5 discordant pairs the challenger's: (1/2)^5
    assert mcnemar_one_sided(1, 9) == Fraction(1 + 10, 1024)  # P(X >= 9), X ~ Binomial(10, 1/2)
    assert mcnemar_one_sided(9, 1) == Fraction(1023, 1024)  # one-sided: a loss is no evidence of a gain
    assert mcnemar_one_sided(4, 4) == Fraction(70 + 56 + 28 + 8 + 1, 256) and mcnemar_one_sided(0, 0) == 1
    # A full-size test set: 10,000 images, 900 discordant pairs, no float underflow; exact.
    assert mcnemar_one_sided(470, 430) == Fraction(sum(comb(900, k) for k in range(430, 901)), 2**900)
    assert 0.05 < float(mcnemar_one_sided(430, 470)) < 0.15


def test_paired_comparison_counts_discordant_images():
    actual = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    champion = np.array([0, 1, 2, 3, 1, 1, 0, 0])  # right on 0-3, 5
    challenger = np.array([0, 1, 0, 3, 0, 1, 2, 3])  # right on all but 2
    result = compare(actual, champion, challenger)
    assert (result.champion_only, result.challenger_only) == (1, 3)
    assert (result.champion_accuracy, result.challenger_accuracy) == (5 / 8, 7 / 8)
    assert result.p_value == float(mcnemar_one_sided(1, 3)) == 5 / 16
    with pytest.raises(ValueError, match="one label per image"):
        compare(actual, champion[:4], challenger)


def paired(images: int, champion_correct: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of `images` test images with the given champion accuracy and discordant counts b, c."""
    actual = np.zeros(images, dtype=int)
    champion = np.where(np.arange(images) < champion_correct, 0, 1)
    challenger = champion.copy()
    challenger[:b] = 1  # b images only the champion gets right
    challenger[champion_correct : champion_correct + c] = 0  # c only the challenger
    return actual, champion, challenger


def test_gate_counts_images_at_the_min_gain_boundary_at_every_accuracy():
    gate = PromoteParams(min_gain=0.005, alpha=0.05)
    assert required_gain(0.005, 10_000) == 50 and required_gain(0.003, 1000) == 3  # not ceil(3.0000000000000004)
    # c - b = 50 of 10,000 is exactly min_gain: promoted at every champion accuracy from 0.80 to 0.90
    # (float subtraction of the accuracies refused it at 40 of these levels, e.g. 0.8130 - 0.8080).
    for correct in range(8000, 9001):
        promoted, reason = decide(compare(*paired(10_000, correct, b=0, c=50)), gate)
        assert promoted, (correct, reason)
    promoted, reason = decide(compare(*paired(10_000, 8080, b=0, c=49)), gate)
    assert not promoted and "c - b = 49 is below promote.min_gain = 0.005 (50 images)" in reason
    promoted, reason = decide(compare(*paired(10_000, 8080, b=30, c=30)), gate)
    assert not promoted and "below promote.min_gain" in reason  # b = c: no gain


def test_gate_promotes_only_a_gain_that_is_large_enough_and_significant():
    gate = PromoteParams(min_gain=0.01, alpha=0.05)
    promoted, reason = decide(None, gate)
    assert promoted and "no model is in prod" in reason
    promoted, reason = decide(compare(*paired(1000, 800, b=0, c=50)), gate)
    assert promoted and "significantly better" in reason and "b = 0, c = 50" in reason
    # b = 2, c = 9: one-sided p = 67/2048 = 0.033 promotes at alpha 0.05; the two-sided p (0.065),
    # which applied alpha/2 to a gain, refused it.
    promoted, reason = decide(compare(*paired(1000, 800, b=2, c=9)), PromoteParams(min_gain=0, alpha=0.05))
    assert promoted and "p = 0.0327" in reason, reason
    promoted, reason = decide(compare(*paired(1000, 800, b=2, c=9)), PromoteParams(min_gain=0, alpha=0.03))
    assert not promoted and "within noise" in reason
    promoted, reason = decide(compare(*paired(1000, 800, b=0, c=6)), gate)
    assert not promoted and "below promote.min_gain" in reason
    promoted, reason = decide(compare(*paired(1000, 800, b=100, c=0)), gate)
    assert not promoted and "the challenger is worse" in reason and "b = 100, c = 0" in reason


# ---- promotion end to end: real dvc, gto and git, a bare repository as the team's shared remote ----


def retrain(project: Path, **train) -> None:
    edit_params(project, "train", **train)
    run_command([*DVC, "repro"], project)


def decision(project: Path) -> dict:
    return json.loads((project / "artifacts/promotion/decision.json").read_text())


def promote(project: Path) -> dict:
    run_command(PROMOTE, project)
    return decision(project)


def prod(project: Path) -> dict:
    (current,) = json.loads(run_command([*GTO, "show", f"{ARTIFACT}#prod", "--json"], project).stdout)
    return current


def registry_refs(repository: Path) -> list[str]:
    """The registry's tags and promotion branches in a repository (a clone or the bare remote)."""
    listed = git(repository, "for-each-ref", "--format=%(refname)", "refs/tags", f"refs/heads/{ARTIFACT}")
    return sorted(listed.split())


@pytest.mark.long_running
def test_weak_model_then_strong_one_promoted_then_weak_one_refused_then_rolled_back(
    registry_project, weak_run_cache, tmp_path
):
    project, bare = registry_project, tmp_path / "shared.git"
    head, branch = git(project, "rev-parse", "HEAD"), git(project, "branch", "--show-current")
    # A model that has barely moved from its random start: the first champion, as nothing is in prod.
    # Its run comes from DVC's run cache, seeded once for the tests that promote or serve it.
    seed_run_cache(project, weak_run_cache)
    retrain(project, **WEAK_TRAINING)
    first = promote(project)
    assert first["decision"] == "promote" and first["champion"] is None
    assert prod(project)["version"] == first["version"] == "v0.1.0"
    # The tiny recipe as committed (DVC's run cache restores it): far better, so promoted.
    retrain(project, learning_rate=0.001, epochs=2)
    second = promote(project)
    assert second["decision"] == "promote", second["reason"]
    assert second["champion"]["version"] == "v0.1.0" and second["comparison"]["p_value"] < 0.05
    assert "one-sided exact McNemar" in second["gate"]["test"] and second["gate"]["required_gain_images"] == 1
    assert prod(project)["version"] == "v0.2.0"
    # The registry is the shared remote's: branches and tags pushed, the same refs there as here.
    assert (
        registry_refs(bare)
        == registry_refs(project)
        == [
            f"refs/heads/{ARTIFACT}/v0.1.0",
            f"refs/heads/{ARTIFACT}/v0.2.0",
            f"refs/tags/{ARTIFACT}#prod#1",
            f"refs/tags/{ARTIFACT}#prod#2",
            f"refs/tags/{ARTIFACT}@v0.1.0",
            f"refs/tags/{ARTIFACT}@v0.2.0",
        ]
    )
    # The weak model again: refused, with its McNemar numbers; prod stays.
    retrain(project, **WEAK_TRAINING)
    result = run_command(PROMOTE, project)
    third = decision(project)
    assert third["decision"] == "keep champion" and third["version"] is None
    comparison = third["comparison"]
    assert comparison["champion_only"] > comparison["challenger_only"]
    assert f"b = {comparison['champion_only']}, c = {comparison['challenger_only']}" in result.stderr
    assert prod(project)["version"] == "v0.2.0"
    # The user's branch never moved; each promotion is a commit on a branch of its own, with its record.
    assert (git(project, "rev-parse", "HEAD"), git(project, "branch", "--show-current")) == (head, branch)
    shown = git(project, "show", "cifar10-cnn/v0.2.0:artifacts/promotion/decision.json")
    assert json.loads(shown) == second
    card = git(project, "show", "cifar10-cnn/v0.2.0:artifacts/promotion/model-card.md")
    assert card.startswith("# Model card: cifar10-cnn v0.2.0") and "| circle |" in card
    # Rollback: prod goes back to v0.1.0, its model checked through DVC, the reason in the tag, pushed.
    run_command(["rm", "-rf", ".dvc/cache"], project)
    run_command([*PROMOTE, "--rollback", "--reason", "v0.2.0 mislabels trucks"], project)
    assert prod(project)["version"] == "v0.1.0"
    assert f"refs/tags/{ARTIFACT}#prod#3" in registry_refs(bare)
    assert "rollback from v0.2.0: v0.2.0 mislabels trucks" in git(project, "tag", "-n1", "-l", f"{ARTIFACT}#prod#3")
    predicted = run_command([*PREDICT, "source/test", "--model", "prod", "--out", "prod.csv"], project)
    assert "model prod" in predicted.stderr
    run_command([*PREDICT, "source/test", "--model", f"{ARTIFACT}@v0.1.0", "--out", "first.csv"], project)
    assert (project / "prod.csv").read_bytes() == (project / "first.csv").read_bytes()
    # The previous champion stays retrievable through the registry, from the DVC remote.
    out = project.parent / "v0.1.0.keras"
    run_command([*DVC, "artifacts", "get", ".", ARTIFACT, "--rev", "v0.1.0", "-o", str(out), "-q"], project)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == first["challenger"]["sha256"]


def test_a_second_clone_sees_the_same_prod_and_its_weaker_challenger_is_refused(
    registry_project, weak_run_cache, tmp_path
):
    project, bare = registry_project, tmp_path / "shared.git"
    promote(project)  # the tiny recipe: v0.1.0 from clone A
    colleague = tmp_path / "colleague"
    run_command(["git", "clone", "--quiet", str(bare), str(colleague)], tmp_path)
    git(colleague, "config", "user.name", "Colleague")
    git(colleague, "config", "user.email", "colleague@example.com")
    git(colleague, "fetch", "--quiet", "--tags")
    assert prod(colleague)["version"] == "v0.1.0" == prod(project)["version"]
    assert "v0.1.0" in run_command([*PROMOTE, "--show"], colleague).stdout
    run_command([*PREDICT, "source/test", "--model", "prod", "--out", "b.csv"], colleague)
    run_command([*PREDICT, "source/test", "--model", "prod", "--out", "a.csv"], project)
    assert (colleague / "b.csv").read_bytes() == (project / "a.csv").read_bytes()
    # Clone B trains a weaker model and tries to promote it: compared with A's champion, refused.
    seed_run_cache(colleague, weak_run_cache)
    retrain(colleague, **WEAK_TRAINING)
    refused = promote(colleague)
    assert refused["decision"] == "keep champion" and refused["champion"]["version"] == "v0.1.0", refused
    assert registry_refs(bare) == registry_refs(project)  # nothing new in the registry


def test_a_champion_trained_on_another_class_list_is_refused(registry_project):
    project = registry_project
    promote(project)
    (project / "source/train/stripes").rename(project / "source/train/bars")
    (project / "source/test/stripes").rename(project / "source/test/bars")
    run_command([*DVC, "repro"], project)
    run_command(["git", "add", "-A"], project)
    git(project, "commit", "-qm", "stripes are bars now")
    result = run_command(PROMOTE, project, check=False)
    assert result.returncode == 2, result.stderr
    assert "the champion v0.1.0 was trained on the classes ['circle', 'cross', 'square', 'stripes']" in result.stderr
    assert "the challenger on ['bars', 'circle', 'cross', 'square']" in result.stderr


def test_promotion_from_a_workspace_it_cannot_register_changes_nothing(registry_project):
    project = registry_project
    (project / "tasks/lib/model.py").write_text((project / "tasks/lib/model.py").read_text() + "\n# edited\n")
    result = run_command(PROMOTE, project, check=False)
    assert result.returncode == 2
    assert "cannot promote from this workspace" in result.stderr and "tasks/lib/model.py" in result.stderr
    assert not (project / "artifacts/promotion").exists()
    assert git(project, "tag") == "" and git(project, "branch", "--list", "cifar10-cnn/*") == ""
    subprocess.run(["git", "checkout", "--", "tasks/lib/model.py"], cwd=project, check=True)
    run_command([*DVC, "remote", "remove", "store"], project)
    git(project, "remote", "remove", "origin")
    result = run_command(PROMOTE, project, check=False)
    assert result.returncode == 2 and "no default DVC remote" in result.stderr
    assert "no git remote 'origin': the registry lives in the team's shared git remote" in result.stderr
    # Reading prod without the registry's remote: the same fix, in one line, exit 2.
    result = run_command([*PREDICT, "source/test", "--model", "prod"], project, check=False)
    assert result.returncode == 2 and "error: cannot read the registry: no git remote 'origin'" in result.stderr


def test_a_file_fetched_at_a_commit_comes_from_that_commit_and_a_missing_one_is_named_with_the_fix(project, tmp_path):
    head = git(project, "rev-parse", "HEAD")
    report = Path("data/prepared/report.json")
    recorded = (project / report).read_bytes()
    (project / report).write_text("{}")  # the workspace's copy is never what is fetched
    assert fetch_at_revision(project, report, head, tmp_path / "report.json").read_bytes() == recorded
    untracked = Path("data/prepared/no-such.json")
    with pytest.raises(PromotionError) as not_at_the_commit:
        fetch_at_revision(project, untracked, head, tmp_path / "no-such.json")
    cache_object(project, hashlib.md5(recorded).hexdigest()).unlink()  # tracked, but in no cache or remote
    with pytest.raises(PromotionError) as not_pushed:
        fetch_at_revision(project, report, head, tmp_path / "unpushed.json")
    for path, refused in ((untracked, not_at_the_commit), (report, not_pushed)):
        assert str(refused.value).startswith(f"{path} at {head[:12]}: DVC tracks no such path at that commit")
        assert str(refused.value).endswith("(was it pushed? dvc push)")


# Where a promotion can die, as FAULT_AT_TOOL/FAULT_WHEN of tests/test_faults.py's hooks.
KILL_POINTS = {
    "after the decision": ("dvc push", "before"),
    "after dvc push": ("dvc push", "after"),
    "after the branch": ("update-ref", "after"),
    "after the version tag": ("gto register", "after"),
    "after the stage tag": ("gto assign", "after"),
    "during the push": ("push --atomic", "during"),
    "after the push": ("push --atomic", "after"),
}


@pytest.mark.long_running
def test_a_promotion_killed_at_any_point_is_finished_or_cleaned_up_by_the_next(registry_project, tmp_path):
    project = registry_project
    for number, (point, (text, when)) in enumerate(KILL_POINTS.items()):
        # A registry of its own for each point: each promotion is the first champion, v0.1.0.
        bare = shared_remote(project, tmp_path / f"registry-{number}.git")
        run_killed(project, PROMOTE, FAULT_AT_TOOL=text, FAULT_WHEN=when)
        again = run_command(PROMOTE, project)
        assert "interrupted promotion of v0.1.0" in again.stderr, (point, again.stderr)
        assert prod(project)["version"] == decision(project)["version"] == "v0.1.0", point
        expected = [f"refs/heads/{ARTIFACT}/v0.1.0", f"refs/tags/{ARTIFACT}#prod#1", f"refs/tags/{ARTIFACT}@v0.1.0"]
        assert registry_refs(project) == registry_refs(bare) == expected, point
        pushed = git(bare, "show", f"{ARTIFACT}@v0.1.0:artifacts/promotion/decision.json")
        assert json.loads(pushed) == decision(project), point
        assert not (project / ".dvc/tmp/promotion.json").exists(), point


def test_two_promotions_at_once_one_refuses_and_changes_nothing(registry_project, tmp_path):
    project = registry_project
    slow = subprocess.Popen(
        PROMOTE,
        cwd=project,
        env=environment_with_fault(project, FAULT_AT_TOOL="dvc push", FAULT_WHEN="pause", FAULT_PAUSE_S=15),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: (project / ".dvc/tmp/flow.lock").exists(), 60, "the first promotion to take the lock")
    time.sleep(3)  # it has compared and is holding still before its push
    second = run_command(PROMOTE, project, check=False)
    assert second.returncode == 75, second.stderr
    assert "another pipeline run or promotion is in progress" in second.stderr
    assert registry_refs(tmp_path / "shared.git") == []
    assert slow.wait(timeout=120) == 0, slow.stdout.read()
    assert prod(project)["version"] == decision(project)["version"] == "v0.1.0"


def test_flow_with_promote_registers_the_first_champion_then_refuses_identical_and_worse(
    registry_project, weak_run_cache, prefect_api
):
    project = registry_project
    head = git(project, "rev-parse", "HEAD")
    result = run_command([sys.executable, "-m", "flows.pipeline", "--promote"], project)
    first = decision(project)
    assert first["decision"] == "promote" and first["branch"] == "cifar10-cnn/v0.1.0"
    assert "promote | " in result.stdout + result.stderr  # the gate's log is in the run's log
    assert prod(project)["version"] == "v0.1.0"
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "rev-parse", "cifar10-cnn/v0.1.0~1") == head
    refs = registry_refs(project)
    # The same model again (nothing reruns), then a worse one: both refused, nothing new anywhere.
    run_command([sys.executable, "-m", "flows.pipeline", "--promote"], project)
    assert decision(project)["decision"] == "keep champion"
    assert decision(project)["comparison"]["champion_only"] == decision(project)["comparison"]["challenger_only"] == 0
    seed_run_cache(project, weak_run_cache)
    edit_params(project, "train", **WEAK_TRAINING)
    run_command([sys.executable, "-m", "flows.pipeline", "--promote"], project)
    assert decision(project)["decision"] == "keep champion" and "worse" in decision(project)["reason"]
    assert registry_refs(project) == registry_refs(project.parent / "shared.git") == refs


def test_prod_is_read_from_gto_tags_as_gto_reads_them():
    commit_a, commit_b = "a" * 40, "b" * 40
    listing = "\n".join(
        [
            "1111\trefs/tags/cifar10-cnn@v0.1.0",
            f"{commit_a}\trefs/tags/cifar10-cnn@v0.1.0^{{}}",
            "2222\trefs/tags/cifar10-cnn@v0.2.0",
            f"{commit_b}\trefs/tags/cifar10-cnn@v0.2.0^{{}}",
            "3333\trefs/tags/cifar10-cnn#prod#1",
            f"{commit_a}\trefs/tags/cifar10-cnn#prod#1^{{}}",
            "4444\trefs/tags/cifar10-cnn#prod#10",
            f"{commit_b}\trefs/tags/cifar10-cnn#prod#10^{{}}",
            "5555\trefs/tags/cifar10-cnn#prod#9",
            f"{commit_a}\trefs/tags/cifar10-cnn#prod#9^{{}}",
        ]
    )
    assert prod_from_refs(listing) == ("v0.2.0", commit_b)  # 10 > 9: numbers, not strings
    unassigned = f"\n6666\trefs/tags/cifar10-cnn#prod!#11\n{commit_b}\trefs/tags/cifar10-cnn#prod!#11^{{}}"
    assert prod_from_refs(listing + unassigned) is None
    assert prod_from_refs("") is None


def test_the_next_version_follows_every_registered_or_deregistered_one(tmp_path):
    run_command(["git", "init", "-q"], tmp_path)
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "first")
    assert next_version(tmp_path) == "v0.1.0"  # nothing registered yet
    # As GTO names them: a registration, a deregistration (with its count), a stage tag, a deprecation.
    for tag in ("cifar10-cnn@v0.1.0", "cifar10-cnn@v0.10.0!#1", "cifar10-cnn#prod#1", "cifar10-cnn@deprecated#2"):
        git(tmp_path, "tag", tag)
    git(tmp_path, "tag", "another-model@v3.0.0")
    assert next_version(tmp_path) == "v0.11.0"
