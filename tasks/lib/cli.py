"""The command line every stage shares: `python -m tasks.<stage> [--params PATH]`."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from tasks.lib.io import DataError, WorkspaceBusyError
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import DEFAULT_PARAMS_PATH, Params, ParamsError, load_params

StageRun = Callable[[Params], list[Path]]

# Exit status for bad input (params or data), told apart from crashes (1) for callers.
EXIT_BAD_INPUT = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: nothing is wrong with the inputs; the same command later will work


# TensorFlow's native start-up lines that report no problem: INFO/WARNING lines written before
# absl logging starts (so TF_CPP_MIN_LOG_LEVEL cannot hide them), the failed CUDA probe of a
# machine without a GPU, and a tf.data graph-rewrite notice. Both of the latter say "E" (error);
# users read them as errors. Every other line, E or F level included, still passes. The CPU
# feature notice ("This TensorFlow binary is optimized ...") goes on over a second, unprefixed line.
HARMLESS_NATIVE_LOG = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"
    r"|^[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|^E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit: "
    r"|^E\d{4} .*NodeDef mentions attribute use_unbounded_threadpool"
)


def run_tool(
    arguments: list[str], cwd: Path, *, what: str, error: type[Exception], environment: Mapping[str, str] | None = None
) -> str:
    """Run a tool (git, dvc, gto, a python -c) in `cwd`; its stdout, or `error` naming `what` with its last line."""
    result = subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise error(f"{what} failed ({' '.join(arguments[:4])}): {lines[-1] if lines else result.returncode}")
    return result.stdout


def filter_native_stderr() -> None:
    """Route file descriptor 2 through a thread that drops HARMLESS_NATIVE_LOG lines until exit."""
    sink, saved = os.dup(2), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as lines, open(sink, "wb", buffering=0) as out:
            for line in lines:
                if not HARMLESS_NATIVE_LOG.search(line.decode(errors="replace").rstrip("\n")):
                    out.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and stops
        thread.join(timeout=10)

    atexit.register(restore)


def configure_logging() -> None:
    """Timestamped INFO logs on stderr, the same format for every stage."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_stage(
    commands: StageRun | Mapping[str, StageRun],
    description: str | None,
    options: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """Parse `--params` (and `--<command>` flags), run the stage, exit 2 with one clear line on bad input.

    `options` are text options ({name: (command, help)}) passed to that command as keyword arguments.
    """
    if callable(commands):
        commands = {"run": commands}
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: params.yaml)")
    for name, command in commands.items():
        if name != "run":
            parser.add_argument(f"--{name}", action="store_true", help=(command.__doc__ or "").splitlines()[0])
    for name, (_, text) in (options or {}).items():
        parser.add_argument(f"--{name}", default="", help=text)
    arguments = parser.parse_args()
    chosen = next((name for name in commands if name != "run" and getattr(arguments, name)), "run")
    extra = {name: getattr(arguments, name) for name, (command, _) in (options or {}).items() if command == chosen}
    filter_native_stderr()
    configure_logging()
    # Hide TensorFlow's C++ INFO/WARNING banners (CUDA probing, oneDNN notes); errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        params = load_params(arguments.params)
        # Before TensorFlow is first imported: oneDNN reads its settings once.
        apply_numerics(params.numerics)
        written = commands[chosen](params, **extra)
    except (ParamsError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except WorkspaceBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
    for path in written:
        logging.getLogger("tasks").info("wrote %s", path)
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Exit 0 at once once TensorFlow is loaded: every output is in place, and its teardown is slow."""
    if "tensorflow" not in sys.modules:
        return
    # The interpreter's teardown of TensorFlow's modules costs 1-2 s of CPU per process (evaluate
    # on the tiny test project: 7.3 s of CPU with it, 5.7 s without), and frees nothing that matters.
    atexit._run_exitfuncs()  # the stderr filter's drain, and whatever else was registered
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
