"""Numerics modes side by side: the train stage on the workspace's split, portable twice and native once.

Usage: python -m bench.numerics [--epochs N] [--workdir DIR]

Needs data/split and data/prepared (`dvc repro` or `dvc pull` first). Each run is the train
stage's own command with params.yaml's recipe, `train.epochs` = N and `numerics.mode` set, its
outputs in DIR; prints wall time, the last epoch's figures, and whether the two portable runs
agree to the last bit (they must) and native differs (it does where the CPU has AVX-512).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.predict import cpu_line
from tasks.lib.io import read_table, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def train_in(mode: str, tag: str, epochs: int, workdir: Path) -> tuple[float, Path]:
    """Run the train stage in `mode`; (wall seconds, its history.csv)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["numerics"]["mode"] = mode
    params["train"]["epochs"] = epochs
    for key in ("resume", "checkpoints", "training"):
        params["paths"][key] = str(workdir / tag / key)
    path = workdir / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(path)], cwd=ROOT, check=True)
    return time.perf_counter() - started, workdir / tag / "training" / "history.csv"


def main() -> None:
    """Entry point for `python -m bench.numerics`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "numerics")
    arguments = parser.parse_args()
    runs = {
        tag: train_in(mode, tag, arguments.epochs, arguments.workdir)
        for tag, mode in (("portable", "portable"), ("portable-again", "portable"), ("native", "native"))
    }
    print(f"\n{cpu_line()}; train stage, default recipe, {arguments.epochs} epoch(s)")
    print("| mode | wall s | s per epoch | val_accuracy | val_crossentropy | history sha256 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tag, (seconds, history_path) in runs.items():
        last = read_table(history_path).iloc[-1]
        print(
            f"| {tag} | {seconds:.0f} | {seconds / arguments.epochs:.0f} | {last['val_accuracy']:.4f} "
            f"| {last['val_crossentropy']:.4f} | {sha256_file(history_path)[:12]} |"
        )
    digests = {tag: sha256_file(history) for tag, (_, history) in runs.items()}
    print(f"portable twice byte-identical: {digests['portable'] == digests['portable-again']}")
    print(f"native differs from portable: {digests['native'] != digests['portable']}")
    print(f"portable costs {runs['portable'][0] / runs['native'][0]:.2f}x native's wall time here")


if __name__ == "__main__":
    main()
