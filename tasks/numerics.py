"""How TensorFlow's CPU kernels compute: the same bytes on every CPU of the pool, or every ISA the CPU has.

oneDNN picks its kernels at run time from the CPU's instruction sets (AVX2, AVX-512, AMX),
and kernels of different widths add in different orders: the same commit and params then
train to different weights on different CPUs. Portable mode caps oneDNN at AVX2 kernels,
which every CPU of the pool has, and fixes the number of threads that split each reduction.
Native mode leaves both to the machine, for speed.
"""

from __future__ import annotations

import os

from tasks.params import NumericsParams

# The widest instruction set every CPU of the pool has (Zen 3 has no AVX-512).
PORTABLE_MAX_ISA = "AVX2"


def numerics_environment(numerics: NumericsParams) -> dict[str, str]:
    """The environment variables that put TensorFlow and oneDNN in `numerics.mode`."""
    # oneDNN kernels for TensorFlow's convolutions and matmuls (on by default only on AVX-512
    # CPUs): on AVX2 machines they halve training time (docs/speed.md).
    settings = {"TF_ENABLE_ONEDNN_OPTS": "1"}
    if numerics.mode == "portable":
        settings |= {
            "ONEDNN_MAX_CPU_ISA": PORTABLE_MAX_ISA,
            # No implicit bf16/tf32 down-conversion, whatever the CPU offers (oneDNN's default, pinned).
            "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
            # oneDNN runs on TensorFlow's intra-op pool; its size decides how reductions are split.
            "TF_NUM_INTRAOP_THREADS": str(numerics.threads),
        }
    return settings


def apply_numerics(numerics: NumericsParams) -> None:
    """Set `numerics_environment` in this process; call it before TensorFlow is first imported."""
    # Portable mode overrides whatever the shell set: its point is that nothing local leaks in.
    # Native mode keeps the shell's own oneDNN settings, which environment.json records.
    for key, value in numerics_environment(numerics).items():
        if numerics.mode == "portable":
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
