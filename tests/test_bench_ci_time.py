"""bench.ci_time: the cgroup it runs CI in (v1 and v2 layouts), and pytest's tail read from CI's log."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.ci_time import make_cgroup, minutes, most_cpu, pytest_tail
from bench.overhead import commit_of, fresh_clone

CI_LOG = """make setup
........................................................................ [ 96%]
============================= slowest 25 durations =============================
196.35s call     tests/test_schedule.py::test_heartbeats
153.40s call     tests/test_sweep.py::test_three_candidates
0.01s setup    tests/test_params.py::test_bad_values

(553 durations < 0.005s hidden.  Use -vv to show these durations.)
================= 299 passed, 2 warnings in 1075.09s (0:17:55) =================
"""


def test_a_v2_cgroup_is_capped_in_cpu_max_and_reports_seconds(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu io memory\n")
    group = make_cgroup(tmp_path, "ci", 1.25)
    assert (tmp_path / "ci/cpu.max").read_text() == "125000 100000"
    (tmp_path / "ci/cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert group.cpu_seconds() == 2.5
    group.join()
    assert (tmp_path / "ci/cgroup.procs").read_text() == str(os.getpid())
    make_cgroup(tmp_path, "uncapped", None)
    assert (tmp_path / "uncapped/cpu.max").read_text() == "max 100000"


def test_a_v1_cgroup_is_capped_in_cfs_quota_and_joins_both_hierarchies(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpuacct").mkdir()
    group = make_cgroup(tmp_path, "ci", 0.5)
    assert (tmp_path / "cpu/ci/cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "cpu/ci/cpu.cfs_period_us").read_text() == "100000"
    (tmp_path / "cpuacct/ci/cpuacct.usage").write_text("3000000000\n")
    assert group.cpu_seconds() == 3.0
    group.join()
    assert all((tmp_path / half / "ci/cgroup.procs").read_text() == str(os.getpid()) for half in ("cpu", "cpuacct"))
    assert make_cgroup(tmp_path, "uncapped", None) and (tmp_path / "cpu/uncapped/cpu.cfs_quota_us").read_text() == "-1"


def test_v1_mounted_as_cpu_comma_cpuacct_joins_once(tmp_path):
    (tmp_path / "cpu,cpuacct").mkdir()
    for link in ("cpu", "cpuacct"):
        (tmp_path / link).symlink_to("cpu,cpuacct")
    assert make_cgroup(tmp_path, "ci", 1.0).procs == ((tmp_path / "cpu,cpuacct/ci/cgroup.procs").resolve(),)


def test_pytests_count_line_and_slowest_tests_are_read_from_the_log():
    counts, seconds, slowest = pytest_tail(CI_LOG, slowest=2)
    assert (counts, seconds) == ("299 passed, 2 warnings", 1075.09)
    assert slowest == [
        "196.35s call     tests/test_schedule.py::test_heartbeats",
        "153.40s call     tests/test_sweep.py::test_three_candidates",
    ]
    assert minutes(seconds) == "17 min 55 s"
    with pytest.raises(ValueError, match="no pytest summary line"):
        pytest_tail(CI_LOG.rsplit("\n", 2)[0])


def test_the_tests_with_the_most_cpu_come_first_with_their_share():
    log = "\n".join(
        [
            '{"test": "a", "cpu_s": 10.0, "wall_s": 12.0}',
            '{"test": "b", "cpu_s": 30.0, "wall_s": 20.0}',
            '{"test": "c", "cpu_s": 20.0, "wall_s": 40.0}',
        ]
    )
    lines = most_cpu(log + "\n", total_cpu_s=100.0, top=2)
    assert lines[0] == "all 3 tests: 60 CPU-seconds, 60% of CI's"
    assert [line.split()[-1] for line in lines[1:]] == ["b", "c"]
    assert "(30.0%)" in lines[1]


def test_the_clone_is_of_the_commit_asked_for_with_shared_beside_it(tmp_path):
    source, shared = tmp_path / "repo", tmp_path / "shared"
    shared.mkdir()
    commits = []
    for message in ("first", "second"):
        git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@e"]
        if not commits:
            subprocess.run(["git", "init", "--quiet", str(source)], check=True)
        subprocess.run([*git, "commit", "--quiet", "--allow-empty", "-m", message], check=True)
        commits.append(commit_of(source))
    for rev, expected in ((None, commits[1]), (commits[0], commits[0])):
        project, environment = fresh_clone(tmp_path / "work", rev, source=source)
        assert commit_of(project) == expected
        assert (project.parent / "shared").resolve() == shared.resolve()
        assert "VIRTUAL_ENV" not in environment
