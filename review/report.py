"""Pull-request report: params, metrics and plots of a revision against a base, and which stages reran and why.

    python -m review.report [--base main] [--rev REV] [--out report]

Everything comes from DVC's own machinery: `dvc params diff`, `dvc metrics diff`,
`dvc plots diff`, and the stages DVC loads from dvc.yaml + dvc.lock at each revision.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.params import flatten_params

WORKSPACE = "workspace"
# Found by name among the stages' outputs: their folders are params.yaml's paths.*, as DVC loaded them.
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"  # the confusion plot's data
ENVIRONMENT_NAME = "environment.json"  # the machine and libraries that produced the metrics
HEADLINE_METRICS = (
    "test.accuracy",
    "test.crossentropy",
    "test.macro_f1",
    "validation.accuracy",
    "validation.crossentropy",
    "best_epoch",
)
CURVE_PLOTS = ("Cross-entropy", "Accuracy")  # dvc.yaml's per-epoch plots


class ReportError(RuntimeError):
    """DVC or git could not answer a question the report needs."""


def run_dvc(root: Path, *arguments: str) -> str:
    """Run the dvc CLI in `root` and return its stdout, raising ReportError with its stderr on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *arguments], cwd=root, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ReportError(f"dvc {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def revision_arguments(base: str, rev: str) -> list[str]:
    """`base [rev]`: DVC compares with the workspace when rev is left out."""
    return [base] if rev == WORKSPACE else [base, rev]


# ---- which stages reran, and why ----


@dataclass(frozen=True)
class StageSnapshot:
    cmd: str
    deps: dict[str, str] = field(default_factory=dict)  # path -> hash
    params: dict[str, object] = field(default_factory=dict)  # dotted key -> value
    outs: tuple[str, ...] = ()


def _snapshot(stage) -> StageSnapshot:
    from dvc.dependency.param import ParamsDependency

    deps, params = {}, {}
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            params.update(flatten_params(dep.hash_info.value or {}) if dep.hash_info else {})
        else:
            deps[dep.def_path] = dep.hash_info.value if dep.hash_info else None
    return StageSnapshot(cmd=stage.cmd, deps=deps, params=params, outs=tuple(out.def_path for out in stage.outs))


def stage_snapshots(root: Path, revs: list[str]) -> dict[str, dict[str, StageSnapshot]]:
    """Each revision's pipeline stages as DVC loads them from dvc.yaml and dvc.lock."""
    from dvc.repo import Repo

    snapshots = {}
    with Repo(str(root)) as repo:
        for names in repo.brancher(revs=[rev for rev in revs if rev != WORKSPACE]):
            # The brancher visits a commit once, named by every rev that points at it ("main,HEAD").
            wanted = [name for name in names.split(",") if name in revs]
            if not wanted:
                continue
            stages = {stage.name: _snapshot(stage) for stage in repo.index.stages if stage.cmd}
            snapshots.update(dict.fromkeys(wanted, stages))
    missing = [rev for rev in revs if rev not in snapshots]
    if missing:
        raise ReportError(f"could not load the pipeline at {missing}")
    return snapshots


@dataclass(frozen=True)
class Rerun:
    reasons: list[str]  # what changed in this stage's own recorded inputs
    root_causes: list[str]  # the param, code or source-data changes that set it off


def explain_reruns(base: dict[str, StageSnapshot], new: dict[str, StageSnapshot]) -> dict[str, Rerun]:
    """Per stage whose recorded inputs differ: what changed, and the root changes behind it.

    Stages come in dvc.yaml's order, which lists producers before consumers, so an upstream
    stage's root causes are known by the time its outputs show up as a changed dependency.
    """
    outputs = [(out, name) for name, stage in new.items() for out in stage.outs]
    reruns: dict[str, Rerun] = {}
    for name, stage in new.items():
        before = base.get(name)
        if before is None:
            reruns[name] = Rerun(["new stage"], ["new stage"])
            continue
        reasons, roots = [], []
        if before.cmd != stage.cmd:
            reasons.append(f"command changed: `{before.cmd}` → `{stage.cmd}`")
            roots.append(f"{name}: command")
        for key in sorted(set(before.params) | set(stage.params)):
            if before.params.get(key) != stage.params.get(key):
                reasons.append(f"param `{key}`: {before.params.get(key)!r} → {stage.params.get(key)!r}")
                roots.append(f"param `{key}`")
        for path in sorted(set(before.deps) | set(stage.deps)):
            if before.deps.get(path) == stage.deps.get(path):
                continue
            producer = producer_of(path, outputs)
            if producer is not None:
                reasons.append(f"`{path}` changed (output of {producer})")
                roots.extend(reruns[producer].root_causes if producer in reruns else [f"{producer} output"])
            else:
                reasons.append(f"{'code' if path.endswith('.py') else 'data'} `{path}` changed")
                roots.append(f"{'code' if path.endswith('.py') else 'data'} `{path}`")
        if reasons:
            reruns[name] = Rerun(reasons, list(dict.fromkeys(roots)))
    return reruns


def producer_of(path: str, outputs: list[tuple[str, str]]) -> str | None:
    """The stage whose output is `path` or a folder holding it (data/prepared for data/prepared/x.npz)."""
    for out, stage in outputs:
        if path == out or path.startswith(out.rstrip("/") + "/"):
            return stage
    return None


def output_named(stages: dict[str, StageSnapshot], name: str) -> str | None:
    """The path of the stage output called `name` (metrics.json, ...), as declared at that revision."""
    return next((out for stage in stages.values() for out in stage.outs if Path(out).name == name), None)


# ---- plots ----


def _series(values: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(rev, field) -> [(epoch, value)] from DVC's inlined Vega data (strings, as DVC gives them)."""
    series = defaultdict(list)
    for row in values:
        series[(row["rev"], row["field"])].append((float(row["epoch"]), float(row["dvc_inferred_y_value"])))
    return series


def render_training_curves(plots: dict, path: Path) -> Path | None:
    """Loss and accuracy per epoch, base and new overlaid."""
    import matplotlib.pyplot as plt

    panels = [name for name in CURVE_PLOTS if name in plots]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, name in zip(axes[0], panels, strict=True):
        for (rev, metric), points in sorted(_series(plots[name][0]["content"]["data"]["values"]).items()):
            epochs, values = zip(*sorted(points), strict=True)
            axis.plot(
                epochs,
                values,
                marker="o",
                linestyle="--" if metric.startswith("val_") else "-",
                label=f"{rev}: {metric}",
            )
        axis.set_title(name.lower())
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


def render_confusions(plots: dict, predictions: str | None, out: Path) -> dict[str, Path]:
    """One confusion-matrix image per revision, from DVC's confusion plot data of `predictions`."""
    import matplotlib.pyplot as plt
    import numpy as np

    if predictions not in plots:
        return {}
    rows = plots[predictions][0]["content"]["data"]["values"]
    classes = sorted({row["actual"] for row in rows} | {row["predicted"] for row in rows})
    index = {name: position for position, name in enumerate(classes)}
    images = {}
    for rev in dict.fromkeys(row["rev"] for row in rows):
        counts = np.zeros((len(classes), len(classes)), dtype=int)
        for row in rows:
            if row["rev"] == rev:
                counts[index[row["actual"]], index[row["predicted"]]] += 1
        figure, axis = plt.subplots(figsize=(6, 5))
        axis.imshow(counts, cmap="Blues")
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(len(classes)), classes, fontsize=8)
        for (row_index, column), count in np.ndenumerate(counts):
            axis.text(column, row_index, str(count), ha="center", va="center", fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("actual")
        axis.set_title(f"confusion matrix: {rev}")
        path = out / f"confusion_{_safe(rev)}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(figure)
        images[rev] = path
    return images


def significance_line(plots: dict, predictions: str | None, base: str, rev: str) -> str:
    """Whether test accuracy differs between the two revisions beyond noise: two-sided exact McNemar, paired."""
    import numpy as np

    from tasks.promote import compare, mcnemar_two_sided

    rows = plots.get(predictions, [{}])[0].get("content", {}).get("data", {}).get("values", [])
    by_rev: dict[str, list[dict]] = {}
    for row in rows:  # each revision's rows in file order: one per test image
        by_rev.setdefault(row["rev"], []).append(row)
    if len(by_rev) != 2:
        return "Test accuracy: no paired test (predictions of only one revision)."
    (old_name, old), (new_name, new) = sorted(by_rev.items(), key=lambda item: item[0] != base)
    actual = [row["actual"] for row in old]
    if actual != [row["actual"] for row in new]:
        return "Test accuracy: no paired test (the revisions predicted different test images)."
    result = compare(
        np.asarray(actual),
        np.asarray([row["predicted"] for row in old]),
        np.asarray([row["predicted"] for row in new]),
    )
    # Two-sided: a review asks whether accuracy moved either way (the promotion gate asks one-sided).
    p_value = float(mcnemar_two_sided(result.champion_only, result.challenger_only))
    verdict = f"significant at 0.05 (p = {p_value:.3g})" if p_value < 0.05 else "within noise"
    return (
        f"Test accuracy {result.champion_accuracy:.4f} → {result.challenger_accuracy:.4f}: **{verdict}** "
        f"(two-sided exact McNemar on {result.images} paired images: {result.champion_only} right only at "
        f"`{old_name}`, {result.challenger_only} right only at `{new_name}`, p = {p_value:.3g})."
    )


def _safe(rev: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in rev)


# ---- markdown ----


def _number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def params_section(diff: dict) -> list[str]:
    rows = [(key, change) for changes in diff.values() for key, change in sorted(changes.items())]
    if not rows:
        return ["No params changed."]
    lines = ["| param | old | new |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {change.get('old')!r} | {change.get('new')!r} |" for key, change in rows]
    return lines


def metrics_section(diff: dict, path: str | None) -> list[str]:
    """The metrics that moved, headline first, and one line counting those that did not."""
    metrics = diff.get(path, {})
    if not metrics:
        return ["No metrics found in either revision."]
    headline = [key for key in HEADLINE_METRICS if key in metrics]
    ordered = headline + sorted(key for key in metrics if key not in headline)
    moved = [key for key in ordered if metrics[key].get("old") != metrics[key].get("new")]
    still = len(ordered) - len(moved)
    if not moved:
        return [f"No metric changed ({still} unchanged)."]
    lines = ["| metric | old | new | change |", "| --- | --- | --- | --- |"]
    for key in moved:
        change = metrics[key]
        lines.append(
            f"| `{key}` | {_number(change.get('old'))} | {_number(change.get('new'))} | {_number(change.get('diff'))} |"
        )
    return [*lines, "", f"{still} other metrics unchanged."]


def reruns_section(reruns: dict[str, Rerun], stage_order: list[str]) -> list[str]:
    if not reruns:
        return ["No stage reran: every stage's recorded inputs are unchanged."]
    lines = ["| stage | reran | because | root cause |", "| --- | --- | --- | --- |"]
    for stage in stage_order:
        if stage in reruns:
            rerun = reruns[stage]
            lines.append(f"| {stage} | yes | {'<br>'.join(rerun.reasons)} | {', '.join(rerun.root_causes)} |")
        else:
            lines.append(f"| {stage} | no | inputs unchanged | |")
    return lines


def _changed(diff: dict) -> dict:
    """The entries of one file's `dvc metrics diff --all` whose value changed."""
    return {key: change for key, change in diff.items() if change.get("old") != change.get("new")}


def environment_section(metrics: dict, stages: dict[str, StageSnapshot], reruns: dict[str, Rerun]) -> list[str]:
    """What changed in the environment that produced the metrics, and whether it is the only cause."""
    environment = _changed(metrics.get(output_named(stages, ENVIRONMENT_NAME), {}))
    if not environment:
        return ["The metrics come from the same environment (CPU, oneDNN settings, library versions)."]
    lines = ["| environment | old | new |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {change.get('old')} | {change.get('new')} |" for key, change in sorted(environment.items())]
    metrics_changed = _changed(metrics.get(output_named(stages, METRICS_NAME), {}))
    if metrics_changed and not reruns:
        lines += ["", "**Root cause: environment.** The metrics changed while no input did (params, code, data)."]
    return lines


def build_report(root: Path, base: str, rev: str, out: Path) -> Path:
    """Write out/report.md (and its PNG plots) comparing `rev` with `base`."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    revisions = revision_arguments(base, rev)
    params = json.loads(run_dvc(root, "params", "diff", *revisions, "--json") or "{}")
    metrics = json.loads(run_dvc(root, "metrics", "diff", *revisions, "--all", "--json") or "{}")
    plots = json.loads(run_dvc(root, "plots", "diff", *revisions, "--json", "-o", str(out / "dvc_plots")))
    plot_data = plots.get("data", {})
    snapshots = stage_snapshots(root, [base, rev])
    reruns = explain_reruns(snapshots[base], snapshots[rev])

    curves = render_training_curves(plot_data, out / "training_curves.png")
    confusions = render_confusions(plot_data, output_named(snapshots[rev], PREDICTIONS_NAME), out)
    lines = [f"# Pipeline report: `{rev}` against `{base}`", "", "## Params", "", *params_section(params)]
    lines += ["", "## Metrics", "", *metrics_section(metrics, output_named(snapshots[rev], METRICS_NAME))]
    lines += ["", significance_line(plot_data, output_named(snapshots[rev], PREDICTIONS_NAME), base, rev)]
    lines += ["", "## Stages", "", *reruns_section(reruns, list(snapshots[rev]))]
    lines += ["", "## Environment", "", *environment_section(metrics, snapshots[rev], reruns)]
    lines += ["", "## Plots", ""]
    if curves:
        lines += [f"![training curves, {base} and {rev}]({curves.name})", ""]
    lines += [f"![confusion matrix at {name}]({path.name})" for name, path in confusions.items()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def default_base(root: Path) -> str:
    """`main`, or the previous commit when HEAD is main itself."""
    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()
    return "HEAD~1" if branch == "main" else "main"


def main() -> None:
    """Entry point for `python -m review.report`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git rev to compare against (default: main, or HEAD~1 on main)")
    parser.add_argument("--rev", default=WORKSPACE, help="git rev to report on (default: the workspace)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md and its images")
    arguments = parser.parse_args()
    root = Path.cwd()
    try:
        report = build_report(root, arguments.base or default_base(root), arguments.rev, arguments.out)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(report)


if __name__ == "__main__":
    main()
