"""Promote: the workspace's evaluated model replaces the one in `prod` only when it is significantly better.

    python -m tasks.promote                      # challenger (this workspace) against champion (prod)
    python -m tasks.promote --show               # the registered versions and which one is in prod
    python -m tasks.promote --rollback [--reason TEXT]   # prod back to the version before it

Both models predict the same test images, each scored with its own class list; a one-sided
exact McNemar test on the images where they disagree decides whether the gain is real. With
no champion yet, the challenger is promoted. A winner is committed on a branch of its own
(dvc.lock, metrics, the decision and a model card; the checked-out branch never moves), its
outputs are pushed to the DVC remote, GTO tags register it as a new version and assign it to
`prod`, and the branch and tags go to the registry's git remote (promote.remote) in one atomic
push: every clone that fetches sees the same registry, and a promotion is there whole or not
at all. A promotion killed at any point is finished or cleaned up by the next one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tasks.lib.cli import run_stage, run_tool
from tasks.lib.io import (
    DataError,
    WorkspaceBusyError,
    atomic_path,
    read_arrays,
    read_class_names,
    read_json,
    read_table,
    verify_sha256,
    write_json,
)
from tasks.lib.model_files import load_model
from tasks.lib.params import Params, PromoteParams
from tasks.lib.workspace import exclusive_workspace

log = logging.getLogger(__name__)

ARTIFACT = "cifar10-cnn"  # the model's name under `artifacts:` in dvc.yaml and in GTO's tags
STAGE = "prod"


class PromotionError(DataError):
    """The workspace or the registry is in a state where the model cannot be compared or registered."""


class RegistryBusyError(WorkspaceBusyError):
    """The registry's remote refused the promotion's push (another clone promoted first): try again."""


@dataclass(frozen=True)
class Comparison:
    images: int
    champion_correct: int
    challenger_correct: int
    champion_only: int  # b: images the champion gets right and the challenger wrong
    challenger_only: int  # c: the other way round
    p_value: float  # one-sided exact McNemar: P(X >= c) for X ~ Binomial(b + c, 1/2)

    @property
    def champion_accuracy(self) -> float:
        return self.champion_correct / self.images

    @property
    def challenger_accuracy(self) -> float:
        return self.challenger_correct / self.images


def mcnemar_one_sided(b: int, c: int) -> Fraction:
    """One-sided exact McNemar p (alternative: the challenger is better): P(X >= c), X ~ Binomial(b + c, 1/2)."""
    trials = b + c
    if trials == 0:
        return Fraction(1)
    # Integers, then one exact fraction: no float underflow for any test-set size.
    return Fraction(sum(math.comb(trials, k) for k in range(c, trials + 1)), 2**trials)


def mcnemar_two_sided(b: int, c: int) -> Fraction:
    """Two-sided exact McNemar p (do the two models differ at all?): twice the smaller binomial tail, at most 1."""
    trials = b + c
    if trials == 0:
        return Fraction(1)
    return min(Fraction(1), 2 * Fraction(sum(math.comb(trials, k) for k in range(min(b, c) + 1)), 2**trials))


def compare(actual: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> Comparison:
    """Pair two models' predicted labels per test image: correct counts, discordant counts, McNemar p."""
    if not actual.shape == champion.shape == challenger.shape:
        shapes = f"{actual.shape}, {champion.shape}, {challenger.shape}"
        raise ValueError(f"paired predictions need one label per image of one test set: {shapes}")
    champion_right, challenger_right = champion == actual, challenger == actual
    b = int(np.sum(champion_right & ~challenger_right))
    c = int(np.sum(~champion_right & challenger_right))
    return Comparison(
        images=int(actual.size),
        champion_correct=int(champion_right.sum()),
        challenger_correct=int(challenger_right.sum()),
        champion_only=b,
        challenger_only=c,
        p_value=float(mcnemar_one_sided(b, c)),
    )


def required_gain(min_gain: float, images: int) -> int:
    """The fewest more correct images (c - b) that make a gain of `min_gain` on `images` test images."""
    # The fraction the user wrote (0.005 as 5/1000, not its binary float): 50 images of 10,000 is enough.
    return math.ceil(Fraction(repr(min_gain)) * images)


