"""Prefect flows: wiring, retries and schedules; no maths, no file formats."""

import os
import sys
from pathlib import Path

from tasks.lib.imports import import_without_collection

# Prefect's SDK telemetry can only be switched off from the environment, and it must be
# set before prefect is imported; pyproject.toml turns off the server's analytics.
os.environ.setdefault("DO_NOT_TRACK", "1")
# Every flow process loads Prefect (and a sweep Dask): about half a CPU-second less with the collector paused.
import_without_collection(("prefect", "prefect_dask", "dask", "distributed"))


def stage_command_environment() -> dict[str, str]:
    """This process's environment with its interpreter first on PATH and unbuffered output.

    dvc.yaml's stage commands say `python -m tasks.x`: run through dvc from here, `python`
    must be this interpreter (the project's venv); unbuffered, per-epoch progress reaches the
    log as it happens.
    """
    environment = dict(os.environ)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    environment["PYTHONUNBUFFERED"] = "1"
    return environment
