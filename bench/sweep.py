"""Sweep scaling: the same 4-candidate sweep with 1 and with 2 Dask workers, in one invocation.

Usage: python -m bench.sweep [--max-per-class N] [--workdir DIR]

Each run is `python -m flows.sweep -S train.learning_rate=1.0,1.5,2.0,2.5 --workers N` in a
fresh committed copy of the project (default recipe, `ingest.max_per_class` images per class
so the four candidates take minutes, not an hour) with a DVC remote of its own. Prints the
wall time, each candidate's time, worker and peak memory (from the sweep's summary), and the
CPU. On 2 cores two workers cannot be faster; the point is that the same command scales out.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.predict import cpu_line
from bench.speed_to_accuracy import fresh_project, this_python_first

GRID = "train.learning_rate=1.0,1.5,2.0,2.5"


def committed_project(destination: Path, max_per_class: int) -> Path:
    """A fresh copy of the project on a data slice, its upstream stages run, with a local DVC remote, committed."""
    project = fresh_project(destination, {})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["max_per_class"] = max_per_class
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = destination.parent / f"{destination.name}-remote"
    shutil.rmtree(remote, ignore_errors=True)
    for command in (
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "-f", "team", str(remote)],
        # The slice's upstream outputs in dvc.lock, committed: a sweep runs at a commit.
        [sys.executable, "-m", "dvc", "repro", "--quiet", "split"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    return project


def timed_sweep(project: Path, workers: int) -> tuple[float, list[str]]:
    """Run the sweep; (wall seconds, the summary's candidate rows)."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.sweep", "-S", GRID, "--workers", str(workers)],
        cwd=project,
        check=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    wall = time.perf_counter() - started
    summary = (project / "artifacts/sweep/summary.md").read_text().splitlines()
    return wall, [line for line in summary if line.startswith("| `sweep-")]


def main() -> None:
    """Entry point for `python -m bench.sweep`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-per-class", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar10-bench-sweep"))
    arguments = parser.parse_args()
    this_python_first()
    results = {}
    for workers in (1, 2):
        project = committed_project(arguments.workdir / f"workers-{workers}", arguments.max_per_class)
        results[workers] = timed_sweep(project, workers)
    print(f"\n{cpu_line()}; default recipe, {arguments.max_per_class} images per class, -S {GRID}")
    for workers, (wall, rows) in results.items():
        seconds = [float(cell) for row in rows for cell in [row.split("|")[6].strip()] if re.fullmatch(r"[\d.]+", cell)]
        print(f"\n{workers} worker(s): wall {wall:.0f} s; per candidate {', '.join(f'{s:.0f}' for s in seconds)} s")
        print("| candidate | params | val acc | val loss | test acc | seconds | peak GB | worker | outcome |")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