def decide(comparison: Comparison | None, promote: PromoteParams) -> tuple[bool, str]:
    """(promote?, the reason in one sentence) from the paired comparison and the gate's params."""
    if comparison is None:
        return True, f"no model is in {STAGE} yet: the challenger becomes the first champion"
    b, c = comparison.champion_only, comparison.challenger_only
    needed = required_gain(promote.min_gain, comparison.images)
    p_value = mcnemar_one_sided(b, c)
    numbers = (
        f"challenger {comparison.challenger_accuracy:.4f} vs champion {comparison.champion_accuracy:.4f} "
        f"on {comparison.images} test images (b = {b}, c = {c}, one-sided exact McNemar p = {float(p_value):.3g})"
    )
    if c < b:
        return False, f"the challenger is worse: {numbers}"
    if c - b < needed:
        return (
            False,
            f"the gain c - b = {c - b} is below promote.min_gain = {promote.min_gain} ({needed} images): {numbers}",
        )
    if p_value >= Fraction(repr(promote.alpha)):
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


def registry_refspecs(remote: str) -> list[str]:
    """The registry's refs: GTO's version and stage tags, and the promotion branches (as remote-tracking refs)."""
    return [
        f"+refs/tags/{ARTIFACT}@*:refs/tags/{ARTIFACT}@*",
        f"+refs/tags/{ARTIFACT}#*:refs/tags/{ARTIFACT}#*",
        f"+refs/heads/{ARTIFACT}/*:refs/remotes/{remote}/{ARTIFACT}/*",
    ]


def tag_commits(listing: str) -> dict[str, str]:
    """{tag: the commit it points to} from `git ls-remote --tags` output (annotated tags: their TAG^{} line)."""
    commits: dict[str, str] = {}
    for line in listing.splitlines():
        sha, _, ref = line.partition("\t")
        name = ref.removeprefix("refs/tags/")
        if name.endswith("^{}"):
            commits[name[:-3]] = sha
        else:
            commits.setdefault(name, sha)
    return commits


def registry_listing(root: Path, remote: str = ".") -> str:
    """GTO's tags of the model in `remote` (default: this clone), as `git ls-remote --tags` lists them."""
    listing = ["git", "ls-remote", "--tags", remote, f"refs/tags/{ARTIFACT}*"]
    return command(listing, root, what=f"reading the registry in {remote!r}")


def prod_from_refs(listing: str) -> tuple[str, str] | None:
    """(version, commit) of prod from `git ls-remote` output of GTO's tags; None when nothing is in prod.

    GTO's stage tags are MODEL#prod#N (assign) and MODEL#prod!#N (unassign); the highest N is the
    current one. Version tags are MODEL@vX.Y.Z. Annotated tags are listed with their commit as TAG^{}.
    """
    commits = tag_commits(listing)
    assignments = []
    for name in commits:
        kind, _, number = name.rpartition("#")
        if kind in (f"{ARTIFACT}#{STAGE}", f"{ARTIFACT}#{STAGE}!") and number.isdigit():
            assignments.append((int(number), kind.endswith("!"), name))
    if not assignments:
        return None
    _, unassigned, latest = max(assignments)
    if unassigned:
        return None
    commit = commits[latest]
    versions = [
        name.removeprefix(f"{ARTIFACT}@")
        for name, sha in commits.items()
        if name.startswith(f"{ARTIFACT}@") and sha == commit and "!" not in name
    ]
    semver = sorted(versions, key=lambda v: tuple(int(part) for part in v.lstrip("v").split(".") if part.isdigit()))
    return (semver[-1] if semver else commit[:12]), commit


def remote_problem(root: Path, remote: str) -> str | None:
    """Why `remote` cannot hold the registry for this clone (None: it can)."""
    if subprocess.run(["git", "remote", "get-url", remote], cwd=root, capture_output=True).returncode != 0:
        return (
            f"no git remote {remote!r}: the registry lives in the team's shared git remote "
            f"(git remote add {remote} URL, or set promote.remote to the one you have)"
        )
    return None


def sync_registry(root: Path, remote: str) -> None:
    """Make the local registry the remote's: fetch its tags and branches, drop local ones it does not have."""
    problem = remote_problem(root, remote)
    if problem:
        raise PromotionError(f"cannot read the registry: {problem}")
    # --prune with explicit refspecs drops local registry tags the remote lacks (a killed promotion's).
    command(
        ["git", "fetch", "--quiet", "--prune", "--no-tags", remote, *registry_refspecs(remote)],
        root,
        what=f"fetching the registry from git remote {remote!r} (offline? check the remote, or set promote.remote)",
    )


