"""Where `make run` spends the time that is not training: set-up, Prefect's start, each stage, train's epochs.

Usage: python -m bench.overhead [--workdir DIR]

Clones this repository's HEAD into DIR/main with ../shared linked beside it, as CI and a new
user have it, then times `make setup` and `make run` there (no PREFECT_API_URL: the flow starts
its temporary server, as on a desk). The flow's log says when each stage started and ended;
train's epochs, each with its validation pass and checkpoint write, are timed from the
checkpoint files (bench.timeline). The rest is what issue #34 calls not training: set-up,
imports, ingest, evaluate and Prefect's start.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from bench.predict import cpu_line
from bench.timeline import with_epoch_seconds
from flows.pipeline import STAGES
from tasks.lib.io import read_table

ROOT = Path(__file__).resolve().parents[1]
DAY_S = 24 * 60 * 60
# Prefect's console lines: "02:09:47.019 | INFO    | Task run 'ingest-cc6' - stage ingest: running (...)".
_STAGE_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d(?:\.\d+)?) \| INFO .* - stage (\w+): (running|done in)", re.M)


def stage_spans(log: str, launched_s: float) -> dict[str, tuple[float, float]]:
    """{stage: (start, end)} in seconds after `launched_s` (seconds since midnight), from the flow's log."""
    spans: dict[str, list[float]] = {}
    for hours, minutes, seconds, stage, event in _STAGE_LINE.findall(log):
        at = int(hours) * 3600 + int(minutes) * 60 + float(seconds) - launched_s
        spans.setdefault(stage, []).append(at % DAY_S)  # a run across midnight
        if event == "running" and len(spans[stage]) != 1:
            raise ValueError(f"stage {stage} started twice in the flow's log")
    missing = [stage for stage in STAGES if len(spans.get(stage, ())) != 2]
    if missing:
        raise ValueError(f"the flow's log has no start and end for {', '.join(missing)}: did every stage run?")
    return {stage: (spans[stage][0], spans[stage][1]) for stage in STAGES}


def breakdown(setup_s: float, run_s: float, spans: dict[str, tuple[float, float]], epochs_s: float) -> list[tuple]:
    """(part, seconds) rows: set-up, the flow's start, each stage (train split in epochs and the rest), the end."""
    rows = [("set-up (`make setup`: the venv from the lock)", setup_s)]
    rows.append(("flow start: Python, Prefect's temporary server, the source's `dvc pull`", spans[STAGES[0]][0]))
    previous_end = spans[STAGES[0]][0]
    between = 0.0
    for stage in STAGES:
        start, end = spans[stage]
        between += start - previous_end
        previous_end = end
        if stage == "train":
            rows.append(("train: epochs (steps, validation, checkpoints)", epochs_s))
            rows.append(("train: the rest (imports, data, model, DVC)", end - start - epochs_s))
        else:
            rows.append((f"{stage} (its `dvc repro --single-item`)", end - start))
    rows.append(("between stages (DVC's status checks)", between))
    rows.append(("flow end (summary, temporary server stopped)", run_s - previous_end))
    total = setup_s + run_s
    rows.append(("**total**", total))
    rows.append(("**not training** (total - epochs)", total - epochs_s))
    return rows


def timed(command: list[str], cwd: Path, environment: dict, log: Path) -> float:
    """Run `command` in `cwd` with its output in `log`; its wall seconds (exits on failure)."""
    start = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=cwd, env=environment, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} exited {result.returncode} in {cwd}; see {log}")
    return time.perf_counter() - start


def fresh_clone(workdir: Path, rev: str | None = None, source: Path = ROOT) -> tuple[Path, dict]:
    """`source` cloned into `workdir`/main at `rev` (default HEAD), ../shared beside it; a shell's environment."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    project = workdir / "main"
    subprocess.run(["git", "clone", "--quiet", str(source), str(project)], check=True)
    if rev:
        subprocess.run(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", rev], cwd=project, check=True)
    (workdir / "shared").symlink_to((source.parent / "shared").resolve())
    # A shell's environment, not this venv's: the clone builds and uses its own.
    environment = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "VIRTUAL_ENV")}
    return project, environment


def commit_of(project: Path) -> str:
    """The short commit `project` has checked out."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True)
    return result.stdout.strip()


def main() -> None:
    """Clone, time `make setup` and `make run`, print where the time went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar10-overhead"))
    arguments = parser.parse_args()
    project, environment = fresh_clone(arguments.workdir)
    print(f"[overhead] make setup, then make run, in {project}", file=sys.stderr, flush=True)
    setup_s = timed(["make", "setup"], project, environment, arguments.workdir / "setup.log")
    now = datetime.now()
    launched_s = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    run_s = timed(["make", "run"], project, environment, arguments.workdir / "run.log")
    spans = stage_spans((arguments.workdir / "run.log").read_text(), launched_s)
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    history = with_epoch_seconds(read_table(project / paths["training"] / "history.csv"), project / paths["resume"])
    print(f"\n{cpu_line()}; commit {commit_of(project)}")
    print("| part | seconds |\n| --- | --- |")
    for part, seconds in breakdown(setup_s, run_s, spans, float(history["seconds"].iloc[-1])):
        print(f"| {part} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
