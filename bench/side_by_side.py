"""Ours against the peer, airbench94 trained by its own code, at each training budget: one machine, one run.

Usage: python -m bench.side_by_side [--budgets 0.01 0.03 0.1 0.3] [--seeds 0 1] [--peer-python PATH] [--out DIR]

`make peer-setup` first (the peer's torch and airbench in .venv-peer), and `dvc repro split` (or
`make run`) for the arrays both train on: the train split's 45,000 images, tested on the 10,000
test images. A budget is training PFLOP, counted for both by one formula (tasks/lib/flops.py's
conv_flops and dense_flops: conv and dense layers, 3 passes a training image). The peer reaches
it by its step count (airbench94's epochs); ours with the recipe we think best there: the
default net with its epochs stretched up to 0.2 PFLOP, the long profile's wider net above.
Every run is a process of its own, so its wall time and peak memory are its own; runs go one
at a time. Ours trains in native numerics (bfloat16 where the CPU has it), the peer in float32
(torch on a CPU). Test-time compute is counted apart: ours 2 views an image, the peer's 6.
Writes DIR/side_by_side.md and DIR/side_by_side.png (default bench/results/, not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.predict import cpu_line

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
LONG_ABOVE_PFLOP = 0.2  # from here on ours trains the long profile's net instead of the default's


def our_plan(budget: float, train_images: int) -> dict:
    """Ours at `budget` PFLOP: the recipe and the epochs that spend it."""
    from tasks.lib.flops import PFLOP, TRAINING_PASSES, forward_flops
    from tasks.lib.model import build_model
    from tasks.lib.params import LONG_TRAIN, load_params

    recipe = "long" if budget > LONG_ABOVE_PFLOP else "speed"
    widths = LONG_TRAIN["widths"] if recipe == "long" else load_params(ROOT / "params.yaml").train.widths
    forward = forward_flops(build_model("speed_cnn", (32, 32, 3), 10, widths=tuple(widths)))
    epochs = budget * PFLOP / (TRAINING_PASSES * forward * train_images)
    return {"recipe": recipe, "epochs": round(epochs, 3)}


def peer_plan(budget: float, peer: dict) -> dict:
    """The peer at `budget` PFLOP: the epochs (fractional) that give the nearest whole number of steps."""
    steps = max(1, round(budget / peer["pflop_per_step"]))
    # train94 runs ceil(steps per epoch x epochs) steps: a hair under `steps` epochs' worth gives exactly `steps`.
    return {"epochs": round((steps - 0.01) / peer["steps_per_epoch"], 4), "steps": steps}


def measured(command: list[str], report: Path) -> dict:
    """Run one training process to its end; its JSON report, with its peak RSS as the kernel counted it."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed ({os.waitstatus_to_exitcode(status)})")
    figures = json.loads(report.read_text())
    figures["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    return figures


def markdown(rows: list[dict], cpu: str) -> str:
    """One row a budget and system: PFLOP, test accuracy (mean and spread of the seeds), time, rate, memory."""
    lines = [
        f"Machine: {cpu}",
        "",
        "| budget | system | training PFLOP | test accuracy | seeds | training s | images/s | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        accuracies = row["accuracies"]
        mean = sum(accuracies) / len(accuracies)
        spread = f" ± {(max(accuracies) - min(accuracies)) / 2:.4f}" if len(accuracies) > 1 else ""
        lines.append(
            f"| {row['budget']} | {row['system']} | {row['pflop']} | {mean:.4f}{spread} | {len(accuracies)} "
            f"| {row['training_s']} | {row['images_per_s']} | {row['peak_gib']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, cpu: str) -> None:
    """Test accuracy against training PFLOP for both systems, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for system, marker in (("ours", "o"), ("airbench94", "s")):
        points = [row for row in rows if row["system"].startswith(system)]
        for row in points:
            axes.scatter([row["pflop"]] * len(row["accuracies"]), row["accuracies"], marker=marker, color="0.6", s=12)
        means = [sum(row["accuracies"]) / len(row["accuracies"]) for row in points]
        axes.plot([row["pflop"] for row in points], means, marker=marker, label=system)
    axes.set_xscale("log")
    axes.set_xlabel("training PFLOP (tasks/lib/flops.py's count, both systems)")
    axes.set_ylabel("test accuracy (10,000 test images)")
    axes.set_title(f"Side by side on the team's CIFAR-10\n{cpu}", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    """Train both systems at every budget and seed, one run at a time; print and write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    arguments = parser.parse_args()
    if not arguments.peer_python.exists():
        parser.error(f"{arguments.peer_python}: no peer environment (make peer-setup)")
    train_split = ROOT / "data/split/train_val.npz"
    if not train_split.exists():
        parser.error(f"{train_split}: no train split (dvc repro split, or make run)")
    cpu = cpu_line()
    peer_script = [str(arguments.peer_python), str(ROOT / "bench" / "peer.py")]
    peer = json.loads(subprocess.run([*peer_script, "--describe"], check=True, capture_output=True).stdout)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        for budget in arguments.budgets:
            ours, theirs = our_plan(budget, peer["train_images"]), peer_plan(budget, peer)
            runs = {
                f"ours ({ours['recipe']}, {ours['epochs']} epochs)": [
                    sys.executable, "-m", "bench.accelerator", "--recipe", ours["recipe"],
                    "--epochs", str(ours["epochs"]), "--report", str(report),
                ],
                f"airbench94 ({theirs['epochs']} epochs)": [
                    *peer_script, "--epochs", str(theirs["epochs"]), "--report", str(report),
                ],
            }  # fmt: skip
            for system, command in runs.items():
                results = []
                for seed in arguments.seeds:
                    print(f"[side_by_side] {budget} PFLOP, {system}, seed {seed}", file=sys.stderr, flush=True)
                    results.append(measured([*command, "--seed", str(seed)], report))
                rows.append(
                    {
                        "budget": budget,
                        "system": system,
                        "pflop": results[0]["training_pflop"],
                        "accuracies": [result["test_accuracy"] for result in results],
                        "training_s": round(sum(result["training_s"] for result in results) / len(results), 1),
                        "images_per_s": round(sum(result["images_per_s"] for result in results) / len(results)),
                        "peak_gib": max(result["peak_rss_gib"] for result in results),
                    }
                )
    arguments.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, cpu)
    (arguments.out / "side_by_side.md").write_text(table)
    plot(rows, arguments.out / "side_by_side.png", cpu)
    print(table)
    print(f"wrote {arguments.out / 'side_by_side.md'} and {arguments.out / 'side_by_side.png'}")


if __name__ == "__main__":
    main()
