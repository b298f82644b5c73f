"""Numerics mode: portable caps oneDNN's kernels and threads, native uses the whole CPU; both reach training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.lib.numerics import bf16_runs_here, compute_precision, cpu_flags, numerics_environment
from tasks.lib.params import NumericsParams, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]

# Train a small conv net through the stages' own set-up (tasks.lib.numerics), with oneDNN's
# verbose log on: it names the instruction set oneDNN settled on and each kernel it ran.
PROBE = """
import sys
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import NumericsParams
apply_numerics(NumericsParams(mode=sys.argv[1], threads=int(sys.argv[2])))
import keras, numpy as np
images = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(32, 3), keras.layers.Flatten(),
                          keras.layers.Dense(10)])
model.compile("sgd", "mse")
model.fit(images, np.zeros((16, 10), np.float32), epochs=1, verbose=0)
"""


def cpu_has_avx512() -> bool:
    """Whether oneDNN may pick AVX-512 kernels here: the CPU has them, and the shell does not cap oneDNN below."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    uncapped = cap in ("ALL", "DEFAULT") or any(name in cap for name in ("AVX512", "AVX10", "AMX"))
    return "avx512f" in cpu_flags() and uncapped


# Where a claim needs the hardware itself (AVX-512 kernels, bf16 arithmetic), its test says so
# in a visible skip; the other side of each such claim is forced with a oneDNN cap and runs everywhere.
needs_avx512 = pytest.mark.skipif(not cpu_has_avx512(), reason="needs a CPU with AVX-512 (and oneDNN not capped)")
needs_bf16 = pytest.mark.skipif(
    not bf16_runs_here(), reason="needs a CPU with avx512_bf16 or amx_bf16 (and oneDNN not capped below them)"
)


def onednn_log(mode: str, threads: int, shell: dict[str, str] | None = None) -> tuple[str, int, set[str]]:
    """(instruction set, threads, kernel names) oneDNN reports while the probe trains in `mode` under `shell`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("ONEDNN_", "TF_NUM_"))}
    environment |= {"ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)} | (shell or {})
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(threads)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    isa = re.search(r"^onednn_verbose,.*,info,cpu,isa:(.*)$", result.stdout, re.MULTILINE).group(1)
    threads_used = int(re.search(r"^onednn_verbose,.*,info,cpu,runtime:\w+,nthr:(\d+)$", result.stdout, re.M).group(1))
    kernels = set(re.findall(r"^onednn_verbose,.*?,primitive,exec,cpu,\w+,([^,]+),", result.stdout, re.MULTILINE))
    assert kernels, result.stdout[-2000:]
    return isa, threads_used, kernels


def wide_kernels(kernels: set[str]) -> list[str]:
    """The AVX-512 and AMX kernels among oneDNN's kernel names."""
    return [kernel for kernel in kernels if re.search("avx512|amx", kernel)]


def test_portable_mode_reaches_onednn_kernels_and_threads():
    isa, threads, kernels = onednn_log("portable", threads=1)
    assert isa == "Intel AVX2"  # oneDNN's name for the capped set, on Intel and AMD CPUs alike
    assert threads == 1
    assert not wide_kernels(kernels), kernels
    assert any("avx2" in kernel for kernel in kernels), kernels


@needs_avx512
def test_native_mode_uses_every_instruction_set_and_core():
    isa, threads, kernels = onednn_log("native", threads=1)
    assert threads == os.cpu_count()  # `threads` applies to portable mode only
    assert "AVX-512" in isa and wide_kernels(kernels), (isa, kernels)