def champion_version(root: Path, remote: str, *, sync: bool = True) -> dict | None:
    """The registry's current `prod` version ({version, commit_hexsha}) as `remote` has it, or None."""
    if sync:
        sync_registry(root, remote)
    # GTO's tags read as `gto show` reads them, by git: a gto process is half a CPU-second.
    prod = prod_from_refs(registry_listing(root))
    return None if prod is None else {"version": prod[0], "commit_hexsha": prod[1]}


def version_commit(root: Path, version: str) -> str:
    """The commit registered as `version`: where GTO's version tag points (git reads it at once, gto in 0.5 s)."""
    tag = f"refs/tags/{ARTIFACT}@{version}^{{commit}}"
    return command(["git", "rev-parse", "--verify", tag], root, what=f"reading {ARTIFACT}@{version}'s commit").strip()


def fetch_at_revision(root: Path, path: Path, revision: str, destination: Path) -> Path:
    """The DVC-tracked `path` (a file, or a folder such as the model's) as of git `revision`, never the workspace's."""
    # `dvc get . PATH --rev REV`, in this process: a DVC process costs 0.8 CPU-seconds to start.
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        Repo.get(str(root), path.as_posix(), out=str(destination), rev=revision)
    except FileNotFoundError as error:
        raise PromotionError(
            f"{path} at {revision[:12]}: DVC tracks no such path at that commit, or its data is in neither "
            "DVC's cache nor its remote (was it pushed? dvc push)"
        ) from error
    except (DvcException, OSError) as error:
        raise PromotionError(f"fetching {path} at {revision[:12]} failed: {error}") from error
    return destination


def predicted_labels(model_path: Path, sha256: str, images: np.ndarray) -> np.ndarray:
    """The class index `model_path` predicts per image, after checking the file is the one recorded."""
    from tasks.lib.model import predict_in_batches  # imports Keras: after run_stage has set the numerics

    model = load_model(model_path, sha256=sha256)
    return predict_in_batches(model, images).argmax(axis=1)


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
    # `dvc remote default` and `dvc status`, in this process: a DVC process costs 0.4-0.8 CPU-seconds to start.
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            default_remote = repo.config["core"].get("remote")
            stale = repo.status()
    except DvcException as error:
        raise PromotionError(f"checking the pipeline failed: {error}") from error
    if not default_remote:
        problems.append("no default DVC remote: the model could not be fetched elsewhere (dvc remote add -d ...)")
    problem = remote_problem(root, params.promote.remote)
    if problem:
        problems.append(problem)
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


def commit_on_branch(root: Path, branch: str, files: list[str], records: dict[str, str], message: str) -> str:
    """Commit HEAD plus the workspace's `files` and the texts `records` (path: text) on a new `branch`.

    HEAD, index and working tree stay as they are: the records reach the workspace only once
    the registry has them, so decision.json never claims a version the registry lacks.
    """
    with tempfile.TemporaryDirectory() as scratch:
        # A private index: the user's staged changes are neither committed nor disturbed.
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        command(["git", "read-tree", "HEAD"], root, what="preparing the commit", environment=index)
        command(["git", "add", "--force", "--", *files], root, what="preparing the commit", environment=index)
        for number, (path, text) in enumerate(sorted(records.items())):
            (Path(scratch) / str(number)).write_text(text)
            blob = command(
                ["git", "hash-object", "-w", str(Path(scratch) / str(number))], root, what="preparing the commit"
            )
            entry = f"100644,{blob.strip()},{path}"
            command(
                ["git", "update-index", "--add", "--cacheinfo", entry],
                root,
                what="preparing the commit",
                environment=index,
            )
        tree = command(["git", "write-tree"], root, what="preparing the commit", environment=index).strip()
    commit = command(["git", "commit-tree", tree, "-p", "HEAD", "-m", message], root, what="committing").strip()
    # The empty old value makes git refuse to overwrite a branch that already exists.
    command(["git", "update-ref", f"refs/heads/{branch}", commit, ""], root, what=f"creating branch {branch}")
    return commit


def next_version(root: Path) -> str:
    """The next minor version after every registered one (v0.1.0 for the first)."""
    # Version tags (MODEL@vX.Y.Z), deregistrations (MODEL@vX.Y.Z!#N) too: a number is never reused.
    versions = (
        re.match(rf"{re.escape(ARTIFACT)}@v(\d+)\.(\d+)\.(\d+)", name) for name in tag_commits(registry_listing(root))
    )
    major, minor, _ = max((tuple(map(int, match.groups())) for match in versions if match), default=(0, 0, 0))
    return f"v{major}.{minor + 1}.0"


