"""Which process a flow run is, and whether it still runs: the evidence crash recovery acts on.

A run records `host:pid:start time:boot id` when its flow starts (flows.pipeline); a restarted
scheduler (flows.schedule) reads it back. The start time tells a process from a later one
that got its pid; the boot id tells this boot from an earlier one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def this_boot() -> tuple[str, str]:
    """(host name, boot id): processes recorded under another pair are gone."""
    return socket.gethostname(), Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; state is field 3, start time field 22.
    fields = stat.rpartition(")")[2].split()
    # A killed process whose parent is gone too waits as a zombie until init reaps it, and some
    # container inits never do: it has kept its pid and start time but runs nothing.
    return None if fields[0] in ("Z", "X") else fields[19]


def process_tag() -> str:
    """`host:pid:start:boot id` of this process: on this host, tells it apart from a later one with its pid."""
    host, boot_id = this_boot()
    return f"{host}:{os.getpid()}:{process_start(os.getpid())}:{boot_id}"


def liveness(tag: str | None, state_age_s: float, pending_limit_s: float) -> tuple[bool | None, str]:
    """(alive?, why) for a run from its recorded process and the age of its state: None when unknown.

    Dead only on evidence: its process recorded on this host is gone (or this host has rebooted
    since), or nothing was recorded for longer than `pending_limit_s`. A process recorded on
    another host is unknown here: its heartbeats decide (the zombie automation).
    """
    if tag and tag.count(":") >= 3:
        host, pid, start, boot_id = tag.rsplit(":", 3)
        here, this_boot_id = this_boot()
        if host != here:
            return None, f"its process {tag} is on host {host}: left to its heartbeats"
        if boot_id != this_boot_id:
            return False, "its process ran before this machine's last boot"
        # The start time, not the pid alone: pids wrap around (32,768 here) and get reused, by threads too.
        if process_start(int(pid)) == start:
            return True, f"its process {tag} is alive"
        return False, f"its process {tag} is gone"
    if state_age_s > pending_limit_s:
        return False, f"no process recorded {state_age_s:.0f} s after it was submitted (the scheduler died?)"
    return None, f"no process recorded yet, {state_age_s:.0f} s after it was submitted: starting"


def process_alive(tag: str | None) -> bool:
    """Whether the process a run recorded (`host:pid:start:boot id`) is alive on this host now."""
    return liveness(tag, 0.0, float("inf"))[0] is True