def test_native_mode_under_the_shells_isa_cap_runs_the_capped_kernels_on_every_core():
    # What native mode does on a CPU without AVX-512 (Zen 1 to 3), forced on any CPU by the cap.
    isa, threads, kernels = onednn_log("native", threads=1, shell={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert threads == os.cpu_count()
    assert isa == "Intel AVX2" and not wide_kernels(kernels), (isa, kernels)


def test_keras_on_tensorflow_loads_frozen_without_its_optional_imports_and_each_imports_afterwards():
    # The JAX backend's side (Keras imports jax while it loads) is test_train's resumed run on JAX.
    script = (
        "from tasks.lib.numerics import apply_numerics\n"
        "from tasks.lib.params import NumericsParams\n"
        "apply_numerics(NumericsParams())\n"
        "import gc, sys, keras\n"
        "loaded_with_keras = [name for name in ('jax', 'matplotlib', 'pandas', 'scipy') if name in sys.modules]\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 100_000)  # loaded with the collector paused\n"
        "import jax.numpy, matplotlib.pyplot, pandas, scipy.special\n"
        "print(keras.backend.backend(), loaded_with_keras, float(jax.numpy.ones(3).sum()),\n"
        "      float(pandas.Series([1.0, 2.0]).sum()), float(scipy.special.chdtrc(2, 0.0)), matplotlib.get_backend())\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    environment |= {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "agg"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True", "tensorflow", "[]", "3.0", "3.0", "1.0", "agg"], result.stdout


def test_native_mode_keeps_the_shells_onednn_settings_and_portable_overrides_them(monkeypatch):
    from tasks.lib.numerics import apply_numerics

    for key in ("ONEDNN_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS", "ONEDNN_DEFAULT_FPMATH_MODE", "TF_ENABLE_ONEDNN_OPTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    apply_numerics(NumericsParams(mode="native"))
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert "TF_NUM_INTRAOP_THREADS" not in os.environ
    apply_numerics(NumericsParams(mode="portable", threads=3))
    assert {key: os.environ[key] for key in numerics_environment(NumericsParams(mode="portable", threads=3))} == {
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
        "TF_NUM_INTRAOP_THREADS": "3",
        "CUDA_VISIBLE_DEVICES": "-1",
        "JAX_PLATFORMS": "cpu",
    }


def train_in(
    mode: str, params_path: Path, tmp_path: Path, precision: str = "auto", shell: dict[str, str] | None = None
) -> pd.DataFrame:
    """Run the train stage's command with numerics.mode = `mode`, oneDNN settings from `shell`; its history."""
    raw = yaml.safe_load(params_path.read_text())
    raw["numerics"] = {"mode": mode, "threads": 2, "precision": precision}
    raw["paths"]["resume"] = str(tmp_path / f"resume-{mode}")
    raw["paths"]["checkpoints"] = str(tmp_path / f"checkpoints-{mode}")
    raw["paths"]["training"] = str(tmp_path / f"training-{mode}")
    path = tmp_path / f"params-{mode}.yaml"
    path.write_text(yaml.safe_dump(raw))
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("ONEDNN_", "TF_NUM_"))}
    subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(path)],
        env=environment | {"PYTHONPATH": str(ROOT)} | (shell or {}),
        cwd=tmp_path,
        check=True,
        timeout=600,
        capture_output=True,
    )
    return pd.read_csv(load_params(path).paths.training / "history.csv")


# Native mode on portable's two threads: the kernels alone decide whether the numbers part.
TWO_THREADS = {"TF_NUM_INTRAOP_THREADS": "2"}


def portable_history(reproduced) -> pd.DataFrame:
    """The history of the shared reproduced project: its params are split_params' in portable mode."""
    return pd.read_csv(reproduced[0] / "artifacts/training/history.csv")