def register(root: Path, commit: str, version: str) -> list[str]:
    """Register `commit` as `version` (a GTO tag) and assign it to `prod` (another); the tags' names."""
    command([tool("gto"), "register", ARTIFACT, commit, "--version", version], root, what="registering the model")
    command([tool("gto"), "assign", ARTIFACT, "--version", version, "--stage", STAGE], root, what=f"assigning {STAGE}")
    return [f"{ARTIFACT}@{version}", *stage_tags(root, commit)]


def stage_tags(root: Path, commit: str) -> list[str]:
    """GTO's `prod` assignment tags on `commit`."""
    listed = command(["git", "tag", "--points-at", commit, "--list", f"{ARTIFACT}#{STAGE}*"], root, what="listing tags")
    return listed.split()


def push_registry(root: Path, remote: str, refs: list[str]) -> None:
    """Push a promotion's branch and tags to the registry's remote in one atomic push: all land, or none."""
    try:
        command(["git", "push", "--atomic", "--quiet", remote, *refs], root, what=f"pushing to git remote {remote!r}")
    except PromotionError as error:
        raise RegistryBusyError(
            f"{error}. Nothing was registered; if another clone promoted meanwhile, run python -m tasks.promote again"
        ) from None


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
    # The flow's lock: no run can land new records while they are compared and committed.
    with exclusive_workspace(root):
        problems = registering_problems(root, params)
        if problems:
            raise PromotionError("cannot promote from this workspace:\n  " + "\n  ".join(problems))
        sync_registry(root, params.promote.remote)
        finished = finish_or_clean_interrupted(root, params)
        if finished:
            return finished
        return gate(root, params)


def gate(root: Path, params: Params) -> list[Path]:
    """The champion/challenger comparison and its decision; a winner goes on to promote_winner."""
    challenger_path = params.paths.model / "model.keras"
    challenger_sha256 = read_json(params.paths.model / "best.json", required=("sha256",))["sha256"]
    verify_sha256(challenger_path, challenger_sha256)  # the model select_best chose, unchanged since
    test = read_arrays(params.paths.prepared / "dataset.npz", ("x_test", "y_test"))
    class_names = read_class_names(params.paths.prepared / "report.json")
    evaluated = read_table(params.paths.metrics / "predictions.csv")
    actual = np.asarray(class_names)[test["y_test"]]
    if not np.array_equal(evaluated["actual"].to_numpy(), actual):
        raise PromotionError(f"{params.paths.metrics / 'predictions.csv'}: not the predictions of this test set")
    champion = champion_version(root, params.promote.remote, sync=False)
    comparison = None
    if champion is not None:
        with tempfile.TemporaryDirectory() as scratch:
            revision = champion["commit_hexsha"]
            folder = fetch_at_revision(root, params.paths.model, revision, Path(scratch) / "model")
            report = fetch_at_revision(root, params.paths.prepared / "report.json", revision, Path(scratch) / "r.json")
            champion_classes = read_class_names(report)
            if champion_classes != class_names:
                raise PromotionError(
                    f"the champion {champion['version']} was trained on the classes {champion_classes}, the "
                    f"challenger on {class_names}: their predictions cannot be compared image by image"
                )
            champion_sha256 = read_json(folder / "best.json", required=("sha256",))["sha256"]
            log.info("champion %s: predicting %d test images", champion["version"], test["y_test"].size)
            champion_labels = predicted_labels(folder / "model.keras", champion_sha256, test["x_test"])
        champion = {"version": champion["version"], "commit": champion["commit_hexsha"], "sha256": champion_sha256}
        # Each model scored by its own class list: names, not indices, are compared.
        champion_predicted = np.asarray(champion_classes)[champion_labels]
        comparison = compare(actual, champion_predicted, evaluated["predicted"].to_numpy())
    promoted, reason = decide(comparison, params.promote)
    decision = {
        "decision": "promote" if promoted else "keep champion",
        "reason": reason,
        "challenger": {"path": challenger_path.as_posix(), "sha256": challenger_sha256},
        "champion": champion,
        "comparison": comparison_record(comparison),
        "gate": params.promote.model_dump()
        | {"test": GATE_TEST, "required_gain_images": required_gain(params.promote.min_gain, actual.size)},
        "version": None,
        "branch": None,
    }
    log.info("%s: %s", decision["decision"], reason)
    folder = root / params.paths.promotion
    if not promoted:
        return [write_json(folder / "decision.json", decision)]
    return promote_winner(root, params, decision)


