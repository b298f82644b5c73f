"""CI's time from a fresh clone, on this CPU or on a slower one stood in for by a CPU quota.

Usage: python -m bench.ci_time [--cpus N] [--isa-cap ISA] [--rev COMMIT] [--workdir DIR]

Clones HEAD with ../shared linked beside it (as bench.overhead does) and runs `.ci/run` there as
CI does, inside a cgroup of its own, so the CPU time of every process it starts is counted,
orphans included. `--cpus N` caps that cgroup at N cores: the slowest CPU of the pool, a 2-core AMD
Zen 1, ran the same test suite 1.46-1.71 times slower than this pool's Zen 4 (docs/speed.md), so
`--cpus 1.25` (2 / 1.6) on a Zen 4 stands in for it. `--isa-cap AVX2` sets ONEDNN_MAX_CPU_ISA as
a CPU without AVX-512 or bf16 has it. Needs write access to /sys/fs/cgroup (cgroup v1 or v2).
Prints the wall and CPU time, pytest's count line, the slowest tests and the tests that took
the most CPU (tests/conftest.py logs each test's, with its processes', to CIFAR10_TEST_CPU_LOG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.overhead import commit_of, fresh_clone
from bench.predict import cpu_line

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
# pytest's last line: "==== 299 passed, 2 warnings in 1075.09s (0:17:55) ====".
_SUMMARY = re.compile(r"^=+ (.+) in ([\d.]+)s(?: \([\d:]+\))? =+$", re.M)
# The head of its durations table: "==== slowest 25 durations ====" (or "slowest durations" with --durations=0).
_DURATIONS = re.compile(r"slowest (?:\d+ )?durations")


@dataclass(frozen=True)
class Cgroup:
    """A cgroup (v1: its cpu and cpuacct halves) that processes join and whose CPU time can be read."""

    procs: tuple[Path, ...]  # the cgroup.procs files a process writes its pid into
    usage: Path  # v2: cpu.stat (usage_usec); v1: cpuacct.usage (nanoseconds)

    def join(self) -> None:
        """Move the calling process (and so everything it starts) into the cgroup."""
        for procs in self.procs:
            procs.write_text(str(os.getpid()))

    def cpu_seconds(self) -> float:
        """CPU time used by every process that was ever in the cgroup."""
        text = self.usage.read_text()
        if self.usage.name == "cpu.stat":
            return int(re.search(r"^usage_usec (\d+)$", text, re.M).group(1)) / 1e6
        return int(text) / 1e9

    def remove(self) -> None:
        """Remove the cgroup's folders; one that still holds a process (an orphan of CI) stays."""
        for procs in self.procs:
            with contextlib.suppress(OSError):
                procs.parent.rmdir()


def make_cgroup(root: Path, name: str, cpus: float | None) -> Cgroup:
    """The cgroup `name` under `root`, capped at `cpus` cores (None: no cap)."""
    quota = None if cpus is None else round(cpus * PERIOD_US)
    if (root / "cgroup.controllers").exists():  # v2: one hierarchy
        group = root / name
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota or 'max'} {PERIOD_US}")
        return Cgroup((group / "cgroup.procs",), group / "cpu.stat")
    cpu, accounting = root / "cpu" / name, root / "cpuacct" / name  # the same folder where mounted as cpu,cpuacct
    for group in (cpu, accounting):
        group.mkdir(exist_ok=True)
    (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(quota or -1))
    procs = dict.fromkeys([cpu.resolve() / "cgroup.procs", accounting.resolve() / "cgroup.procs"])
    return Cgroup(tuple(procs), accounting / "cpuacct.usage")


def pytest_tail(log: str, slowest: int = 10) -> tuple[str, float, list[str]]:
    """(pytest's count line, its seconds, the first `slowest` lines of its durations table) from a CI log."""
    summaries = _SUMMARY.findall(log)
    if not summaries:
        raise ValueError("the CI log has no pytest summary line: did the tests run?")
    counts, seconds = summaries[-1]
    _, *after = _DURATIONS.split(log, 1)
    table = after[0].splitlines()[1:] if after else []
    return counts, float(seconds), [line for line in table if re.match(r"^[\d.]+s ", line)][:slowest]


