"""One sweep candidate on a Dask worker: a clone of its own, `dvc exp run`, and the experiment pushed back."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import stage_command_environment
from flows.sweep_grid import Candidate, SweepError
from tasks.lib.cli import run_tool
from tasks.lib.params import DEFAULT_PARAMS_PATH, load_params

UPSTREAM_STAGES = ("ingest", "preprocess", "split")

# Where the sweep pushes its commit in a --repo other than this one (no branch moves).
SWEEP_REFS = "refs/sweeps/"

# What `dvc exp run` logs when it runs the train stage, and when it restores it from the run cache.
TRAIN_RAN, TRAIN_RESTORED = "Running stage 'train'", "Stage 'train' is cached - skipping run"


class CandidateFailedError(RuntimeError):
    """A candidate's `dvc exp run` failed (diverged, raised); the reason is its stage's error line."""


def train_outcome(output: str) -> str:
    """What `dvc exp run`'s log says of the train stage: run, restored from the run cache, or unchanged."""
    if TRAIN_RAN in output:
        return "trained"
    if TRAIN_RESTORED in output:
        return "reused: DVC's run cache, trained nothing"
    return "reused: the commit's own outputs, trained nothing"  # the grid point is HEAD's params


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


def set_local_remote(root: Path, name: str, url: str, *, default: bool = False) -> None:
    """Point DVC remote `name` at `url` in the repository's local (untracked) config; `default`: make it the default.

    In this process, as `dvc remote add --local --force` would do it: that command is a process of
    half a CPU-second.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.config.edit("local") as local:
        local["remote"][name] = {"url": url}
        if default:
            local["core"]["remote"] = name


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
        set_local_remote(workspace, "sweep", remote, default=True)  # pull, exp run and push all use it
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
