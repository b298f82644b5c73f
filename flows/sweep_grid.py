"""A sweep's grid and its ranking, pure: `-S` options to candidates, checked, and the rule that ranks them."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.lib.io import DataError
from tasks.lib.params import ParamsError, parse_params

DEFAULT_MAX_CANDIDATES = 8

# select_best.monitor -> the validation figure in metrics.json, and whether lower is better.
MONITORED = {
    "val_loss": ("loss", True),
    "val_crossentropy": ("crossentropy", True),
    "val_accuracy": ("accuracy", False),
}


class SweepError(DataError):
    """The sweep cannot start: bad -S values, too many candidates, or a workspace it cannot sweep from."""


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, object]  # dotted params key -> value

    def set_params(self) -> list[str]:
        """`-S key=value` arguments for `dvc exp run`, values in the YAML/JSON flow syntax Hydra reads."""
        return [
            argument
            for key, value in self.overrides.items()
            for argument in ("-S", f"{key}={json.dumps(value, separators=(',', ':'))}")
        ]


def split_values(text: str) -> list[str]:
    """Split `a,b,[1,2],c` at the commas outside brackets."""
    values, depth, current = [], 0, ""
    for character in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += character
    return [*values, current]


def parse_sweep(options: list[str]) -> dict[str, list]:
    """{key: [values]} from `key=v1,v2` options; each value parsed as YAML (numbers, lists, null)."""
    axes: dict[str, list] = {}
    for option in options:
        key, separator, text = option.partition("=")
        if not separator or not key.strip() or not text.strip():
            raise SweepError(f"-S {option!r}: expected key=value[,value...], for example train.epochs=2,4")
        try:
            axes[key.strip()] = [yaml.safe_load(value) for value in split_values(text)]
        except yaml.YAMLError as error:
            raise SweepError(f"-S {option!r}: a value is not valid YAML: {error}") from None
    return axes


def candidate_name(overrides: dict[str, object]) -> str:
    """A deterministic, git-ref-safe name from the params alone: the same grid point, the same name."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return f"sweep-{digest}"


def candidate_grid(axes: dict[str, list], max_candidates: int) -> list[Candidate]:
    """Every combination of the axes' values, in the order given; refused beyond `max_candidates`."""
    count = 1
    for values in axes.values():
        count *= len(values)
    if count > max_candidates:
        raise SweepError(f"the grid has {count} candidates, more than --max-candidates {max_candidates}")
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    return [Candidate(candidate_name(overrides), overrides) for overrides in grid]


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A deep copy of params `raw` with dotted keys set."""
    raw = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return raw


def changed_params(baseline: dict, params: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of the leaves of `params` that differ from `baseline` (an experiment's overrides)."""
    changed = {}
    for key, value in params.items():
        before = baseline.get(key) if isinstance(baseline, dict) else None
        if isinstance(value, dict):
            changed |= changed_params(before or {}, value, f"{prefix}{key}.")
        elif value != before:
            changed[f"{prefix}{key}"] = value
    return changed


def validate_candidates(candidates: list[Candidate], params_path: Path) -> None:
    """Check every candidate's params against the params model before any work starts."""
    raw = yaml.safe_load(params_path.read_text())
    for candidate in candidates:
        try:
            parse_params(with_overrides(raw, candidate.overrides), source=f"candidate {candidate.overrides}")
        except ParamsError as error:
            raise SweepError(str(error)) from None


def unrankable(axes: dict[str, list], monitor: str) -> str | None:
    """Why candidates over `axes` cannot be ranked on `monitor` (None: they can): their figures would not compare."""
    varied = [key for key, values in axes.items() if len({json.dumps(value) for value in values}) > 1]
    for key in varied:
        if key == "seed" or key.startswith("split."):
            return f"{key} changes which images validate each candidate: their validation figures do not compare"
        if key.startswith("select_best."):
            return f"{key} changes the figure each candidate is judged by: one monitor ranks them all"
    if monitor == "val_loss" and "train.label_smoothing" in varied:
        return (
            "train.label_smoothing changes the objective that val_loss measures: rank on "
            "select_best.monitor val_crossentropy or val_accuracy (mode from the monitor)"
        )
    return None


def rank(finished: dict[str, dict], monitor: str) -> list[str]:
    """Candidate names best first by the monitored validation figure; ties by name."""
    figure, lower_is_better = MONITORED[monitor]

    def key(name: str) -> tuple[float, str]:
        value = float(finished[name]["metrics"]["validation"][figure])
        return (value if lower_is_better else -value, name)

    return sorted(finished, key=key)
