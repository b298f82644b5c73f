"""Predict throughput: `python -m tasks.predict` on the 10,000 test images written out as PNG files.

Usage: python -m bench.predict [--workdir DIR] [--model workspace|prod|REV]

Needs data/prepared and the evaluated model (`dvc repro` or `dvc pull`). Prints decoding and
model images/s (from predict's own log), the wall time of the whole command, and whether the
predictions equal evaluate's (artifacts/metrics/predictions.csv).
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.lib.io import read_arrays, read_class_names
from tasks.lib.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """CPU model, ISA flags that pick kernels, and core count: printed beside every figure."""
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
    wide = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    name = model.group(1) if model else platform.processor()
    return f"CPU: {name} ({' '.join(wide)}), {len(re.findall(r'^processor', info, re.M))} cores"


def main() -> None:
    """Entry point for `python -m bench.predict`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "predict")
    parser.add_argument("--model", default="workspace")
    arguments = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    test = read_arrays(params.paths.prepared / "dataset.npz", ("x_test", "y_test"))
    class_names = read_class_names(params.paths.prepared / "report.json")
    folder = arguments.workdir / "images"
    for index, (image, label) in enumerate(zip(test["x_test"], test["y_test"], strict=True)):
        path = folder / class_names[label] / f"{index:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    out = arguments.workdir / "predictions.csv"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tasks.predict", str(folder), "--model", arguments.model, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    timing = re.search(
        r"predicted (\d+) images .*decoding ([\d.]+) s, model ([\d.]+) s \((\d+) images/s\)", result.stderr
    )
    predicted = pd.read_csv(out)
    # Files are named by test index: order them as evaluate's predictions.
    predicted["index"] = predicted["path"].str.extract(r"(\d+)\.png$")[0].astype(int)
    predicted = predicted.sort_values("index")
    evaluated = pd.read_csv(params.paths.metrics / "predictions.csv")
    agree = np.mean(predicted["predicted"].to_numpy() == evaluated["predicted"].to_numpy())
    print(f"\n{cpu_line()}")
    images, decoding, model, rate = timing.groups()
    print(f"images: {images}; decoding {decoding} s; model {model} s = {rate} images/s")
    print(f"whole command (imports and model load included): {wall:.1f} s = {len(predicted) / wall:.0f} images/s")
    print(f"predictions equal to evaluate's: {agree:.4%}")


if __name__ == "__main__":
    main()
