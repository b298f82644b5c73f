"""Sweep: train a grid of candidates as DVC experiments on a Dask cluster, then apply the best.

    python -m flows.sweep -S 'train.learning_rate=1.0,2.0' -S 'train.widths=[32,64,128],[32,128,128]'
    python -m flows.sweep -S ... --dask-address tcp://HOST:8786      # an existing cluster's scheduler

`-S key=v1,v2,...` is DVC's grammar: every combination of the listed values is one candidate,
validated against the params model before anything runs. Each candidate is a DVC experiment
at the current commit, named from its params (`dvc exp show` lists them, `dvc exp apply`,
`branch` and `push` work as usual). The upstream stages (ingest, preprocess, split) run once,
here; their outputs go to the DVC remote. A candidate runs as a Prefect task on a Dask worker
(a LocalCluster of --workers processes by default): it clones the git repository at the
commit into a workspace of its own, pulls the upstream outputs from the DVC remote, runs
`dvc exp run`, and sends the experiment back with `dvc exp push` (git refs to the repository,
outputs to the DVC remote), so workers on other machines need the repository URL and the DVC
remote, not this file system. The winner is the candidate with the best validation figure
named by `select_best.monitor` (never the test set; ties go to the first name); it is applied
to this workspace (or `--branch NAME`), and `artifacts/sweep/summary.md` lists every candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import stage_command_environment
from tasks.cli import EXIT_BAD_INPUT, run_tool
from tasks.io import DataError, atomic_path
from tasks.params import DEFAULT_PARAMS_PATH, ParamsError, load_params, parse_params

log = logging.getLogger("flows.sweep")

DEFAULT_MAX_CANDIDATES = 8
ALLOWED_WORKER_DEATHS = 1  # a candidate whose worker dies runs once more, then is reported failed
UPSTREAM_STAGES = ("ingest", "preprocess", "split")
# select_best.monitor -> the validation figure in metrics.json, and whether lower is better.
MONITORED = {
    "val_loss": ("loss", True),
    "val_crossentropy": ("crossentropy", True),
    "val_accuracy": ("accuracy", False),
}


# Where the sweep pushes its commit in a --repo other than this one (no branch moves).
SWEEP_REFS = "refs/sweeps/"
# What `dvc exp run` logs when it runs the train stage, and when it restores it from the run cache.
TRAIN_RAN, TRAIN_RESTORED = "Running stage 'train'", "Stage 'train' is cached - skipping run"


class SweepError(DataError):
    """The sweep cannot start: bad -S values, too many candidates, or a workspace it cannot sweep from."""


class CandidateFailedError(RuntimeError):
    """A candidate's `dvc exp run` failed (diverged, raised); the reason is its stage's error line."""


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, object]  # dotted params key -> value

    def set_params(self) -> list[str]:
        """`-S key=value` arguments for `dvc exp run`, values in the YAML/JSON flow syntax Hydra reads."""
        return [
            argument
            for key, value in self.overrides.items()
            for argument in ("-S", f"{key}={json.dumps(value, separators=(',', ':'))}")
        ]


def split_values(text: str) -> list[str]:
    """Split `a,b,[1,2],c` at the commas outside brackets."""
    values, depth, current = [], 0, ""
    for character in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += character
    return [*values, current]


def parse_sweep(options: list[str]) -> dict[str, list]:
    """{key: [values]} from `key=v1,v2` options; each value parsed as YAML (numbers, lists, null)."""
    axes: dict[str, list] = {}
    for option in options:
        key, separator, text = option.partition("=")
        if not separator or not key.strip() or not text.strip():
            raise SweepError(f"-S {option!r}: expected key=value[,value...], for example train.epochs=2,4")
        try:
            axes[key.strip()] = [yaml.safe_load(value) for value in split_values(text)]
        except yaml.YAMLError as error:
            raise SweepError(f"-S {option!r}: a value is not valid YAML: {error}") from None
    return axes


def candidate_name(overrides: dict[str, object]) -> str:
    """A deterministic, git-ref-safe name from the params alone: the same grid point, the same name."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return f"sweep-{digest}"


