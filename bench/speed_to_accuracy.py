"""Speed to accuracy: full `dvc repro` from empty outputs, tutorial recipe vs speed recipe, side by side.

Usage: python -m bench.speed_to_accuracy [--recipes tutorial speed] [--repeats N] [--workdir DIR]

Each run copies the project's tracked files into a fresh folder (no DVC cache, no outputs),
links the dataset archive, applies the recipe's params and times `dvc repro` end to end.
Per-epoch times come from the checkpoint files' modification times, relative to the moment
training wrote its fingerprint (before the first epoch).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from tasks.io import read_arrays, read_json, read_table
from tasks.params import TUTORIAL_TRAIN
from tasks.train import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]

# The speed recipe is params.yaml as committed; the tutorial's is its whole train section swapped in.
RECIPES = {"tutorial": TUTORIAL_TRAIN, "speed": {}}


def fresh_project(destination: Path, recipe: dict) -> Path:
    """A copy of the tracked project with the dataset linked in and the recipe's train params."""
    if destination.exists():
        shutil.rmtree(destination)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True)
    for name in filter(None, tracked.stdout.split("\0")):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    archive = ROOT / params["ingest"]["source"]
    if not archive.exists():
        sys.exit(f"error: {archive} is missing; run `dvc pull {archive}.dvc` first (see README)")
    (destination / params["ingest"]["source"]).symlink_to(archive)
    params["train"].update(recipe)
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    return destination


def timed_repro(project: Path) -> tuple[float, float]:
    """Run `dvc repro` in `project`; return (wall seconds, peak RSS in GiB of its largest process)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--quiet"], cwd=project)
    # wait4's usage covers the process and every descendant it waited for (the stage commands).
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: dvc repro failed in {project}")
    return wall, usage.ru_maxrss / 2**20


def epoch_times(project: Path, params: dict) -> pd.DataFrame:
    """Per-epoch validation accuracy with seconds since training started (from checkpoint mtimes)."""
    # The resume folder gets each checkpoint as its epoch ends (the output folder only at the end).
    checkpoints = project / params["paths"]["resume"]
    started = (checkpoints / "fingerprint.json").stat().st_mtime
    history = read_table(project / params["paths"]["training"] / "history.csv")
    history["seconds"] = [
        (checkpoints / checkpoint_name(epoch)).stat().st_mtime - started for epoch in history["epoch"]
    ]
    return history


def measure(name: str, workdir: Path, repeat: int) -> dict:
    """One full run of a recipe: wall time, peak memory, accuracy and its per-epoch timeline."""
    project = fresh_project(workdir / f"{name}-{repeat}", RECIPES[name])
    print(f"[bench] {name} run {repeat + 1}: dvc repro in {project}", file=sys.stderr, flush=True)
    wall, peak_gib = timed_repro(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    metrics = read_json(project / params["paths"]["metrics"] / "metrics.json")
    history = epoch_times(project, params)
    train_images = read_arrays(project / params["paths"]["split"] / "train_val.npz", ("y_train",))["y_train"].size
    print(
        f"[bench] {name} run {repeat + 1}: test accuracy {metrics['test']['accuracy']}, repro {wall:.0f} s, "
        f"peak {peak_gib:.2f} GiB, epochs {history[['epoch', 'val_accuracy', 'seconds']].to_dict('records')}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "wall_s": wall,
        "peak_gib": peak_gib,
        "test_accuracy": metrics["test"]["accuracy"],
        "best_epoch": metrics["best_epoch"],
        "history": history,
        # Includes each epoch's validation pass and checkpoint write: what a user waits for.
        "images_per_s": train_images * len(history) / history["seconds"].iloc[-1],
    }


def seconds_to_reach(history: pd.DataFrame, accuracy: float) -> float | None:
    """Training seconds until the first epoch whose validation accuracy reaches `accuracy`."""
    reached = history[history["val_accuracy"] >= accuracy]
    return None if reached.empty else float(reached["seconds"].iloc[0])


def summarise(values: list[float | None]) -> str:
    """'min / median' of repeated runs, or one figure for a single run."""
    if any(value is None for value in values):
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{min(values):.4g} / {statistics.median(values):.4g}"


def main() -> None:
    """Run each recipe, print one table of figures with ratios against the tutorial."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["tutorial", "speed"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar10-bench"))
    arguments = parser.parse_args()
    runs = {name: [measure(name, arguments.workdir, r) for r in range(arguments.repeats)] for name in arguments.recipes}

    rows: dict[str, dict[str, list]] = {}
    for name, results in runs.items():
        figures = rows.setdefault(name, {})
        figures["test accuracy"] = [result["test_accuracy"] for result in results]
        figures["dvc repro wall (s)"] = [result["wall_s"] for result in results]
        figures["peak RSS (GiB)"] = [result["peak_gib"] for result in results]
        figures["train images/s"] = [result["images_per_s"] for result in results]
        figures["train s to best epoch"] = [
            float(result["history"].set_index("epoch").loc[result["best_epoch"], "seconds"]) for result in results
        ]
    if "tutorial" in runs:
        # The tutorial's own best validation accuracy is the bar each recipe must reach.
        bar = statistics.median(
            float(r["history"].set_index("epoch").loc[r["best_epoch"], "val_accuracy"]) for r in runs["tutorial"]
        )
        for name, results in runs.items():
            rows[name][f"train s to val acc {bar:.4f}"] = [seconds_to_reach(r["history"], bar) for r in results]

    machine = platform.processor() or platform.machine()
    print(f"\nmachine: {machine}, {os.cpu_count()} cores; python {platform.python_version()}")
    header = ["figure", *runs, *(f"{name} / tutorial" for name in runs if name != "tutorial" and "tutorial" in runs)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for figure in rows[next(iter(runs))]:
        cells = [summarise(rows[name][figure]) for name in runs]
        for name in runs:
            if name != "tutorial" and "tutorial" in runs:
                mine, theirs = rows[name][figure], rows["tutorial"][figure]
                ok = None not in mine and None not in theirs
                cells.append(f"{statistics.median(mine) / statistics.median(theirs):.3g}x" if ok else "-")
        print(f"| {figure} | " + " | ".join(cells) + " |")
    for name, results in runs.items():
        for index, result in enumerate(results):
            timeline = ", ".join(
                f"{row.epoch}: {row.val_accuracy:.4f} @ {row.seconds:.0f}s" for row in result["history"].itertuples()
            )
            print(f"{name} run {index + 1} val accuracy by epoch: {timeline}")


if __name__ == "__main__":
    main()
