"""A sweep's results: the experiments on HEAD, a validation plot per candidate, and the summary."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_table_artifact

from flows.sweep_grid import SweepError
from flows.sweep_worker import command
from tasks.lib.io import atomic_path


def _json_value(item: object) -> object:
    from dvc.utils.serialize import encode_exception

    return item.isoformat() if hasattr(item, "isoformat") else encode_exception(item)


def experiments(root: Path) -> dict[str, dict]:
    """{name: {rev, params, metrics}} of the experiments on HEAD, as `dvc exp show --json` lists them."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    # DVC's API in this process, serialised as the command serialises it (a process costs most
    # of a CPU-second): dates as ISO text, errors as DVC encodes them.
    try:
        with Repo(str(root)) as repo:
            shown = json.loads(json.dumps([state.dumpd() for state in repo.experiments.show()], default=_json_value))
    except DvcException as error:
        raise SweepError(f"listing the experiments (dvc exp show) failed: {error}") from error
    found = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            if not group.get("revs"):  # queued or running: nothing to read yet
                continue
            state = group["revs"][0]
            data = state.get("data") or {}
            metrics = next(
                (
                    item.get("data")
                    for name, item in (data.get("metrics") or {}).items()
                    if name.endswith("metrics.json")
                ),
                None,
            )
            params = (data.get("params") or {}).get("params.yaml", {}).get("data")
            if group.get("name") and metrics:
                found[group["name"]] = {"rev": state["rev"], "params": params, "metrics": metrics}
    return found


def validation_plot(root: Path, rev: str, history_path: Path, monitor: str, destination: Path) -> Path:
    """A PNG of the candidate's monitored validation figure per epoch, from history.csv at its experiment commit."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    history = pd.read_csv(
        io.StringIO(command(["git", "show", f"{rev}:{history_path.as_posix()}"], root, what="reading a history"))
    )
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.plot(history["epoch"], history[monitor], marker="o")
    axis.set_xlabel("epoch")
    axis.set_ylabel(monitor)
    axis.set_title(destination.stem)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return destination


def summary_markdown(rows: list[dict], winner: str | None, monitor: str) -> str:
    """The sweep's summary: one row per candidate, finished or failed, and the winner."""
    lines = [
        "# Sweep",
        "",
        f"Winner: `{winner}` (best validation `{monitor}`)." if winner else "No candidate finished.",
        "",
        "| candidate | params | validation accuracy | validation loss | test accuracy | seconds | peak GB "
        "| worker | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        validation = (row.get("metrics") or {}).get("validation", {})
        test = (row.get("metrics") or {}).get("test", {})
        params = ", ".join(f"`{key}={value}`" for key, value in row["overrides"].items())
        worker = f"{row['worker']} (pid {row['pid']}) on {row['host']}" if "worker" in row else ""
        lines.append(
            f"| `{row['name']}` | {params} | {validation.get('accuracy', '')} | {validation.get('loss', '')} "
            f"| {test.get('accuracy', '')} | {row.get('seconds', '')} | {row.get('peak_rss_gb', '')} | {worker} "
            f"| {row['outcome']} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(root: Path, params, rows: list[dict], winner: str | None, known: dict[str, dict]) -> Path:
    """The summary markdown, a validation plot per candidate among `known` (`experiments`), and the table artifact."""
    folder = root / params.paths.sweep
    monitor = params.select_best.monitor
    for row in rows:
        if row["name"] in known:
            validation_plot(
                root,
                known[row["name"]]["rev"],
                params.paths.training / "history.csv",
                monitor,
                folder / f"{row['name']}.png",
            )
    path = folder / "summary.md"
    with atomic_path(path, suffix=".md") as temporary:
        temporary.write_text(summary_markdown(rows, winner, monitor))
    create_table_artifact(
        key="cifar10-sweep",
        table=[
            {key: str(row.get(key, "")) for key in ("name", "overrides", "outcome", "worker", "seconds")}
            for row in rows
        ],
        description=f"sweep winner: {winner}",
    )
    return path