GATE_TEST = (
    "one-sided exact McNemar test: p = P(X >= c) for X ~ Binomial(b + c, 1/2); promote when "
    "c - b >= ceil(min_gain * images) and p < alpha"
)


def comparison_record(comparison: Comparison | None) -> dict | None:
    """The comparison as decision.json records it: counts, accuracies and p."""
    if comparison is None:
        return None
    return asdict(comparison) | {
        "champion_accuracy": comparison.champion_accuracy,
        "challenger_accuracy": comparison.challenger_accuracy,
    }


# A promotion in progress: its version, branch and commit. Written before the branch exists and
# removed once the workspace has the records, so the next promotion knows what a kill left.
JOURNAL = Path(".dvc/tmp/promotion.json")


def promote_winner(root: Path, params: Params, decision: dict) -> list[Path]:
    """Push outputs, commit decision and card on a branch, tag it, push branch and tags atomically; undo on failure."""
    version = next_version(root)
    branch = f"{ARTIFACT}/{version}"
    decision = decision | {"version": version, "branch": branch}
    write_json(root / JOURNAL, {"version": version, "branch": branch, "commit": None})
    command([tool("dvc"), "push", "-q"], root, what="pushing the pipeline's outputs to the DVC remote")
    folder = params.paths.promotion
    records = {
        (folder / "decision.json").as_posix(): json_text(decision),
        (folder / "model-card.md").as_posix(): model_card(
            params,
            decision,
            read_json(params.paths.metrics / "metrics.json"),
            read_json(params.paths.metrics / "environment.json"),
        ),
    }
    new_records = [path for path in untracked_files(root) if is_pipeline_record(path, params)]
    files = sorted({*changed_files(root, "HEAD"), *new_records} - set(records))
    commit = commit_on_branch(root, branch, files, records, f"Promote {ARTIFACT} {version}: {decision['reason']}")
    write_json(root / JOURNAL, {"version": version, "branch": branch, "commit": commit})
    try:
        tags = register(root, commit, version)
        push_registry(root, params.promote.remote, [f"refs/heads/{branch}", *(f"refs/tags/{tag}" for tag in tags)])
    except (PromotionError, RegistryBusyError):
        # Not half done: without the remote's tags the branch would claim a version that does not exist.
        drop_local_promotion(root, branch, commit)
        (root / JOURNAL).unlink()
        raise
    written = write_records(root, records)
    (root / JOURNAL).unlink()
    log.info(
        "registered %s %s (commit %s on branch %s), assigned it to %s and pushed both to %s",
        ARTIFACT,
        version,
        commit[:12],
        branch,
        STAGE,
        params.promote.remote,
    )
    return written


def json_text(payload: object) -> str:
    """JSON as write_json writes it (sorted keys, indented, a final newline)."""
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def write_records(root: Path, records: dict[str, str]) -> list[Path]:
    """Write the promotion's records (path: text) into the workspace, each atomically."""
    for path, text in records.items():
        with atomic_path(root / path) as temporary:
            temporary.write_text(text)
    return [Path(path) for path in records]


def drop_local_promotion(root: Path, branch: str, commit: str | None) -> None:
    """Delete a promotion's local branch and the local tags on its commit (the remote never had them)."""
    if commit:
        for tag in command(["git", "tag", "--points-at", commit], root, what="listing tags").split():
            if tag.startswith((f"{ARTIFACT}@", f"{ARTIFACT}#")):
                command(["git", "tag", "-d", tag], root, what=f"deleting tag {tag}")
    subprocess.run(["git", "branch", "-D", branch], cwd=root, capture_output=True)


def drop_orphan_branches(root: Path, remote: str) -> None:
    """Delete local promotion branches that the registry's remote lacks: no version stands behind them."""
    local = command(
        ["git", "for-each-ref", "--format=%(refname:short)", f"refs/heads/{ARTIFACT}/"], root, what="listing branches"
    )
    pushed = command(
        ["git", "for-each-ref", "--format=%(refname:short)", f"refs/remotes/{remote}/{ARTIFACT}/"],
        root,
        what="listing branches",
    )
    for branch in set(local.split()) - {name.removeprefix(f"{remote}/") for name in pushed.split()}:
        log.info("deleting branch %s: %s has no such promotion", branch, remote)
        command(["git", "branch", "-D", branch], root, what=f"deleting branch {branch}")


