"""Typed, frozen params models: the only place params.yaml is read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS_PATH = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# A whole number stays an int (4, not 4.0), so what a stage writes from it reads as before.
Epochs = Annotated[
    float, Field(gt=0, strict=True, allow_inf_nan=False), AfterValidator(lambda n: int(n) if n == int(n) else n)
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the params model."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(_Section):
    raw: Path
    prepared: Path
    split: Path
    checkpoints: Path
    training: Path
    model: Path
    metrics: Path
    plots: Path
    # Resume state of a training run (checkpoints so far): outside every DVC output, so
    # DVC's run cache stays on for train and a killed run still finds its epochs.
    resume: Path
    # tasks.promote's decision and model card (git-tracked; committed on each promotion's branch).
    promotion: Path = Path("artifacts/promotion")
    # flows.sweep's summary: the candidates, their figures and one validation plot each (not DVC outputs).
    sweep: Path = Path("artifacts/sweep")


class IngestParams(_Section):
    kind: Literal["image_folder", "cifar10_binary"]
    source: Path
    sha256: Sha256 | None = None
    url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    image_size: PositiveInt = 32
    max_per_class: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_download(self) -> IngestParams:
        if self.url is not None and self.sha256 is None:
            raise ValueError("ingest.url needs ingest.sha256: a download is verified before use")
        if self.kind == "cifar10_binary" and self.image_size != 32:
            raise ValueError("ingest.image_size must be 32 for the CIFAR-10 binary release")
        return self


class SplitParams(_Section):
    validation_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class AugmentParams(_Section):
    flip: bool = False
    translate: Annotated[int, Field(ge=0, le=8, strict=True)] = 0


class LookaheadParams(_Section):
    # From this share of the steps on (airbench: 3 of 10 epochs), every `every_steps` steps the
    # weights move to an exponential average of themselves, whose decay rises to `decay` per step.
    start_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    every_steps: PositiveInt = 5
    decay: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.95


class MuonParams(_Section):
    # The conv kernels' peak learning rate under optimizer muon: a relative step, since each
    # kernel is rescaled to norm sqrt(output channels) first (tasks/lib/optimizers.py).
    learning_rate: PositiveFloat
    # Their Nesterov momentum (airbench94_muon: 0.6).
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.6


class TrainParams(_Section):
    model: Literal["tutorial_cnn", "speed_cnn"]
    # muon: conv kernels by Muon (train.muon), every other weight by Nesterov SGD (learning_rate, momentum).
    optimizer: Literal["rmsprop", "adam", "sgd", "muon"]
    learning_rate: PositiveFloat
    batch_size: PositiveInt
    # Passes over the training images; a fraction ends the last pass early (0.4: one pass over
    # 40 % of them, in the shuffled order), as airbench's 9.9 epochs do.
    epochs: Epochs
    # The speed recipe's keys; their defaults leave the tutorial's training exactly as it was.
    # speed_cnn only (null: its default, SPEED_CNN_WIDTHS).
    widths: Annotated[list[PositiveInt], Field(min_length=1, max_length=4)] | None = None
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    # null: constant learning rate; a fraction: linear warm-up over that share of steps, then cosine to 0.
    warmup_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    # speed_cnn only: random training-time flips and shifts inside the model.
    augment: AugmentParams = AugmentParams()
    # null: off; else lookahead weight averaging (airbench's EMA), see LookaheadParams.
    lookahead: LookaheadParams | None = None
    # speed_cnn only: predict each image as the mean of it and its mirror image (validation and test).
    test_time_flip: bool = False
    # speed_cnn only: also predict the image moved N pixels up-left and down-right (airbench's tta_level 2).
    test_time_translate: Annotated[int, Field(ge=0, le=4, strict=True)] = 0
    # optimizer muon only: the conv kernels' learning rate and momentum (MuonParams); null otherwise.
    muon: MuonParams | None = None

    @model_validator(mode="after")
    def _check_muon_keys(self) -> TrainParams:
        if (self.optimizer == "muon") != (self.muon is not None):
            raise ValueError(
                "train.muon (the conv kernels' learning_rate and momentum) is required with optimizer muon "
                f"and must be null with any other; got optimizer {self.optimizer!r} and muon {self.muon}"
            )
        if self.optimizer == "muon" and self.model != "speed_cnn":
            # Muon resets each kernel's norm every step: harmless only where BatchNorm follows the conv.
            raise ValueError(
                f"train.optimizer muon needs BatchNorm after every conv (speed_cnn); {self.model} has none, "
                "so rescaling its kernels would change what it computes (use sgd, rmsprop or adam)"
            )
        return self

    @model_validator(mode="after")
    def _check_speed_only_keys(self) -> TrainParams:
        # A key the chosen model would ignore is an error, never a silent no-op.
        if self.model != "speed_cnn":
            ignored = [
                f"train.{key}"
                for key, unset in (
                    ("widths", self.widths is None),
                    ("augment", self.augment == AugmentParams()),
                    ("test_time_flip", not self.test_time_flip),
                    ("test_time_translate", not self.test_time_translate),
                )
                if not unset
            ]
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)} apply to model speed_cnn only; {self.model} would ignore them "
                    "(use null, {flip: false, translate: 0}, false and 0)"
                )
        return self


# The tutorial's training as a whole train section (every key, so nothing of the speed recipe
# is left behind): the reference for the tests and the benchmark; README shows it as YAML.
TUTORIAL_TRAIN = {
    "model": "tutorial_cnn",
    "optimizer": "rmsprop",
    "learning_rate": 0.001,
    "batch_size": 32,
    "epochs": 20,
    "widths": None,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "warmup_fraction": None,
    "augment": {"flip": False, "translate": 0},
    "lookahead": None,
    "test_time_flip": False,
    "test_time_translate": 0,
    "muon": None,
}


# The long profile (#12): the speed recipe at airbench94's widths for 10 epochs, about 0.33 PFLOP
# of training (tasks/lib/flops.py), within airbench94's 0.36. One params change away: README shows it
# as YAML for params.yaml's train section; bench.speed_to_accuracy runs it as the recipe `long`.
LONG_TRAIN = {
    "model": "speed_cnn",
    "optimizer": "muon",
    "learning_rate": 2.0,
    "batch_size": 512,
    "epochs": 10,
    "widths": [64, 256, 256],
    "momentum": 0.85,
    "weight_decay": 0.005,
    "label_smoothing": 0.2,
    "warmup_fraction": 0.2,
    "augment": {"flip": True, "translate": 2},
    "lookahead": {"start_fraction": 0.3, "every_steps": 5, "decay": 0.95},
    "test_time_flip": True,
    "test_time_translate": 1,
    "muon": {"learning_rate": 0.1, "momentum": 0.6},
}


class SelectBestParams(_Section):
    # val_loss is the training objective (label-smoothed when train.label_smoothing > 0);
    # val_crossentropy is the plain cross-entropy, computed as evaluate computes the test's.
    monitor: Literal["val_loss", "val_crossentropy", "val_accuracy"]
    mode: Literal["min", "max"]

    @model_validator(mode="after")
    def _mode_fits_the_monitor(self) -> SelectBestParams:
        # A contradictory pair would keep the worst epoch (val_accuracy with min) without a word.
        expected = "max" if self.monitor == "val_accuracy" else "min"
        if self.mode != expected:
            raise ValueError(f"mode {self.mode} with monitor {self.monitor} keeps the worst epoch: use mode {expected}")
        return self


class NumericsParams(_Section):
    # portable: byte-identical results on every CPU of the pool (oneDNN capped at AVX2 kernels,
    # a fixed thread count); native: every instruction set the CPU has, for speed (tasks/lib/numerics.py).
    mode: Literal["portable", "native"] = "portable"
    # Threads that split each kernel's work in portable mode; native mode uses every core.
    threads: PositiveInt = 2
    # Native mode only: bfloat16 compute with float32 weights (Keras' mixed_bfloat16), or float32;
    # auto picks bfloat16 where the CPU has bf16 instructions (AVX512_BF16 or AMX-BF16), else float32.
    # Portable mode always computes in float32: bf16 hardware is not on every CPU of the pool.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _bfloat16_needs_native(self) -> NumericsParams:
        if self.mode == "portable" and self.precision == "bfloat16":
            raise ValueError(
                "precision bfloat16 needs mode native: portable results must be byte-identical on every "
                "CPU of the pool, and not every CPU has bf16 instructions (use auto or float32)"
            )
        return self


class PromoteParams(_Section):
    # Smallest gain in test accuracy (a fraction: 0.005 is half a point) worth replacing prod's model.
    min_gain: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.005
    # Significance level of the one-sided exact McNemar test (is the challenger better?) on the
    # two models' paired test predictions.
    alpha: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.05
    # The git remote the registry lives in: promotions push their branch and GTO tags there, and
    # every reader of `prod` fetches the tags from it first, so every clone sees one registry.
    remote: Annotated[str, Field(min_length=1)] = "origin"


class PredictParams(_Section):
    # Largest image file or zip member that predict reads: a bigger one is skipped unread.
    max_file_bytes: PositiveInt = 16 * 2**20
    # Most pixels an image's header may claim: more is skipped as a decompression bomb before decoding.
    max_pixels: PositiveInt = 4096 * 4096


class ServeParams(_Section):
    # Concurrent requests are grouped into one model call: a batch closes after its first request
    # has waited window_ms, or once it holds max_batch images (1: every request on its own).
    window_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 5.0
    max_batch: PositiveInt = 64
    # The served images are compared with the model's reference profile every drift_window images.
    drift_window: Annotated[int, Field(ge=200, strict=True)] = 500
    # How often the service asks the registry's remote where prod is (--model prod).
    poll_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0


class Params(_Section):
    seed: Annotated[int, Field(ge=0, strict=True)]
    numerics: NumericsParams = NumericsParams()
    paths: PathsParams
    ingest: IngestParams
    split: SplitParams
    train: TrainParams
    select_best: SelectBestParams
    promote: PromoteParams = PromoteParams()
    predict: PredictParams = PredictParams()
    serve: ServeParams = ServeParams()


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against params.yaml's documented keys)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate a parsed params mapping, raising ParamsError that names each bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n  ".join(_describe(item) for item in error.errors())
        raise ParamsError(f"{source}: invalid params:\n  {problems}") from None


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))


def flatten_params(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as dotted keys: {'train': {'epochs': 3}} -> {'train.epochs': 3}."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
