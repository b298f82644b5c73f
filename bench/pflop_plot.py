"""Test accuracy against training PFLOP, drawn from the committed figures in bench/accuracy_vs_pflop.csv."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
# One row a measured point: its PFLOP, test accuracy, machine, date, commit and the command that reproduces it.
FIGURES = ROOT / "bench" / "accuracy_vs_pflop.csv"
# Issue #12's budgets: the default's 0.05 PFLOP, and airbench94's 0.36 for its 94 % (the long profile's).
BUDGETS = {0.05: "default's budget (0.05)", 0.36: "airbench94's budget (0.36)"}
MARKERS = {"NVIDIA H100": "s", "NVIDIA H200": "^"}


def read_figures(path: Path = FIGURES) -> list[dict]:
    """The committed points, with PFLOP and accuracy as numbers."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["pflop"], row["test_accuracy"] = float(row["pflop"]), float(row["test_accuracy"])
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The points as the markdown table docs/speed.md quotes, cheapest first; † marks a throwaway loop's figure."""
    lines = [
        "| training PFLOP | run | test accuracy | machine | date | command |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda row: (row["pflop"], row["test_accuracy"])):
        mark = " †" if "throwaway" in row["note"] else ""
        lines.append(
            f"| {row['pflop']:g} | {row['label']}{mark} | {row['test_accuracy']:.4f} | {row['machine']} "
            f"| {row['date']} ({row['commit']}) | `{row['command']}` |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Accuracy against PFLOP on a log axis: recipes labelled, other budgets smaller, one marker per machine kind."""
    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=120)
    for pflop, text in BUDGETS.items():
        axes.axvline(pflop, color="0.6", linestyle=":", linewidth=1)
        axes.text(pflop * 1.04, 0.615, text, rotation=90, color="0.4", fontsize=8, va="bottom")
    machines = sorted({row["machine"] for row in rows})
    colours = dict(zip(machines, plt.get_cmap("tab10").colors, strict=False))
    for machine in machines:
        for kind, size in (("recipe", 70), ("budget", 30)):
            points = [row for row in rows if row["machine"] == machine and row["kind"] == kind]
            gpu = machine in MARKERS  # hollow, so a CPU's point at the same place shows through
            axes.scatter(
                [row["pflop"] for row in points],
                [row["test_accuracy"] for row in points],
                s=size * (1.6 if gpu else 1),
                marker=MARKERS.get(machine, "o"),
                facecolors="none" if gpu else colours[machine],
                edgecolors=colours[machine],
                linewidths=1.5,
                label=machine if kind == "recipe" and points else None,
                zorder=3 if gpu else 4,
            )
    labelled = set()
    for row in rows:
        if row["kind"] == "recipe" and row["label"] not in labelled:
            labelled.add(row["label"])
            axes.annotate(row["label"], _at(row), **_note((8, -12)))
    long_curve = sorted(
        (row for row in rows if row["machine"] == "NVIDIA H200" and row["label"].startswith("long ")),
        key=lambda row: row["pflop"],
    )
    axes.plot([row["pflop"] for row in long_curve], [row["test_accuracy"] for row in long_curve], color="0.5", lw=1)
    axes.annotate("H200: long at 20 and 40 epochs", _at(long_curve[-1]), **_note((-150, 6)))
    axes.set(
        xscale="log",
        xlim=(0.002, 2.5),
        ylim=(0.6, 0.95),
        xlabel="training PFLOP (counted from the model, tasks/lib/flops.py)",
        ylabel="test accuracy (10,000 test images)",
        title="CIFAR-10 (the team's JPEG copy): test accuracy against training compute",
    )
    axes.grid(True, which="both", color="0.92")
    axes.legend(title="machine (small: other budgets)", loc="upper left", fontsize=8, title_fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def _at(row: dict) -> tuple[float, float]:
    return row["pflop"], row["test_accuracy"]


def _note(offset: tuple[int, int]) -> dict:
    return {"textcoords": "offset points", "xytext": offset, "fontsize": 8}


def main() -> None:
    """Entry point for `python -m bench.pflop_plot`: write the PNG and print the table it shows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy_vs_pflop.png")
    arguments = parser.parse_args()
    rows = read_figures(arguments.figures)
    plot(rows, arguments.out)
    print(markdown_table(rows))
    print(f"\nwrote {arguments.out}")


if __name__ == "__main__":
    main()