def finish_or_clean_interrupted(root: Path, params: Params) -> list[Path] | None:
    """After a kill: the records of a promotion the remote has (finished), or None once its leftovers are gone."""
    journal = root / JOURNAL
    if not journal.exists():
        drop_orphan_branches(root, params.promote.remote)
        return None
    pending = read_json(journal, required=("version", "branch", "commit"))
    version, commit = pending["version"], pending["commit"]
    tagged = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"refs/tags/{ARTIFACT}@{version}^{{commit}}"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if commit and tagged == commit:  # the atomic push went through: only the workspace's records are missing
        folder = params.paths.promotion
        records = {
            (folder / name).as_posix(): command(
                ["git", "show", f"{commit}:{(folder / name).as_posix()}"], root, what="reading the promotion's records"
            )
            for name in ("decision.json", "model-card.md")
        }
        written = write_records(root, records)
        journal.unlink()
        log.info("finished the interrupted promotion of %s: %s has it", version, params.promote.remote)
        return written
    drop_local_promotion(root, pending["branch"], commit)
    drop_orphan_branches(root, params.promote.remote)
    journal.unlink()
    log.info(
        "cleaned up the interrupted promotion of %s (it never reached %s); comparing again",
        version,
        params.promote.remote,
    )
    return None


def stage_history(root: Path) -> list[str]:
    """The versions assigned to prod, oldest first (GTO's stage tags in their order)."""
    listed = command(
        ["git", "for-each-ref", "--format=%(refname:short) %(*objectname)", f"refs/tags/{ARTIFACT}#{STAGE}#*"],
        root,
        what="listing the registry's assignments",
    )
    assignments = sorted((int(name.rsplit("#", 1)[1]), target) for name, target in map(str.split, listed.splitlines()))
    versions = []
    for _, target in assignments:
        tags = command(["git", "tag", "--points-at", target, "--list", f"{ARTIFACT}@*"], root, what="listing tags")
        versions.append(tags.split()[0].removeprefix(f"{ARTIFACT}@"))
    return versions


def rollback(params: Params, reason: str) -> list[Path]:
    """Reassign prod to the version before the current one, after checking its model through DVC; push it."""
    root = Path.cwd().resolve()
    remote = params.promote.remote
    with exclusive_workspace(root):
        sync_registry(root, remote)
        current = champion_version(root, remote, sync=False)
        if current is None:
            raise PromotionError(f"no version of {ARTIFACT} is in {STAGE}: nothing to roll back")
        history = stage_history(root)
        before = history[: history.index(current["version"])]
        if not before:
            raise PromotionError(f"{current['version']} is the first version ever in {STAGE}: nothing to roll back to")
        previous = before[-1]
        commit = version_commit(root, previous)
        with tempfile.TemporaryDirectory() as scratch:
            folder = fetch_at_revision(root, params.paths.model, commit, Path(scratch) / "model")
            verify_sha256(folder / "model.keras", read_json(folder / "best.json", required=("sha256",))["sha256"])
        message = f"rollback from {current['version']}: {reason}"
        known = set(stage_tags(root, commit))
        command(
            # --force: GTO refuses a version that held the stage before without it.
            [tool("gto"), "assign", ARTIFACT, "--version", previous, "--stage", STAGE, "--message", message, "--force"],
            root,
            what=f"assigning {previous} to {STAGE}",
        )
        new = [tag for tag in stage_tags(root, commit) if tag not in known]
        try:
            push_registry(root, remote, [f"refs/tags/{tag}" for tag in new])
        except RegistryBusyError:
            for tag in new:
                command(["git", "tag", "-d", tag], root, what=f"deleting tag {tag}")
            raise
    log.info("%s is in %s again (%s), pushed to %s", previous, STAGE, message, remote)
    return []


def show(params: Params) -> list[Path]:
    """Print the model's registered versions and stages (GTO's table), as the registry's remote has them."""
    sync_registry(Path.cwd(), params.promote.remote)
    print(command([tool("gto"), "show", ARTIFACT], Path.cwd(), what="reading the registry"), end="")
    return []


def main() -> None:
    """Entry point for `python -m tasks.promote`."""
    options = {"reason": ("rollback", "why prod goes back (with --rollback); kept in GTO's tag message")}
    run_stage({"run": run, "show": show, "rollback": rollback}, __doc__, options=options)


if __name__ == "__main__":
    main()
