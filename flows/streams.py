"""A served run's output outlives its scheduler: writes to a pipe whose reader died are dropped.

A deployment run's stdout and stderr are pipes to the scheduler (`flows.schedule`), which
prints them. If the scheduler dies (SIGKILL, an OOM kill, a restart), the run's next log line
meets a broken pipe, and rich, which Prefect's console handler writes through, turns that into
SystemExit(1): the run would end Crashed in the middle of training. Routed through a pipe of
our own, drained by a thread that stops forwarding once the far end is gone, every write
succeeds; the logs still reach Prefect's API.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def survive_a_dead_reader(descriptors: tuple[int, ...] = (1, 2)) -> None:
    """Route each file descriptor through a thread that forwards its bytes while the reader lives."""
    for descriptor in descriptors:
        saved = os.dup(descriptor)
        read_end, write_end = os.pipe()
        os.dup2(write_end, descriptor)
        os.close(write_end)
        thread = threading.Thread(target=_forward, args=(read_end, saved), name=f"fd{descriptor}-forward", daemon=True)
        thread.start()
        atexit.register(_restore, descriptor, saved, thread)


def _forward(read_end: int, destination: int) -> None:
    reader_alive = True
    with open(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            if reader_alive:
                try:
                    os.write(destination, chunk)
                except (BrokenPipeError, OSError):
                    reader_alive = False  # keep draining, so that no writer ever blocks


def _restore(descriptor: int, saved: int, thread: threading.Thread) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.dup2(saved, descriptor)  # closes the pipe's last write end: the thread drains and stops
    thread.join(timeout=10)
