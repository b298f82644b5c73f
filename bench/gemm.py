"""The CPU's own GEMM peak: TensorFlow's matmul GFLOP/s in each numerics mode and precision.

Usage: python -m bench.gemm [--size N] [--seconds S]

A large square matmul is the fastest thing oneDNN does on a CPU; the training step's achieved
GFLOP/s is compared against it (bench.speed_to_accuracy's efficiency). Each measurement runs
in a process of its own, set up by tasks.lib.numerics as the pipeline's stages are, because the
mode must be in place before TensorFlow starts: portable caps oneDNN at AVX2 on 2 threads,
native uses every instruction set (AVX-512, AMX) and core. bfloat16 is measured in native mode
only, and only on CPUs with bf16 instructions (elsewhere it would be emulated).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.predict import cpu_line
from tasks.lib.numerics import BF16_CPU_FLAGS, cpu_flags

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, time
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import NumericsParams
apply_numerics(NumericsParams(mode=sys.argv[1]))
import tensorflow as tf
size, dtype, seconds = int(sys.argv[3]), getattr(tf, sys.argv[2]), float(sys.argv[4])
a = tf.cast(tf.random.normal((size, size)), dtype)
b = tf.cast(tf.random.normal((size, size)), dtype)
matmul = tf.function(lambda x, y: tf.matmul(x, y))
matmul(a, b).numpy()  # warm-up: kernel selection, thread pool
best, deadline = 0.0, time.perf_counter() + seconds
while time.perf_counter() < deadline:
    started = time.perf_counter()
    matmul(a, b).numpy()
    best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
print(best)
"""


def gemm_gflops(mode: str, dtype: str, size: int = 2048, seconds: float = 5.0) -> float:
    """The best GFLOP/s of a `size`-square matmul in `dtype` over `seconds`, in numerics mode `mode`."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode, dtype, str(size), str(seconds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.split()[-1])


def gemm_peaks(size: int = 2048, seconds: float = 5.0) -> dict[tuple[str, str], float]:
    """{(mode, precision): GFLOP/s} for portable float32, native float32 and, where the CPU has it, native bfloat16."""
    cases = [("portable", "float32"), ("native", "float32")]
    if cpu_flags() & BF16_CPU_FLAGS:
        cases.append(("native", "bfloat16"))
    return {case: gemm_gflops(*case, size=size, seconds=seconds) for case in cases}


def main() -> None:
    """Entry point for `python -m bench.gemm`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=5.0)
    arguments = parser.parse_args()
    print(cpu_line())
    for (mode, precision), gflops in gemm_peaks(arguments.size, arguments.seconds).items():
        print(f"{mode:8} {precision:8} {gflops:8.0f} GFLOP/s (matmul {arguments.size}x{arguments.size})")


if __name__ == "__main__":
    main()