def most_cpu(log: str, total_cpu_s: float, top: int = 10) -> list[str]:
    """The `top` tests by CPU-seconds, from the per-test JSON lines, each with its share of `total_cpu_s`."""
    records = sorted((json.loads(line) for line in log.splitlines() if line.strip()), key=lambda r: -r["cpu_s"])
    counted = sum(record["cpu_s"] for record in records)
    lines = [f"all {len(records)} tests: {counted:,.0f} CPU-seconds, {counted / total_cpu_s:.0%} of CI's"]
    for record in records[:top]:
        share = record["cpu_s"] / total_cpu_s
        lines.append(f"{record['cpu_s']:7.1f} CPU-s ({share:4.1%}) {record['wall_s']:7.1f} s  {record['test']}")
    return lines


def minutes(seconds: float) -> str:
    """1103.4 -> '18 min 23 s'."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def main() -> None:
    """Clone, run `.ci/run` in a cgroup, print its time and slowest tests."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=float, help="cap CI at this many cores (1.25 stands in for Zen 1)")
    parser.add_argument("--isa-cap", help="ONEDNN_MAX_CPU_ISA for CI's processes, such as AVX2")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar10-ci-time"))
    parser.add_argument(
        "--rev",
        help="run CI at this commit instead of HEAD (one timed on another CPU, as 1afb8dc on Zen 1, calibrates --cpus)",
    )
    arguments = parser.parse_args()
    if arguments.cpus is not None and arguments.cpus <= 0:
        parser.error(f"--cpus {arguments.cpus}: expected a positive number of cores")
    project, environment = fresh_clone(arguments.workdir, arguments.rev)
    environment["CI"] = "true"
    cpu_log = arguments.workdir / "test_cpu.jsonl"
    environment["CIFAR10_TEST_CPU_LOG"] = str(cpu_log)
    if arguments.isa_cap:
        environment["ONEDNN_MAX_CPU_ISA"] = arguments.isa_cap
    log = arguments.workdir / "ci.log"
    try:
        group = make_cgroup(CGROUP_ROOT, f"cifar10-ci-{os.getpid()}", arguments.cpus)
    except OSError as error:
        sys.exit(f"error: cannot make a cgroup under {CGROUP_ROOT}: {error} (run as root, or with a delegated cgroup)")
    print(f"[ci_time] .ci/run in {project}; its output in {log}", file=sys.stderr, flush=True)
    cpu_before, start = group.cpu_seconds(), time.perf_counter()
    try:
        with open(log, "w") as output:
            result = subprocess.run(
                ["bash", ".ci/run"],
                cwd=project,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=group.join,
            )
        wall_s, cpu_s = time.perf_counter() - start, group.cpu_seconds() - cpu_before
    finally:
        group.remove()
    try:
        counts, tests_s, table = pytest_tail(log.read_text())
    except ValueError as error:
        sys.exit(f"error: .ci/run exited {result.returncode} after {minutes(wall_s)}; {error} See {log}")
    cap = f"{arguments.cpus:g} cores of CPU time" if arguments.cpus else "no CPU cap"
    print(f"\n{cpu_line()}; commit {commit_of(project)}; {cap}; ONEDNN_MAX_CPU_ISA={arguments.isa_cap or 'unset'}")
    print(f".ci/run exited {result.returncode}: {minutes(wall_s)} in all, {cpu_s:,.0f} CPU-seconds")
    print(f"tests: {counts} in {minutes(tests_s)}\nslowest:\n" + "\n".join(table))
    if cpu_log.exists():
        print("most CPU (the test's and its processes'):\n" + "\n".join(most_cpu(cpu_log.read_text(), cpu_s)))
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
