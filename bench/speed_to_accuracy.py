"""Speed to accuracy: full `dvc repro` from empty outputs, the tutorial, the default and the long profile side by side.

Usage: python -m bench.speed_to_accuracy [--recipes tutorial speed long] [--repeats N] [--workdir DIR]

Each run copies the project's tracked files into a fresh folder (no DVC cache, no outputs),
links the dataset archive, applies the recipe's params and times `dvc repro` end to end.
Per-epoch times come from the checkpoint files' modification times, relative to the moment
training wrote its fingerprint (before the first epoch). Compute comes from the run's own
compute.json (counted from the model, tasks/lib/flops.py); the CPU's GEMM peak from bench.gemm,
measured in the same invocation, in the numerics mode and precision each run used. Two
efficiencies: the train stage's (everything it computed, validation included, over its
training time) and the training step's by itself (bench.step, timed after all runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from bench.gemm import gemm_peaks
from bench.predict import cpu_line
from bench.step import step_figures
from bench.timeline import seconds_to_reach, with_epoch_seconds
from flows import stage_command_environment
from tasks.lib.io import read_json, read_table
from tasks.lib.params import LONG_TRAIN, TUTORIAL_TRAIN
from tasks.train import images_trained

ROOT = Path(__file__).resolve().parents[1]

# Params sections each recipe changes: the speed recipe is params.yaml as committed (portable
# numerics); `native` is the same with every instruction set of the CPU (bf16 where it has it);
# the tutorial's is its whole train section swapped in; `short` and `long` run native.
NATIVE = {"numerics": {"mode": "native", "precision": "auto"}}
RECIPES = {
    "tutorial": {"train": TUTORIAL_TRAIN},
    "speed": {},
    "native": NATIVE,
    # A short schedule for the tutorial's bar: the speed recipe for 0.4 of an epoch (71 steps of 256),
    # cosine-annealed to 0; the smallest measured to pass it (docs/speed.md, levers tried). Without
    # lookahead: averaging over so few steps lags the weights (3 seeds: 0.687 with it, 0.697 without).
    "short": {"train": {"epochs": 0.4, "batch_size": 256, "lookahead": None}, **NATIVE},
    "long": {"train": LONG_TRAIN, **NATIVE},
}


def this_python_first() -> None:
    """Make this interpreter the `python` of every dvc command the benchmark starts."""
    os.environ.update(stage_command_environment())


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
    for section, values in recipe.items():
        params[section].update(values)
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
    history = read_table(project / params["paths"]["training"] / "history.csv")
    return with_epoch_seconds(history, project / params["paths"]["resume"])


def measure(name: str, workdir: Path, repeat: int) -> dict:
    """One full run of a recipe: wall time, peak memory, accuracy, compute and its per-epoch timeline."""
    project = fresh_project(workdir / f"{name}-{repeat}", RECIPES[name])
    print(f"[bench] {name} run {repeat + 1}: dvc repro in {project}", file=sys.stderr, flush=True)
    wall, peak_gib = timed_repro(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    metrics = read_json(project / params["paths"]["metrics"] / "metrics.json")
    environment = read_json(project / params["paths"]["metrics"] / "environment.json")
    compute = read_json(project / params["paths"]["training"] / "compute.json")
    history = epoch_times(project, params)
    training_s = float(history["seconds"].iloc[-1])
    # As the train stage counts them for compute.json: a fractional last epoch's batches too.
    trained_images = images_trained(compute["epochs"], compute["train_images"], params["train"]["batch_size"])
    print(
        f"[bench] {name} run {repeat + 1}: test accuracy {metrics['test']['accuracy']}, repro {wall:.0f} s, "
        f"peak {peak_gib:.2f} GiB, {compute['training_pflop']} PFLOP, {environment['precision']}, "
        f"epochs {history[['epoch', 'val_accuracy', 'seconds']].to_dict('records')}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "params_path": project / "params.yaml",
        "wall_s": wall,
        "peak_gib": peak_gib,
        "test_accuracy": metrics["test"]["accuracy"],
        "best_epoch": metrics["best_epoch"],
        "history": history,
        "numerics": (environment["numerics"], environment["precision"]),
        "training_pflop": compute["training_pflop"],
        # Includes each epoch's validation pass and checkpoint write: what a user waits for.
        "images_per_s": trained_images / training_s,
        # Everything the training stage computed (its validation passes too) per second it took.
        "gflop_per_s": (compute["training_pflop"] + compute["validation_pflop"]) * 1e6 / training_s,
    }


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
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["tutorial", "speed", "long"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar10-bench"))
    arguments = parser.parse_args()
    this_python_first()
    runs = {name: [measure(name, arguments.workdir, r) for r in range(arguments.repeats)] for name in arguments.recipes}
    print("[bench] GEMM peaks (matmul 2048x2048) in each numerics mode and precision", file=sys.stderr, flush=True)
    peaks = gemm_peaks()
    print("[bench] each recipe's training step by itself (bench.step)", file=sys.stderr, flush=True)
    steps = {name: step_figures(results[0]["params_path"]) for name, results in runs.items()}

    rows: dict[str, dict[str, list]] = {}
    for name, results in runs.items():
        figures = rows.setdefault(name, {})
        figures["test accuracy"] = [result["test_accuracy"] for result in results]
        figures["dvc repro wall (s)"] = [result["wall_s"] for result in results]
        figures["peak RSS (GiB)"] = [result["peak_gib"] for result in results]
        figures["training PFLOP (counted)"] = [result["training_pflop"] for result in results]
        figures["test accuracy per training PFLOP"] = [r["test_accuracy"] / r["training_pflop"] for r in results]
        figures["train images/s"] = [result["images_per_s"] for result in results]
        figures["achieved GFLOP/s"] = [result["gflop_per_s"] for result in results]
        figures["GEMM peak GFLOP/s (same mode)"] = [peaks[result["numerics"]] for result in results]
        figures["efficiency (achieved / peak)"] = [r["gflop_per_s"] / peaks[r["numerics"]] for r in results]
        figures["training step GFLOP/s (median step alone)"] = [steps[name]["gflop_per_s"]]
        figures["step efficiency (step / peak)"] = [steps[name]["gflop_per_s"] / peaks[results[0]["numerics"]]]
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

    print(f"\n{cpu_line()}; python {sys.version.split()[0]}")
    print("numerics: " + ", ".join(f"{name} {'/'.join(results[0]['numerics'])}" for name, results in runs.items()))
    print(
        "GEMM peaks: "
        + ", ".join(f"{mode} {precision} {gflops:.0f} GFLOP/s" for (mode, precision), gflops in peaks.items())
    )
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
