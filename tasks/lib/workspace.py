"""The workspace lock: one pipeline run or promotion at a time in a checkout, held by a kernel flock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.lib.io import WorkspaceBusyError

# Set, with pass_fds, for a child that holds the lock with its parent (the flow's promote step).
LOCK_FD_VARIABLE = "CIFAR10_WORKSPACE_LOCK_FD"
LOCK_FILE = Path(".dvc/tmp/flow.lock")


@contextlib.contextmanager
def exclusive_workspace(root: Path) -> Iterator[int]:
    """Hold the workspace's exclusive lock; refuse at once if another process holds it. Yields the lock's fd.

    flock is released by the kernel when the process dies, even by SIGKILL: no stale locks.
    """
    lock_path = root / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    inherited = _inherited_lock(lock_path)
    if inherited is not None:
        yield inherited
        return
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusyError(
                f"{lock_path}: another pipeline run or promotion is in progress in {root}; "
                "try again when it has finished"
            ) from None
        yield handle.fileno()


def _inherited_lock(lock_path: Path) -> int | None:
    """The lock's fd passed down by the parent that holds it (LOCK_FD_VARIABLE), or None."""
    try:
        descriptor = int(os.environ[LOCK_FD_VARIABLE])
        opened, on_disk = os.fstat(descriptor), lock_path.stat()
    except (KeyError, ValueError, OSError):
        return None
    if (opened.st_dev, opened.st_ino) != (on_disk.st_dev, on_disk.st_ino):
        return None
    try:
        # On the parent's own open file (pass_fds shares it) this succeeds: the lock is already ours.
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    return descriptor
