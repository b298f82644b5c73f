"""Serve the pipeline flow as a Prefect deployment on a cron schedule, one run at a time.

    prefect server start --host 127.0.0.1                 # terminal 1: API and UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2:
    python -m flows.schedule [--cron "0 2 * * *"] [--name nightly]

Each run reads params.yaml in the directory it is served from, as `dvc repro` does.

Runs that collide wait for the running one to finish (deployment concurrency limit 1,
ENQUEUE): two runs never work on the workspace at the same time.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import cifar10_pipeline

DEFAULT_CRON = "0 2 * * *"  # nightly, 02:00 in the server's time zone (UTC by default)
DEFAULT_NAME = "nightly"


def build_deployment(*, name: str, cron: str, root: Path):
    """The flow as a deployment: cron schedule, this workspace, at most one run at a time."""
    return cifar10_pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={"root": str(root.resolve())},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Runs every stale stage of the CIFAR-10 pipeline; up to date runs finish in seconds.",
    )


def main() -> None:
    """Entry point for `python -m flows.schedule`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r}, nightly)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    arguments = parser.parse_args()
    # SIGTERM (from a service manager) stops serving the way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    deployment = build_deployment(name=arguments.name, cron=arguments.cron, root=Path.cwd())
    serve(deployment, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
