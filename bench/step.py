"""The training step by itself: a recipe's steady GFLOP/s without validation, checkpoints or callbacks.

Usage: python -m bench.step [--params PATH] [--seconds S]

bench.speed_to_accuracy's efficiency divides everything the train stage computed by the time
it took, validation passes and checkpoint writes included: what a user waits for. Issue #12's
target is the training step's share of the CPU's GEMM peak, so this times the step alone: the
recipe's model, built and compiled as the train stage does, trained on random images of the
recipe's batch size in a process of its own, set up in the recipe's numerics mode (as
bench.gemm). The figure is the median step after a warm-up: this VM's speed drifts, and a
median is what a run of many steps sees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.predict import cpu_line
from tasks.lib.params import DEFAULT_PARAMS_PATH

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, math, statistics, sys, time
from tasks.lib.numerics import apply_numerics, run_precision
from tasks.lib.params import load_params
params = load_params(sys.argv[1])
apply_numerics(params.numerics)
import numpy as np
from tasks.lib.flops import TRAINING_PASSES, forward_flops
from tasks.lib.model import build_model
from tasks.train import compile_model, model_options, set_up_backend, training_targets
# The team's CIFAR-10: 32x32 RGB images, 10 classes, 45,000 to train on (the schedule's length only).
train, seconds, num_classes = params.train, float(sys.argv[2]), 10
precision = run_precision(params.numerics)
set_up_backend(precision, params.seed)  # as the train stage: its precision, op determinism, graph arithmetic
model = build_model(train.model, (32, 32, 3), num_classes, **model_options(train))
compile_model(model, train, steps_per_epoch=math.ceil(45000 / train.batch_size))
rng = np.random.default_rng(params.seed)
images = rng.integers(0, 256, (train.batch_size, 32, 32, 3), dtype=np.uint8)
targets = training_targets(rng.integers(0, num_classes, train.batch_size), train, num_classes)
for _ in range(3):  # warm-up: tracing, kernel selection, the thread pool
    model.train_on_batch(images, targets)
steps, deadline = [], time.perf_counter() + seconds
while time.perf_counter() < deadline or len(steps) < 5:
    started = time.perf_counter()
    model.train_on_batch(images, targets)
    steps.append(time.perf_counter() - started)
step_s = statistics.median(steps)
gflop = TRAINING_PASSES * forward_flops(model) * train.batch_size / 1e9  # as compute.json counts it
print(json.dumps({"precision": precision, "steps": len(steps), "step_s": step_s, "gflop_per_step": gflop,
                  "gflop_per_s": gflop / step_s}))
"""


def step_figures(params_path: Path, seconds: float = 20.0) -> dict:
    """The median training step of the recipe in `params_path`: its seconds, GFLOP, GFLOP/s and precision."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(params_path), str(seconds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench.step on {params_path} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    """Entry point for `python -m bench.step`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / DEFAULT_PARAMS_PATH)
    parser.add_argument("--seconds", type=float, default=20.0)
    arguments = parser.parse_args()
    figures = step_figures(arguments.params, arguments.seconds)
    print(cpu_line())
    print(
        f"{arguments.params}: {figures['precision']}, median of {figures['steps']} steps"
        f" {figures['step_s'] * 1e3:.0f} ms, {figures['gflop_per_step']:.1f} GFLOP a step,"
        f" {figures['gflop_per_s']:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
