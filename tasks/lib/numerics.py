"""How TensorFlow's CPU kernels compute: the same bytes on every CPU of the pool, or every ISA the CPU has.

oneDNN picks its kernels at run time from the CPU's instruction sets (AVX2, AVX-512, AMX),
and kernels of different widths add in different orders: the same commit and params then
train to different weights on different CPUs. Portable mode caps oneDNN at AVX2 kernels,
which every CPU of the pool has, and fixes the number of threads that split each reduction.
Native mode leaves both to the machine, for speed, and computes on a GPU where one is visible.
Portable mode hides GPUs: their kernels add in yet other orders.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

from tasks.lib.imports import import_without_collection
from tasks.lib.params import NumericsParams, ParamsError

# The widest instruction set every CPU of the pool has (Zen 3 has no AVX-512).
PORTABLE_MAX_ISA = "AVX2"
# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic in hardware (Zen 4/5, Cooper Lake, Sapphire Rapids on).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags, from /proc/cpuinfo (empty where there is none)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    )


def _isa_allows_bf16(max_isa: str | None) -> bool:
    """Whether oneDNN capped at `max_isa` (ONEDNN_MAX_CPU_ISA; None: uncapped) still has bf16 kernels."""
    if max_isa is None or max_isa.upper() in ("ALL", "DEFAULT"):
        return True
    return any(name in max_isa.upper() for name in ("BF16", "FP16", "AMX", "AVX10"))


def bf16_runs_here(flags: frozenset[str] | None = None, max_isa: str | None = None) -> bool:
    """Whether this process can compute in bfloat16: bf16 instructions, and oneDNN not capped below them."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & BF16_CPU_FLAGS) and _isa_allows_bf16(max_isa or os.environ.get("ONEDNN_MAX_CPU_ISA"))


def compute_precision(
    numerics: NumericsParams, flags: frozenset[str], max_isa: str | None = None, gpus: int = 0
) -> str:
    """float32 or bfloat16: what training computes in, given the CPU's `flags`, oneDNN's ISA cap and visible GPUs."""
    if numerics.mode == "portable":
        return "float32"
    # GPUs from Ampere (compute capability 8.0) on have bf16 tensor cores; on older ones (V100, T4)
    # bf16 is slow or missing: set precision float32 there.
    usable = gpus > 0 or (bool(flags & BF16_CPU_FLAGS) and _isa_allows_bf16(max_isa))
    if numerics.precision == "auto":
        return "bfloat16" if usable else "float32"
    if numerics.precision == "bfloat16" and not usable:
        # Else oneDNN fails deep in the first convolution ("could not create a primitive descriptor").
        raise ParamsError(
            "numerics.precision: bfloat16 needs a GPU, or a CPU with bf16 instructions (avx512_bf16 or amx_bf16) "
            f"and oneDNN not capped below them (ONEDNN_MAX_CPU_ISA={max_isa or 'unset'}): use auto or float32"
        )
    return numerics.precision


def run_precision(numerics: NumericsParams) -> str:
    """What training computes in on this machine and in this process (`compute_precision` with its facts)."""
    # Portable mode never looks for GPUs: it hides them, and the question would import the backend.
    gpus = visible_gpus() if numerics.mode == "native" else 0
    return compute_precision(numerics, cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"), gpus=gpus)


def visible_gpus() -> int:
    """How many GPUs the Keras backend (TensorFlow or JAX) computes on here; imports the backend."""
    import keras

    try:
        return len(keras.distribution.list_devices("gpu"))
    except RuntimeError:  # JAX's answer where it has no GPU platform
        return 0


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
            # Train on the CPU even where a GPU is visible (TensorFlow's CUDA build, or JAX's).
            "CUDA_VISIBLE_DEVICES": "-1",
            "JAX_PLATFORMS": "cpu",
        }
    return settings


def keep_graph_arithmetic() -> None:
    """Turn off Grappler's arithmetic rewrites in this process (TensorFlow backend); imports the backend.

    When a graph runs, Grappler rewrites x / sqrt(y) into x * Rsqrt(y), and Rsqrt's CPU kernel
    starts from the approximate vrsqrtps, whose last bits differ between Intel and AMD. In the
    graphs as run (TF_DUMP_GRAPH_PREFIX), batch norm's inference path had 6 Rsqrt and the
    tutorial's RMSprop 10; with the rewrites off, none (tests/test_numerics.py).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})


def _initialising(package: str) -> bool:
    """Whether `package` is being imported right now (its __init__ has started and not ended)."""
    module = sys.modules.get(package)
    return module is not None and getattr(module.__spec__, "_initializing", False)


# Packages that TensorFlow and Keras import if installed, and do without otherwise, none of which
# a stage needs from them: TFLite's converter imports jax (for JAX functions), Keras' Orbax callback
# too, Keras' image gallery matplotlib.pyplot, Keras' array slicing pandas (DataFrame inputs), and
# TensorFlow's legacy tf.keras scipy.sparse. A stage that uses one imports it itself, afterwards.
OPTIONAL_IMPORTS_OF_KERAS = frozenset({"jax", "matplotlib", "pandas", "scipy"})


class _KerasWithoutOptionalImports(importlib.abc.MetaPathFinder):
    """Refuse OPTIONAL_IMPORTS_OF_KERAS while TensorFlow or Keras initialise, unless Keras runs on another backend."""

    def find_spec(self, name, path=None, target=None):
        if name not in OPTIONAL_IMPORTS_OF_KERAS or not (_initialising("tensorflow") or _initialising("keras")):
            return None
        keras_config = sys.modules.get("keras.src.backend.config")  # set up before Keras imports its backend
        if keras_config is not None and keras_config.backend() != "tensorflow":
            return None  # JAX and the others import what they need of these as they load
        raise ModuleNotFoundError(f"{name} is not imported while TensorFlow or Keras initialise", name=name)


def keep_optional_imports_out_of_keras() -> None:
    """Let TensorFlow and Keras on TensorFlow load without jax, matplotlib, pandas and scipy, though installed."""
    # In every process that imports Keras (stages, predict, the service, the tests' processes):
    # `import keras` takes 3.1-3.5 CPU-seconds from the interpreter's start to its exit with these
    # kept out, 4.0-4.4 with jax alone kept out, 4.6-5.2 with none (Zen 4).
    if not any(isinstance(finder, _KerasWithoutOptionalImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KerasWithoutOptionalImports())


def apply_numerics(numerics: NumericsParams) -> None:
    """Set `numerics_environment` in this process; call it before TensorFlow is first imported."""
    keep_optional_imports_out_of_keras()
    import_without_collection(("keras", "tensorflow"))  # a third of the CPU `import keras` takes
    # Portable mode overrides whatever the shell set: its point is that nothing local leaks in.
    # Native mode keeps the shell's own oneDNN settings, which environment.json records.
    for key, value in numerics_environment(numerics).items():
        if numerics.mode == "portable":
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
