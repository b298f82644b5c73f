"""Prefect flows: wiring, retries and schedules; no maths, no file formats."""

import os

# Prefect's SDK telemetry can only be switched off from the environment, and it must be
# set before prefect is imported; pyproject.toml turns off the server's analytics.
os.environ.setdefault("DO_NOT_TRACK", "1")
