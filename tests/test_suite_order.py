"""The suite's own machinery: long-running tests start first, each test's CPU can be logged, shared servers stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import (
    ROOT,
    group_running,
    group_states,
    pytest_collection_modifyitems,
    stop_process_group,
    wait_until,
)


class Item:
    """What the ordering hook reads of a collected test: its name and markers."""

    def __init__(self, name: str, *markers: str):
        self.name, self.markers = name, markers

    def get_closest_marker(self, name: str):
        return pytest.mark.long_running if name in self.markers else None


def test_long_running_tests_move_to_the_front_in_their_own_order():
    items = [Item("a"), Item("slow1", "long_running"), Item("b"), Item("c", "other"), Item("slow2", "long_running")]
    pytest_collection_modifyitems(items)
    assert [item.name for item in items] == ["slow1", "slow2", "a", "b", "c"]


def test_each_tests_cpu_is_logged_with_that_of_the_processes_it_waited_for(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import subprocess, sys\n"
        "def test_idle():\n    pass\n"
        "def test_busy_child():\n"
        "    subprocess.run([sys.executable, '-c', 'import time\\nend = time.process_time() + 0.5\\n"
        "while time.process_time() < end: pass'], check=True)\n"
    )
    log = tmp_path / "cpu.jsonl"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)]
    result = subprocess.run(
        command, cwd=ROOT, env=os.environ | {"CIFAR10_TEST_CPU_LOG": str(log)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = {record["test"].rsplit("::", 1)[1]: record for record in map(json.loads, log.read_text().splitlines())}
    assert set(records) == {"test_idle", "test_busy_child"}
    assert records["test_busy_child"]["cpu_s"] >= 0.5 > records["test_idle"]["cpu_s"]
    assert records["test_busy_child"]["wall_s"] >= 0.5


def test_a_process_group_whose_leader_is_no_child_of_ours_is_stopped_whole():
    # How the run stops the workers' shared Prefect server: the worker that started it may be gone.
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)  # a grandchild, too
    wait_until(lambda: len(group_states(shell.pid)) == 3, 10, "the shell and its two sleeps", interval_s=0.05)
    stop_process_group(shell.pid)
    assert not group_running(shell.pid)  # the leader may stay a zombie until its parent (here, this test) reaps it
    assert shell.wait(timeout=10) == -15
