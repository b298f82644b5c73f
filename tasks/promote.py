"""Promote: the workspace's evaluated model replaces the one in `prod` only when it is significantly better.

    python -m tasks.promote          # challenger (this workspace) against champion (prod); register a winner
    python -m tasks.promote --show   # the model's registered versions and which one is in prod

Both models predict the same test images; an exact McNemar test on the images where they
disagree decides whether the gain is real. With no champion yet, the challenger is promoted.
A winner is committed on a branch of its own (dvc.lock, metrics, the decision and a model
card; the checked-out branch never moves), its outputs are pushed to the DVC remote, and GTO
tags register it as a new version and assign it to `prod`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.cli import run_stage, run_tool
from tasks.io import (
    DataError,
    atomic_path,
    read_arrays,
    read_class_names,
    read_json,
    read_table,
    verify_sha256,
    write_json,
)
from tasks.model_files import load_model
from tasks.params import Params, PromoteParams

log = logging.getLogger(__name__)

ARTIFACT = "cifar10-cnn"  # the model's name under `artifacts:` in dvc.yaml and in GTO's tags
STAGE = "prod"


class PromotionError(DataError):
    """The workspace or the registry is in a state where the model cannot be compared or registered."""


@dataclass(frozen=True)
class Comparison:
    images: int
    champion_accuracy: float
    challenger_accuracy: float
    champion_only: int  # b: images the champion gets right and the challenger wrong
    challenger_only: int  # c: the other way round
    p_value: float

    @property
    def gain(self) -> float:
        return self.challenger_accuracy - self.champion_accuracy


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c trials at 1/2."""
    trials = b + c
    if trials == 0:
        return 1.0
    # Integer sums, then one division: exact for any test-set size (no float underflow).
    tail = sum(math.comb(trials, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**trials)


def compare(actual: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> Comparison:
    """Pair two models' predicted labels per test image: accuracies, discordant counts, McNemar p."""
    if not actual.shape == champion.shape == challenger.shape:
        shapes = f"{actual.shape}, {champion.shape}, {challenger.shape}"
        raise ValueError(f"paired predictions need one label per image of one test set: {shapes}")
    champion_right, challenger_right = champion == actual, challenger == actual
    b = int(np.sum(champion_right & ~challenger_right))
    c = int(np.sum(~champion_right & challenger_right))
    return Comparison(
        images=int(actual.size),
        champion_accuracy=float(champion_right.mean()),
        challenger_accuracy=float(challenger_right.mean()),
        champion_only=b,
        challenger_only=c,
        p_value=mcnemar_exact(b, c),
    )


def decide(comparison: Comparison | None, promote: PromoteParams) -> tuple[bool, str]:
    """(promote?, the reason in one sentence) from the paired comparison and the gate's params."""
    if comparison is None:
        return True, f"no model is in {STAGE} yet: the challenger becomes the first champion"
    numbers = (
        f"challenger {comparison.challenger_accuracy:.4f} vs champion {comparison.champion_accuracy:.4f} "
        f"on {comparison.images} test images (b = {comparison.champion_only}, c = {comparison.challenger_only}, "
        f"exact McNemar p = {comparison.p_value:.3g})"
    )
    if comparison.gain < 0:
        return False, f"the challenger is worse: {numbers}"
    if comparison.gain < promote.min_gain:
        return False, f"the gain is below promote.min_gain = {promote.min_gain}: {numbers}"
    if comparison.p_value >= promote.alpha:
        return False, f"the gain is within noise (p >= promote.alpha = {promote.alpha}): {numbers}"
    return True, f"the challenger is significantly better: {numbers}"


# ---- IO at the edges: git, GTO and DVC command lines ----


def command(arguments: list[str], root: Path, *, what: str, environment: dict | None = None) -> str:
    """Run a git/gto/dvc command in `root`; its stdout, or PromotionError naming `what` failed and why."""
    return run_tool(arguments, root, what=what, error=PromotionError, environment={**os.environ, **(environment or {})})


def tool(name: str) -> str:
    """A console script installed beside this interpreter (gto, dvc), so the venv's copy runs."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def champion_version(root: Path) -> dict | None:
    """The registry's current `prod` version ({version, commit_hexsha, ...}), or None when none is assigned."""
    artifacts = json.loads(command([tool("gto"), "show", "--json"], root, what="reading the registry"))
    in_stage = artifacts.get(ARTIFACT, {}).get("stage", {}).get(STAGE)
    if in_stage is None:
        return None
    versions = json.loads(command([tool("gto"), "show", ARTIFACT, "--json"], root, what="reading the registry"))
    return next(item for item in versions if item["version"] == in_stage)


def fetch_at_revision(root: Path, path: Path, revision: str, destination: Path) -> Path:
    """The DVC-tracked `path` (a file, or a folder such as the model's) as of git `revision`, never the workspace's."""
    command(
        [tool("dvc"), "get", ".", path.as_posix(), "--rev", revision, "-o", str(destination), "-q"],
        root,
        what=f"fetching {path} at {revision[:12]} from DVC's cache or remote (was it pushed?)",
    )
    return destination


def predicted_labels(model_path: Path, sha256: str, images: np.ndarray) -> np.ndarray:
    """The class index `model_path` predicts per image, after checking the file is the one recorded."""
    from tasks.model import predict_in_batches  # imports Keras: after run_stage has set the numerics

    model = load_model(model_path, sha256=sha256)
    return predict_in_batches(model, images, batch_size=500).argmax(axis=1)


def registering_problems(root: Path, params: Params) -> list[str]:
    """Why a winner could not be committed, pushed and registered from this workspace (empty: it can)."""
    problems = []
    try:
        head = command(["git", "rev-parse", "--verify", "HEAD"], root, what="reading HEAD").strip()
    except PromotionError:
        return ["the workspace is not a git repository with a commit: GTO registers commits"]
    for key in ("user.name", "user.email"):
        if subprocess.run(["git", "config", key], cwd=root, capture_output=True).returncode != 0:
            problems.append(f"git {key} is not set: GTO's tags need an author (git config {key} ...)")
    if subprocess.run([tool("dvc"), "remote", "default"], cwd=root, capture_output=True).returncode != 0:
        problems.append("no default DVC remote: the model could not be fetched elsewhere (dvc remote add -d ...)")
    stale = json.loads(command([tool("dvc"), "status", "--json"], root, what="checking the pipeline"))
    if stale:
        problems.append(f"the pipeline is not up to date ({', '.join(sorted(stale))}): run `dvc repro` first")
    changed = [path for path in changed_files(root, head) if not is_pipeline_record(path, params)]
    if changed:
        problems.append(f"files other than the pipeline's records changed since HEAD: commit them first: {changed}")
    return problems


def changed_files(root: Path, head: str) -> list[str]:
    """Tracked files that differ from `head` in the workspace."""
    return command(["git", "diff", "--name-only", head], root, what="listing changes").split()


def untracked_files(root: Path) -> list[str]:
    """Files git does not track and does not ignore."""
    return command(["git", "ls-files", "--others", "--exclude-standard"], root, what="listing new files").split()


def is_pipeline_record(path: str, params: Params) -> bool:
    """Whether `path` is written by the pipeline (lock, params, uncached metrics and plots) or by promote."""
    folders = (params.paths.metrics, params.paths.training, params.paths.promotion)
    return path in ("dvc.lock", "params.yaml") or any(Path(path).is_relative_to(folder) for folder in folders)


def commit_on_branch(root: Path, branch: str, files: list[str], message: str) -> str:
    """Commit HEAD plus the workspace's `files` on a new `branch`; HEAD, index and checkout stay as they are."""
    with tempfile.TemporaryDirectory() as scratch:
        # A private index: the user's staged changes are neither committed nor disturbed.
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        command(["git", "read-tree", "HEAD"], root, what="preparing the commit", environment=index)
        command(["git", "add", "--force", "--", *files], root, what="preparing the commit", environment=index)
        tree = command(["git", "write-tree"], root, what="preparing the commit", environment=index).strip()
    commit = command(["git", "commit-tree", tree, "-p", "HEAD", "-m", message], root, what="committing").strip()
    # The empty old value makes git refuse to overwrite a branch that already exists.
    command(["git", "update-ref", f"refs/heads/{branch}", commit, ""], root, what=f"creating branch {branch}")
    return commit


def next_version(root: Path) -> str:
    """The next minor version after every registered one (v0.1.0 for the first)."""
    try:
        shown = command([tool("gto"), "show", ARTIFACT, "--json"], root, what="reading the registry")
    except PromotionError:
        return "v0.1.0"  # GTO knows no such artifact yet
    numbers = [tuple(int(part) for part in item["version"].lstrip("v").split(".")) for item in json.loads(shown)]
    major, minor, _ = max(numbers, default=(0, 0, 0))
    return f"v{major}.{minor + 1}.0"


def register(root: Path, commit: str, version: str) -> None:
    """Register `commit` as `version` of the model (a git tag) and assign it to `prod` (another)."""
    command([tool("gto"), "register", ARTIFACT, commit, "--version", version], root, what="registering the model")
    command([tool("gto"), "assign", ARTIFACT, "--version", version, "--stage", STAGE], root, what=f"assigning {STAGE}")


def model_card(params: Params, decision: dict, metrics: dict, environment: dict) -> str:
    """A markdown card for a promoted model: data, params, metrics per class, the decision, the environment."""
    per_class = "\n".join(
        f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} |"
        for name, row in metrics["per_class"].items()
    )
    train = "\n".join(f"| `train.{key}` | {value} |" for key, value in params.train.model_dump().items())
    environment_rows = "\n".join(f"| {key} | {value} |" for key, value in environment.items())
    return f"""# Model card: {ARTIFACT} {decision["version"]}

Promoted to `{STAGE}`: {decision["reason"]}.

- Model: `{decision["challenger"]["path"]}`, sha256 `{decision["challenger"]["sha256"]}`
- Champion it replaces: {decision["champion"]["version"] if decision["champion"] else "none"}
- Data: `{params.ingest.source}` ({params.ingest.kind}), sha256 `{params.ingest.sha256}`; seed {params.seed}
- Test accuracy {metrics["test"]["accuracy"]}, cross-entropy {metrics["test"]["crossentropy"]}, macro F1 \
{metrics["test"]["macro_f1"]}; validation accuracy {metrics["validation"]["accuracy"]} (epoch {metrics["best_epoch"]})

## Metrics per class (test set)

| class | precision | recall | F1 |
| --- | --- | --- | --- |
{per_class}

## Training params

| param | value |
| --- | --- |
{train}

## Environment

| | |
| --- | --- |
{environment_rows}
"""


def run(params: Params, root: Path | None = None) -> list[Path]:
    """Compare the workspace's evaluated model with prod's, write the decision, and register a winner."""
    root = (root or Path.cwd()).resolve()
    problems = registering_problems(root, params)
    if problems:
        raise PromotionError("cannot promote from this workspace:\n  " + "\n  ".join(problems))
    challenger_path = params.paths.model / "model.keras"
    challenger_sha256 = read_json(params.paths.model / "best.json", required=("sha256",))["sha256"]
    verify_sha256(challenger_path, challenger_sha256)  # the model select_best chose, unchanged since
    test = read_arrays(params.paths.prepared / "dataset.npz", ("x_test", "y_test"))
    class_names = read_class_names(params.paths.prepared / "report.json")
    evaluated = read_table(params.paths.metrics / "predictions.csv")
    if not np.array_equal(evaluated["actual"].to_numpy(), np.asarray(class_names)[test["y_test"]]):
        raise PromotionError(f"{params.paths.metrics / 'predictions.csv'}: not the predictions of this test set")
    index = {name: label for label, name in enumerate(class_names)}
    challenger = evaluated["predicted"].map(index).to_numpy(dtype=np.int64)
    champion = champion_version(root)
    comparison = None
    if champion is not None:
        with tempfile.TemporaryDirectory() as scratch:
            folder = fetch_at_revision(root, params.paths.model, champion["commit_hexsha"], Path(scratch) / "model")
            champion_sha256 = read_json(folder / "best.json", required=("sha256",))["sha256"]
            log.info("champion %s: predicting %d test images", champion["version"], test["y_test"].size)
            champion_labels = predicted_labels(folder / "model.keras", champion_sha256, test["x_test"])
        champion = {"version": champion["version"], "commit": champion["commit_hexsha"], "sha256": champion_sha256}
        comparison = compare(test["y_test"].astype(np.int64), champion_labels, challenger)
    promoted, reason = decide(comparison, params.promote)
    decision = {
        "decision": "promote" if promoted else "keep champion",
        "reason": reason,
        "challenger": {"path": challenger_path.as_posix(), "sha256": challenger_sha256},
        "champion": champion,
        "comparison": asdict(comparison) if comparison else None,
        "gate": params.promote.model_dump(),
        "version": None,
        "branch": None,
    }
    log.info("%s: %s", decision["decision"], reason)
    folder = root / params.paths.promotion
    if not promoted:
        return [write_json(folder / "decision.json", decision)]
    return promote_winner(root, params, decision, folder)


def promote_winner(root: Path, params: Params, decision: dict, folder: Path) -> list[Path]:
    """Write decision and card, push outputs, commit them on a branch, register and assign prod; undo on failure."""
    command([tool("dvc"), "push", "-q"], root, what="pushing the pipeline's outputs to the DVC remote")
    version = next_version(root)
    branch = f"{ARTIFACT}/{version}"
    decision = decision | {"version": version, "branch": branch}
    metrics = read_json(params.paths.metrics / "metrics.json")
    environment = read_json(params.paths.metrics / "environment.json")
    written = [write_json(folder / "decision.json", decision)]
    with atomic_path(folder / "model-card.md") as temporary:
        temporary.write_text(model_card(params, decision, metrics, environment))
    written.append(folder / "model-card.md")
    new_records = [path for path in untracked_files(root) if is_pipeline_record(path, params)]
    commit = commit_on_branch(
        root,
        branch,
        sorted({*changed_files(root, "HEAD"), *new_records}),
        f"Promote {ARTIFACT} {version}: {decision['reason']}",
    )
    try:
        register(root, commit, version)
    except PromotionError:
        # Not half done: without its tags the branch would claim a version that does not exist.
        subprocess.run(["git", "tag", "-d", f"{ARTIFACT}@{version}"], cwd=root, capture_output=True)
        subprocess.run(["git", "branch", "-D", branch], cwd=root, capture_output=True)
        raise
    log.info(
        "registered %s %s (commit %s on branch %s) and assigned it to %s", ARTIFACT, version, commit[:12], branch, STAGE
    )
    return written


def show(params: Params) -> list[Path]:
    """Print the model's registered versions and stages (GTO's table)."""
    print(command([tool("gto"), "show", ARTIFACT], Path.cwd(), what="reading the registry"), end="")
    return []


def main() -> None:
    """Entry point for `python -m tasks.promote`."""
    run_stage({"run": run, "show": show}, __doc__)


if __name__ == "__main__":
    main()
