"""A Prefect API that a flow's Dask workers can reach: the one configured, or a temporary local server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """One Prefect API for this process and the Dask workers: PREFECT_API_URL, or a temporary local server."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Without it each worker process would look for an API of its own and fail to log its task runs.
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the workers the cluster starts
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # the run's last log lines, while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