def test_native_mode_on_portables_kernels_and_threads_trains_portables_numbers(split_params, tmp_path, reproduced):
    # What both modes do on a CPU without AVX-512, forced on any CPU: the same kernels on the
    # same threads, so the same numbers to the last bit; the mode adds nothing else.
    portable = portable_history(reproduced)
    capped = TWO_THREADS | {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    native = train_in("native", split_params, tmp_path, precision="float32", shell=capped)
    assert len(portable) == len(native) == 2
    assert portable["loss"].equals(native["loss"]) and portable["val_loss"].equals(native["val_loss"])


@needs_avx512
def test_avx512_kernels_train_other_numbers_than_portable_mode(split_params, tmp_path, reproduced):
    portable = portable_history(reproduced)
    native = train_in("native", split_params, tmp_path, precision="float32", shell=TWO_THREADS)
    assert len(portable) == len(native) == 2
    # AVX-512 kernels add in another order than AVX2 ones: the losses part.
    assert not portable["loss"].equals(native["loss"])


def test_precision_follows_the_mode_and_the_cpus_bf16_instructions():
    with_bf16, without = frozenset({"avx2", "avx512f", "amx_bf16"}), frozenset({"avx2", "fma"})
    assert compute_precision(NumericsParams(mode="portable"), with_bf16) == "float32"
    assert compute_precision(NumericsParams(mode="native"), with_bf16) == "bfloat16"
    assert compute_precision(NumericsParams(mode="native"), without) == "float32"
    assert compute_precision(NumericsParams(mode="native", precision="float32"), with_bf16) == "float32"
    assert compute_precision(NumericsParams(mode="native", precision="bfloat16"), with_bf16) == "bfloat16"
    with pytest.raises(ParamsError, match="bfloat16 needs a GPU, or a CPU with bf16 instructions"):
        compute_precision(NumericsParams(mode="native", precision="bfloat16"), without)
    # A visible GPU computes in bfloat16 whatever the host CPU has, but never in portable mode.
    assert compute_precision(NumericsParams(mode="native"), without, gpus=1) == "bfloat16"
    assert compute_precision(NumericsParams(mode="native", precision="bfloat16"), without, gpus=1) == "bfloat16"
    assert compute_precision(NumericsParams(mode="portable"), without, gpus=1) == "float32"
    with pytest.raises(ValueError, match="precision bfloat16 needs mode native"):
        NumericsParams(mode="portable", precision="bfloat16")


LOAD_CAPPED = """
import sys
import numpy as np
from tasks.lib.model_files import load_model
from tasks.lib.model import computes_in
model = load_model(sys.argv[1])
print(computes_in(model), model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).sum())
"""


def test_bfloat16_where_it_cannot_run_is_refused_with_the_fix(split_params, tmp_path):
    # What a CPU without bf16 (Zen 1 to 3, many Intel CPUs) answers, forced on any CPU by the cap
    # that the refusal names: a clear error and exit 2, not oneDNN's failure in the first convolution.
    with pytest.raises(subprocess.CalledProcessError) as refused:
        train_in("native", split_params, tmp_path, precision="bfloat16", shell={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    stderr = refused.value.stderr.decode()
    assert refused.value.returncode == 2, stderr
    assert "numerics.precision: bfloat16 needs a GPU, or a CPU with bf16 instructions" in stderr, stderr
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in stderr and "use auto or float32" in stderr, stderr
    assert not (tmp_path / "checkpoints-native").exists()


@needs_bf16
def test_native_bfloat16_trains_in_bfloat16_and_the_model_keeps_its_policy(split_params, tmp_path):
    import keras
    import numpy as np

    import tasks.lib.model  # noqa: F401  (registers the custom layers for loading)

    history = train_in("native", split_params, tmp_path, precision="bfloat16")
    assert len(history) == 2 and np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    model = keras.saving.load_model(tmp_path / "checkpoints-native/epoch-002.keras")
    policies = {layer.dtype_policy.name for layer in model.layers}
    assert "mixed_bfloat16" in policies, policies
    probabilities = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # Where bf16 cannot run (here: oneDNN capped at AVX2, as portable mode caps it), the model
    # loads computing in float32, from the same weights, instead of failing in its first conv.
    capped = subprocess.run(
        [sys.executable, "-c", LOAD_CAPPED, str(tmp_path / "checkpoints-native/epoch-002.keras")],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    precision, total = capped.stdout.split()[-2:]
    assert precision == "float32" and abs(float(total) - 2) < 1e-4
    (tmp_path / "float32").mkdir()
    float32 = train_in("native", split_params, tmp_path / "float32", precision="float32")
    assert not history["loss"].equals(float32["loss"])  # bf16 arithmetic, not float32 under another name


# TensorFlow ops whose CPU kernels refine the CPU's approximate reciprocal (square root)
# instructions, vrcpps/vrsqrtps (Eigen's preciprocal/prsqrt): their last bits, and so a
# trained model's, differ between Intel and AMD CPUs, even with the same oneDNN kernels.
APPROXIMATE_OPS = {"Rsqrt", "RsqrtGrad", "Reciprocal", "ReciprocalGrad", "Inv", "InvGrad", "Erfc", "Softmax"}


@pytest.mark.parametrize("train_section", ["params.yaml", "tutorial"])
def test_training_and_inference_graphs_use_no_approximate_reciprocal_ops(train_section):
    import numpy as np
    import tensorflow as tf

    from tasks.lib.model import build_model
    from tasks.lib.params import TUTORIAL_TRAIN, TrainParams
    from tasks.train import compile_model, model_options, training_targets

    raw = (
        yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
        if train_section == "params.yaml"
        else TUTORIAL_TRAIN
    )
    train = TrainParams.model_validate(raw)
    model = build_model(train.model, (32, 32, 3), 4, **model_options(train))
    compile_model(model, train, steps_per_epoch=2)
    model.optimizer.build(model.trainable_variables)
    images = tf.TensorSpec((8, 32, 32, 3), tf.uint8)
    targets = training_targets(np.zeros(8, dtype=np.int64), train, 4)
    step = tf.function(model.train_step).get_concrete_function((images, tf.TensorSpec(targets.shape, targets.dtype)))
    predict = tf.function(lambda batch: model(batch, training=False)).get_concrete_function(images)
    used = {operation.type for graph in (step.graph, predict.graph) for operation in graph.get_operations()}
    assert not used & APPROXIMATE_OPS, sorted(used & APPROXIMATE_OPS)
    assert {"RealDiv", "Exp"} <= used  # the exact softmax; and the speed recipe's norm and GELU:
    if train.model == "speed_cnn":
        assert {"Sqrt", "Erf"} <= used


# Train and predict through the stages' own code (fit, load_model) with TensorFlow dumping each
# graph as Grappler left it, that is as it runs: its rewrites (x / sqrt(y) into Rsqrt) come after
# the graphs the test above reads.
RUNTIME_GRAPHS = """
import sys
from pathlib import Path
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import NumericsParams, TUTORIAL_TRAIN, TrainParams
apply_numerics(NumericsParams(mode="portable", threads=2))
import numpy as np, yaml
from tasks.lib.model_files import load_model
from tasks.train import checkpoint_name, fit
images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
labels = np.arange(16) % 4
arrays = {"x_train": images, "y_train": labels, "x_val": images[:8], "y_val": labels[:8]}
default = yaml.safe_load(Path("params.yaml").read_text())["train"]
for name, section in (("speed", default), ("tutorial", TUTORIAL_TRAIN)):
    train = TrainParams.model_validate({**section, "epochs": 1, "batch_size": 8})
    history = fit(arrays, train=train, seed=0, num_classes=4, checkpoints=Path(sys.argv[1]) / name, fingerprint={})
    model = load_model(Path(sys.argv[1]) / name / checkpoint_name(1), sha256=history["sha256"].iloc[-1])
    model.predict(images, batch_size=8, verbose=0)
"""


def test_graphs_as_run_use_no_approximate_reciprocal_ops(tmp_path):
    dumps = tmp_path / "graphs"
    environment = os.environ | {
        "PYTHONPATH": str(ROOT),
        "TF_DUMP_GRAPH_PREFIX": str(dumps),
        "TF_CPP_VMODULE": "meta_optimizer=1",  # the graph after all of Grappler's passes, nothing between
    }
    subprocess.run(
        [sys.executable, "-c", RUNTIME_GRAPHS, str(tmp_path)], cwd=ROOT, env=environment, check=True, timeout=600
    )
    graphs = sorted(dumps.glob("after_MetaOptimizer_*.pbtxt"))
    used = {op for graph in graphs for op in re.findall(r'^\s*op: "(\w+)"', graph.read_text(), re.MULTILINE)}
    assert len(graphs) >= 4 and {"Conv2D", "RealDiv", "Sqrt"} <= used  # training and inference, both models
    assert not used & APPROXIMATE_OPS, sorted(used & APPROXIMATE_OPS)