def candidate_grid(axes: dict[str, list], max_candidates: int) -> list[Candidate]:
    """Every combination of the axes' values, in the order given; refused beyond `max_candidates`."""
    count = 1
    for values in axes.values():
        count *= len(values)
    if count > max_candidates:
        raise SweepError(f"the grid has {count} candidates, more than --max-candidates {max_candidates}")
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    return [Candidate(candidate_name(overrides), overrides) for overrides in grid]


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A deep copy of params `raw` with dotted keys set."""
    raw = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return raw


def train_outcome(output: str) -> str:
    """What `dvc exp run`'s log says of the train stage: run, restored from the run cache, or unchanged."""
    if TRAIN_RAN in output:
        return "trained"
    if TRAIN_RESTORED in output:
        return "reused: DVC's run cache, trained nothing"
    return "reused: the commit's own outputs, trained nothing"  # the grid point is HEAD's params


def changed_params(baseline: dict, params: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of the leaves of `params` that differ from `baseline` (an experiment's overrides)."""
    changed = {}
    for key, value in params.items():
        before = baseline.get(key) if isinstance(baseline, dict) else None
        if isinstance(value, dict):
            changed |= changed_params(before or {}, value, f"{prefix}{key}.")
        elif value != before:
            changed[f"{prefix}{key}"] = value
    return changed


def validate_candidates(candidates: list[Candidate], params_path: Path) -> None:
    """Check every candidate's params against the params model before any work starts."""
    raw = yaml.safe_load(params_path.read_text())
    for candidate in candidates:
        try:
            parse_params(with_overrides(raw, candidate.overrides), source=f"candidate {candidate.overrides}")
        except ParamsError as error:
            raise SweepError(str(error)) from None


def unrankable(axes: dict[str, list], monitor: str) -> str | None:
    """Why candidates over `axes` cannot be ranked on `monitor` (None: they can): their figures would not compare."""
    varied = [key for key, values in axes.items() if len({json.dumps(value) for value in values}) > 1]
    for key in varied:
        if key == "seed" or key.startswith("split."):
            return f"{key} changes which images validate each candidate: their validation figures do not compare"
        if key.startswith("select_best."):
            return f"{key} changes the figure each candidate is judged by: one monitor ranks them all"
    if monitor == "val_loss" and "train.label_smoothing" in varied:
        return (
            "train.label_smoothing changes the objective that val_loss measures: rank on "
            "select_best.monitor val_crossentropy or val_accuracy (mode from the monitor)"
        )
    return None


def rank(finished: dict[str, dict], monitor: str) -> list[str]:
    """Candidate names best first by the monitored validation figure; ties by name."""
    figure, lower_is_better = MONITORED[monitor]

    def key(name: str) -> tuple[float, str]:
        value = float(finished[name]["metrics"]["validation"][figure])
        return (value if lower_is_better else -value, name)

    return sorted(finished, key=key)


# ---- IO: git, dvc and the Dask workers ----


def command(arguments: list[str], cwd: Path, *, what: str) -> str:
    """Run a command with the sweep's tools and identity; its stdout, or SweepError naming `what` failed."""
    return run_tool(arguments, cwd, what=what, error=SweepError, environment=tool_environment())


def tool_environment() -> dict[str, str]:
    """This interpreter's tools first on PATH (stage commands say `python`), offline, with a git identity."""
    environment = stage_command_environment()
    environment.setdefault("DVC_NO_ANALYTICS", "1")
    for role in ("AUTHOR", "COMMITTER"):  # experiments are commits: a worker may have no git config
        environment.setdefault(f"GIT_{role}_NAME", "cifar10 sweep")
        environment.setdefault(f"GIT_{role}_EMAIL", "sweep@localhost")
    return environment


DVC = [sys.executable, "-m", "dvc"]


def default_remote_url(root: Path) -> str:
    """The repository's default DVC remote as an absolute URL (DVC's config resolves relative paths)."""
    from dvc.repo import Repo

    # The config, not `dvc remote list`: that prints a table whose long paths wrap.
    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise SweepError("no default DVC remote: candidates need one (dvc remote add -d NAME URL) or --remote URL")
        return repo.config["remote"][name]["url"]


def worker_identity() -> dict[str, object]:
    """Which Dask worker (and process, host) runs the calling task."""
    try:
        from distributed import get_worker

        worker = get_worker()
        name, address = str(worker.name), worker.address
    except (ImportError, ValueError):
        name, address = "local", ""
    return {"worker": name, "address": address, "pid": os.getpid(), "host": socket.gethostname()}


# Sent SIGTERM, kills the process group named by its argument. It gets SIGTERM as its Linux
# parent-death signal: when the worker (thread) that started it dies, the candidate's dvc and
# training, in a session of their own, die too instead of training on as orphans.
GROUP_REAPER = """
import os, signal, sys
def reap(*_):
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    finally:
        os._exit(0)
signal.signal(signal.SIGTERM, reap)
while True:
    signal.pause()
"""


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_with_this_worker(arguments: list[str], cwd: Path) -> tuple[int, str]:
    """Run a command (and its children) that cannot outlive the calling worker; (exit status, output)."""
    process = subprocess.Popen(
        arguments,
        cwd=cwd,
        env=tool_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    reaper = subprocess.Popen([sys.executable, "-c", GROUP_REAPER, str(process.pid)], preexec_fn=_die_with_parent)
    try:
        output, _ = process.communicate()
    finally:
        reaper.kill()  # SIGKILL: no reaping of a group that finished
        reaper.wait()
    return process.returncode, output


@task(cache_policy=NO_CACHE, persist_result=False)
def run_candidate(candidate: Candidate, repo: str, commit: str, remote: str, shared: bool) -> dict:
    """Clone `repo` at `commit` (from SWEEP_REFS if `shared`), pull upstream outputs, `dvc exp run`, push it back."""
    started, identity = time.perf_counter(), worker_identity()
    # A workspace per attempt: a candidate retried after its worker died starts clean.
    with tempfile.TemporaryDirectory(prefix=f"{candidate.name}-") as scratch:
        workspace = Path(scratch) / "repo"
        command(["git", "clone", "--quiet", repo, str(workspace)], Path(scratch), what="cloning the repository")
        if shared:  # a clone has the branches; the commit may be only under the ref the sweep pushed it to
            fetch = ["git", "fetch", "--quiet", "origin", f"{SWEEP_REFS}{commit}"]
            command(fetch, workspace, what=f"fetching {commit[:12]}")
        command(["git", "checkout", "--quiet", "--detach", commit], workspace, what=f"checking out {commit[:12]}")
        default = command([*DVC, "remote", "default"], workspace, what="reading the DVC remote").strip()
        command([*DVC, "remote", "modify", "--local", default, "url", remote], workspace, what="setting the remote")
        # --run-cache also brings the remote's record of earlier stage runs (small files): with
        # `exp run --pull`, a stage whose deps and params some run had already restores that run's
        # outputs from the remote instead of running again (a sweep rerun after a commit).
        pull = [*DVC, "pull", "--quiet", "--run-cache", *UPSTREAM_STAGES[1:]]
        command(pull, workspace, what="pulling the upstream outputs")
        # --allow-missing: the unchanged upstream stages (and the dataset source) stay unpulled.
        run = [*DVC, "exp", "run", "--pull", "--allow-missing", "--name", candidate.name, *candidate.set_params()]
        returncode, output = run_with_this_worker(run, workspace)
        if returncode != 0:
            output = output.splitlines()
            reason = next((line for line in reversed(output) if line.startswith("error: ")), None)
            reason = reason or next((line for line in reversed(output) if "ERROR" in line), "see its log")
            raise CandidateFailedError(f"{candidate.name}: {reason.removeprefix('error: ')}")
        push = [*DVC, "exp", "push", "--run-cache", "origin", candidate.name]
        command(push, workspace, what="pushing the experiment")
        # The run cache's records went with the experiment, not the files of uncached outputs (flows.run_cache).
        command([sys.executable, "-m", "flows.run_cache"], workspace, what="pushing the run cache's files")
        # The largest process this worker has waited for so far (the training run): its memory peak.
        identity["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
        params = load_params(workspace / DEFAULT_PARAMS_PATH)
        metrics = json.loads((workspace / params.paths.metrics / "metrics.json").read_text())
    return {
        **identity,
        "name": candidate.name,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 1),
        "outcome": train_outcome(output),
    }


def experiments(root: Path) -> dict[str, dict]:
    """{name: {rev, params, metrics}} of the experiments on HEAD, from `dvc exp show --json`."""
    shown = json.loads(command([*DVC, "exp", "show", "--json"], root, what="listing experiments") or "[]")
    found = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            if not group.get("revs"):  # queued or running: nothing to read yet
                continue
            state = group["revs"][0]
            data = state.get("data") or {}
            metrics = next(
                (
                    item.get("data")
                    for name, item in (data.get("metrics") or {}).items()
                    if name.endswith("metrics.json")
                ),
                None,
            )
            params = (data.get("params") or {}).get("params.yaml", {}).get("data")
            if group.get("name") and metrics:
                found[group["name"]] = {"rev": state["rev"], "params": params, "metrics": metrics}
    return found


def validation_plot(root: Path, rev: str, history_path: Path, monitor: str, destination: Path) -> Path:
    """A PNG of the candidate's monitored validation figure per epoch, from history.csv at its experiment commit."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    history = pd.read_csv(
        io.StringIO(command(["git", "show", f"{rev}:{history_path.as_posix()}"], root, what="reading a history"))
    )
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.plot(history["epoch"], history[monitor], marker="o")
    axis.set_xlabel("epoch")
    axis.set_ylabel(monitor)
    axis.set_title(destination.stem)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return destination


def summary_markdown(rows: list[dict], winner: str | None, monitor: str) -> str:
    """The sweep's summary: one row per candidate, finished or failed, and the winner."""
    lines = [
        "# Sweep",
        "",
        f"Winner: `{winner}` (best validation `{monitor}`)." if winner else "No candidate finished.",
        "",
        "| candidate | params | validation accuracy | validation loss | test accuracy | seconds | peak GB "
        "| worker | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        validation = (row.get("metrics") or {}).get("validation", {})
        test = (row.get("metrics") or {}).get("test", {})
        params = ", ".join(f"`{key}={value}`" for key, value in row["overrides"].items())
        worker = f"{row['worker']} (pid {row['pid']}) on {row['host']}" if "worker" in row else ""
        lines.append(
            f"| `{row['name']}` | {params} | {validation.get('accuracy', '')} | {validation.get('loss', '')} "
            f"| {test.get('accuracy', '')} | {row.get('seconds', '')} | {row.get('peak_rss_gb', '')} | {worker} "
            f"| {row['outcome']} |"
        )
    return "\n".join(lines) + "\n"


def apply_winner(root: Path, winner: str, remote_name: str, branch: str | None) -> str:
    """Make `winner` the workspace's state (outputs from the DVC remote), or a branch; what was done."""
    if branch:
        command([*DVC, "exp", "branch", winner, branch], root, what=f"branching experiment {winner}")
        return f"branch {branch}"
    # The experiment's outputs live in the DVC remote (the candidate pushed them): fetch, then apply.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # the CLI's fetch takes no revision; its API does
        repo.fetch(revs=[experiments(root)[winner]["rev"]], remote=remote_name, workspace=False)
    command([*DVC, "exp", "apply", winner], root, what=f"applying experiment {winner}")
    return "applied to the workspace"


@flow(name="cifar10-sweep", persist_result=False)
def cifar10_sweep(
    sets: list[str],
    root: str = ".",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    repo: str | None = None,
    remote: str | None = None,
    branch: str | None = None,
) -> dict:
    """Run the grid's candidates as experiments on the flow's task runner; apply and summarise the best."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / DEFAULT_PARAMS_PATH)
    axes = parse_sweep(sets)
    candidates = candidate_grid(axes, max_candidates)
    validate_candidates(candidates, root_path / DEFAULT_PARAMS_PATH)
    problem = unrankable(axes, params.select_best.monitor)
    if problem:
        raise SweepError(f"the grid cannot be ranked: {problem}")
    clean = ["git", "status", "--porcelain", "--untracked-files=no"]
    if command(clean, root_path, what="checking the workspace"):
        raise SweepError("tracked files differ from HEAD: candidates run at a commit, so commit (or stash) first")
    logger.info("upstream stages, once for every candidate: %s", ", ".join(UPSTREAM_STAGES))
    command([*DVC, "repro", "--quiet", UPSTREAM_STAGES[-1]], root_path, what="running the upstream stages")
    if command(clean, root_path, what="checking the workspace"):
        raise SweepError("the upstream stages changed dvc.lock: commit it, then sweep")
    if remote:  # a remote given by URL: this workspace pushes to it and fetches from it too
        command([*DVC, "remote", "add", "--local", "--force", "sweep", remote], root_path, what="adding the remote")
        remote_name = "sweep"
    else:
        remote_name = command([*DVC, "remote", "default"], root_path, what="reading the DVC remote").strip()
        remote = default_remote_url(root_path)
    upstream_outputs = UPSTREAM_STAGES[1:]
    command([*DVC, "push", "--quiet", "-r", remote_name, *upstream_outputs], root_path, what="pushing upstream outputs")
    commit = command(["git", "rev-parse", "HEAD"], root_path, what="reading HEAD").strip()
    repo = repo or str(root_path)
    elsewhere = Path(repo).resolve() != root_path
    if elsewhere:  # workers clone `repo`: give it this commit, pushed or not, without moving any branch
        push = ["git", "push", "--quiet", repo, f"{commit}:{SWEEP_REFS}{commit}"]
        command(push, root_path, what="pushing the sweep's commit to --repo")
    done = experiments(root_path)
    rows: dict[str, dict] = {}
    futures = {}
    for candidate in candidates:
        row = {"name": candidate.name, "overrides": candidate.overrides}
        if candidate.name in done:
            logger.info("candidate %s %s: an experiment already, reused: trained nothing", *row.values())
            rows[candidate.name] = {**row, "outcome": "reused: experiment", "metrics": done[candidate.name]["metrics"]}
        else:
            logger.info("candidate %s %s: submitted", *row.values())
            futures[candidate.name] = run_candidate.submit(candidate, repo, commit, remote, elsewhere)
            rows[candidate.name] = row
    for name, future in futures.items():
        try:
            result = future.result()
        except Exception as error:  # a candidate's failure is reported; the sweep completes with the rest
            logger.warning("candidate %s failed: %s", name, error)
            rows[name] |= {"outcome": f"failed: {error}"}
            continue
        outcome = result["outcome"]
        logger.info(
            "candidate %s: %s, on worker %s (pid %s) in %s s",
            name,
            outcome,
            result["worker"],
            result["pid"],
            result["seconds"],
        )
        rows[name] |= result
        if elsewhere:  # pushed there: bring the experiment here
            command([*DVC, "exp", "pull", "--quiet", repo, name], root_path, what=f"fetching experiment {name}")
    finished = {name: row for name, row in rows.items() if row.get("metrics")}
    winner = rank(finished, params.select_best.monitor)[0] if finished else None
    applied = apply_winner(root_path, winner, remote_name, branch) if winner else "nothing to apply"
    logger.info("winner: %s (%s)", winner, applied)
    summary = write_summary(root_path, params, [rows[candidate.name] for candidate in candidates], winner)
    return {"winner": winner, "applied": applied, "summary": str(summary), "candidates": list(rows.values())}


def write_summary(root: Path, params, rows: list[dict], winner: str | None) -> Path:
    """The summary markdown, one validation plot per finished candidate, and the Prefect table artifact."""
    folder = root / params.paths.sweep
    monitor = params.select_best.monitor
    known = experiments(root)
    for row in rows:
        if row["name"] in known:
            validation_plot(
                root,
                known[row["name"]]["rev"],
                params.paths.training / "history.csv",
                monitor,
                folder / f"{row['name']}.png",
            )
    path = folder / "summary.md"
    with atomic_path(path, suffix=".md") as temporary:
        temporary.write_text(summary_markdown(rows, winner, monitor))
    create_table_artifact(
        key="cifar10-sweep",
        table=[
            {key: str(row.get(key, "")) for key in ("name", "overrides", "outcome", "worker", "seconds")}
            for row in rows
        ],
        description=f"sweep winner: {winner}",
    )
    return path


def apply_best(root: Path, branch: str | None = None) -> dict:
    """Rank the experiments already on HEAD (however they were made) and apply the best: `--apply-best`."""
    params = load_params(root / DEFAULT_PARAMS_PATH)
    known = experiments(root)
    if not known:
        raise SweepError("no experiments with metrics on HEAD (dvc exp show): nothing to choose from")
    winner = rank(known, params.select_best.monitor)[0]
    remote_name = command([*DVC, "remote", "default"], root, what="reading the DVC remote").strip()
    applied = apply_winner(root, winner, remote_name, branch)
    baseline = yaml.safe_load(command(["git", "show", f"HEAD:{DEFAULT_PARAMS_PATH}"], root, what="reading params"))
    rows = [
        {"name": name, "overrides": changed_params(baseline, data["params"] or {}), "metrics": data["metrics"]}
        | {"outcome": "existing"}
        for name, data in known.items()
    ]
    return {"winner": winner, "applied": applied, "summary": str(write_summary(root, params, rows, winner))}


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """One Prefect API for this process and the Dask workers: PREFECT_API_URL, or a temporary local server."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Without it each worker process would look for an API of its own and fail to log its task runs.
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the workers the cluster starts
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # the run's last log lines, while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def task_runner(workers: int, address: str | None):
    """The sweep's DaskTaskRunner: an existing scheduler at `address`, or a LocalCluster of `workers` processes."""
    from prefect_dask import DaskTaskRunner

    # A candidate whose worker dies is rerun once on another worker, then reported failed. Dask read
    # its environment when it was first imported, so the setting goes to its config, which the local
    # cluster's scheduler reads when it starts. (An existing cluster's scheduler has its own.)
    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS})
    if address:
        return DaskTaskRunner(address=address)
    # One single-threaded process per candidate: a training run's ~2 GB stays inside 24 GiB with room.
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )


def main() -> None:
    """Entry point for `python -m flows.sweep`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="sets",
        action="append",
        metavar="KEY=V1,V2",
        help="params key and its values; every combination of all -S is one candidate",
    )
    parser.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES)
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--dask-address", help="an existing Dask scheduler, tcp://HOST:8786, instead of a LocalCluster")
    parser.add_argument("--repo", help="git URL the workers clone and push to (default: this repository)")
    parser.add_argument("--remote", help="DVC remote URL the workers use (default: this repository's default remote)")
    parser.add_argument("--branch", help="put the winner on this new branch instead of applying it to the workspace")
    parser.add_argument(
        "--apply-best",
        action="store_true",
        help="no sweep: apply the best experiment already on HEAD (dvc exp run ...)",
    )
    arguments = parser.parse_args()
    if not arguments.sets and not arguments.apply_best:
        parser.error("give -S KEY=V1,V2 (one or more), or --apply-best")
    # Ctrl-C (SIGINT) stops the sweep even when it was started where SIGINT is ignored, as shells
    # do for background jobs and Python then keeps: the candidates die with their workers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runner = task_runner(arguments.workers, arguments.dask_address)
    try:
        if arguments.apply_best:
            result = apply_best(Path.cwd(), arguments.branch)
            print(f"winner: {result['winner']} ({result['applied']}); summary: {result['summary']}")
            return
        with prefect_api_for_workers():
            result = cifar10_sweep.with_options(task_runner=runner)(
                sets=arguments.sets,
                max_candidates=arguments.max_candidates,
                repo=arguments.repo,
                remote=arguments.remote,
                branch=arguments.branch,
            )
    except (ParamsError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(f"winner: {result['winner']} ({result['applied']}); summary: {result['summary']}")


if __name__ == "__main__":
    main()
