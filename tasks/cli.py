"""The command line every stage shares: `python -m tasks.<stage> [--params PATH]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tasks.io import DataError
from tasks.params import DEFAULT_PARAMS_PATH, Params, ParamsError, load_params

StageRun = Callable[[Params], list[Path]]

# Exit status for bad input (params or data), told apart from crashes (1) for callers.
EXIT_BAD_INPUT = 2


def configure_logging() -> None:
    """Timestamped INFO logs on stderr, the same format for every stage."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_stage(commands: StageRun | Mapping[str, StageRun], description: str | None) -> None:
    """Parse `--params` (and `--<command>` flags), run the stage, exit 2 with one clear line on bad input."""
    if callable(commands):
        commands = {"run": commands}
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: params.yaml)")
    for name, command in commands.items():
        if name != "run":
            parser.add_argument(f"--{name}", action="store_true", help=(command.__doc__ or "").splitlines()[0])
    arguments = parser.parse_args()
    chosen = next((name for name in commands if name != "run" and getattr(arguments, name)), "run")
    configure_logging()
    # Hide TensorFlow's C++ INFO/WARNING banners (CUDA probing, oneDNN notes); errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN kernels are only on by default for AVX-512 CPUs; on this AVX2 machine they halve
    # conv training time (measured in docs/speed.md). Set before TensorFlow is first imported.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    try:
        written = commands[chosen](load_params(arguments.params))
    except (ParamsError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for path in written:
        logging.getLogger("tasks").info("wrote %s", path)
