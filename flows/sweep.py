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

This file is the wiring; the grid and its ranking are in `flows/sweep_grid.py`, a candidate's
run on a worker in `flows/sweep_worker.py`, the summary in `flows/sweep_report.py`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import dask
import yaml
from prefect import flow, get_run_logger

from flows.sweep_grid import (
    DEFAULT_MAX_CANDIDATES,
    SweepError,
    candidate_grid,
    changed_params,
    parse_sweep,
    rank,
    unrankable,
    validate_candidates,
)
from flows.sweep_report import experiments, write_summary
from flows.sweep_worker import (
    DVC,
    SWEEP_REFS,
    UPSTREAM_STAGES,
    command,
    run_candidate,
    set_local_remote,
)
from flows.worker_api import prefect_api_for_workers
from tasks.lib.cli import EXIT_BAD_INPUT
from tasks.lib.io import DataError
from tasks.lib.params import DEFAULT_PARAMS_PATH, ParamsError, load_params

ALLOWED_WORKER_DEATHS = 1  # a candidate whose worker dies runs once more, then is reported failed


def default_remote(root: Path) -> tuple[str, str]:
    """The repository's default DVC remote: (name, absolute URL; DVC's config resolves relative paths)."""
    from dvc.repo import Repo

    # The config in this process: `dvc remote default` is a process of half a CPU-second, and
    # `dvc remote list` prints a table whose long paths wrap.
    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise SweepError("no default DVC remote: candidates need one (dvc remote add -d NAME URL) or --remote URL")
        return name, repo.config["remote"][name]["url"]


def apply_winner(root: Path, winner: str, rev: str, remote_name: str, branch: str | None) -> str:
    """Make `winner` (experiment commit `rev`) the workspace's state (outputs from the DVC remote), or a branch."""
    if branch:
        command([*DVC, "exp", "branch", winner, branch], root, what=f"branching experiment {winner}")
        return f"branch {branch}"
    # The experiment's outputs live in the DVC remote (the candidate pushed them): fetch, then apply.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # the CLI's fetch takes no revision; its API does
        repo.fetch(revs=[rev], remote=remote_name, workspace=False)
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
        remote_name = "sweep"
        set_local_remote(root_path, remote_name, remote)
    else:
        remote_name, remote = default_remote(root_path)
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
    known = experiments(root_path)
    applied = "nothing to apply"
    if winner:
        applied = apply_winner(root_path, winner, known[winner]["rev"], remote_name, branch)
    logger.info("winner: %s (%s)", winner, applied)
    summary = write_summary(root_path, params, [rows[candidate.name] for candidate in candidates], winner, known)
    return {"winner": winner, "applied": applied, "summary": str(summary), "candidates": list(rows.values())}


def apply_best(root: Path, branch: str | None = None) -> dict:
    """Rank the experiments already on HEAD (however they were made) and apply the best: `--apply-best`."""
    params = load_params(root / DEFAULT_PARAMS_PATH)
    known = experiments(root)
    if not known:
        raise SweepError("no experiments with metrics on HEAD (dvc exp show): nothing to choose from")
    winner = rank(known, params.select_best.monitor)[0]
    applied = apply_winner(root, winner, known[winner]["rev"], default_remote(root)[0], branch)
    baseline = yaml.safe_load(command(["git", "show", f"HEAD:{DEFAULT_PARAMS_PATH}"], root, what="reading params"))
    rows = [
        {"name": name, "overrides": changed_params(baseline, data["params"] or {}), "metrics": data["metrics"]}
        | {"outcome": "existing"}
        for name, data in known.items()
    ]
    return {"winner": winner, "applied": applied, "summary": str(write_summary(root, params, rows, winner, known))}


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
