"""Faults through the real entry points: kills, concurrent runs, tampering, a corrupted dvc.lock.

Kills are real SIGKILLs of real processes. Where a kill must land at an exact point (inside
a checkpoint write), a sitecustomize.py on the stage's PYTHONPATH makes the process SIGKILL
itself there; the pipeline code has no test hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import DVC, FLOW, edit_params, project_environment, ran_stages, run_command

# Loaded by every Python process of the stage: when tasks.io is about to rename a finished
# temporary file onto FAULT_AT_RENAME (a file name), i.e. mid-write, SIGKILL this process
# (FAULT=kill) or hold still (FAULT=pause, FAULT_PAUSE_S seconds) so another run collides with it.
FAULT_AT_RENAME = """
import os, signal, sys, time

target = os.environ.get("FAULT_AT_RENAME")
if target:
    import importlib.abc, importlib.util

    class _Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target_=None):
            if name != "tasks.io":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            original_exec = loader.exec_module

            def exec_module(module):
                original_exec(module)
                real_replace = module.os.replace

                class _Os:
                    def __getattr__(self, attr):
                        return getattr(os, attr)

                    @staticmethod
                    def replace(source, destination):
                        if os.path.basename(str(destination)) == target:
                            if os.environ.get("FAULT") == "pause":
                                time.sleep(float(os.environ.get("FAULT_PAUSE_S", "20")))
                            else:
                                os.kill(os.getpid(), signal.SIGKILL)
                        return real_replace(source, destination)

                module.os = _Os()

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Patch())
"""


def environment_with_fault(project: Path, file_name: str, fault: str = "kill", pause_s: float = 20) -> dict[str, str]:
    """Environment whose Python processes SIGKILL themselves (or pause) when about to land `file_name`."""
    hooks = project.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(FAULT_AT_RENAME)
    environment = project_environment(project.parent)
    environment.update(PYTHONPATH=str(hooks), FAULT_AT_RENAME=file_name, FAULT=fault, FAULT_PAUSE_S=str(pause_s))
    return environment


def checkpoint_history(project: Path) -> list[int]:
    return pd.read_csv(project / "artifacts/checkpoints/history.csv")["epoch"].tolist()


# Flow runs report to one real Prefect server for the session instead of starting their own.
pytestmark = pytest.mark.usefixtures("prefect_api")


def command_for(entry_point: str) -> list[str]:
    return [*DVC, "repro"] if entry_point == "dvc" else FLOW


def assert_resumes(project: Path, command: list[str], *, last_done: int, epochs: int) -> None:
    """Rerunning resumes after epoch `last_done`, finishes all `epochs`, and leaves DVC clean."""
    resumed = run_command(command, project)
    output = resumed.stdout + resumed.stderr
    assert "resuming from" in output and f"epoch {last_done} of {epochs}" in output
    assert checkpoint_history(project) == list(range(1, epochs + 1))
    assert not [path.name for path in (project / "artifacts/checkpoints").iterdir() if ".tmp" in path.name]
    assert "up to date" in run_command([*DVC, "status"], project).stdout


@pytest.mark.parametrize("entry_point", ["dvc", "flow"])
def test_kill_during_checkpoint_write_then_resume(project, entry_point):
    edit_params(project, "train", epochs=4)
    lock_before = (project / "dvc.lock").read_bytes()
    command = command_for(entry_point)
    killed = subprocess.run(
        command, cwd=project, env=environment_with_fault(project, "epoch-003.keras"), capture_output=True, text=True
    )
    assert killed.returncode != 0
    if entry_point == "flow":
        assert "stage train failed" in killed.stdout + killed.stderr  # the failed run names its stage
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert checkpoint_history(project) == [1, 2]  # epoch 3 died mid-write: no row, no checkpoint
    assert not (project / "artifacts/checkpoints/epoch-003.keras").exists()
    first_two = [(project / f"artifacts/checkpoints/epoch-00{n}.keras").read_bytes() for n in (1, 2)]

    assert_resumes(project, command, last_done=2, epochs=4)
    assert [(project / f"artifacts/checkpoints/epoch-00{n}.keras").read_bytes() for n in (1, 2)] == first_two


def wait_for_epochs(project: Path, count: int, epochs: int, timeout_s: float = 240) -> None:
    """Block until the run training for `epochs` epochs (not an earlier run's leftovers) has done `count`."""
    checkpoints = project / "artifacts/checkpoints"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            current = json.loads((checkpoints / "fingerprint.json").read_text())["train"]["epochs"] == epochs
            if current and len(checkpoint_history(project)) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass  # not written yet
        time.sleep(0.05)
    pytest.fail(f"training did not complete {count} epochs in {timeout_s} s")


@pytest.mark.parametrize("entry_point", ["dvc", "flow"])
def test_kill_during_an_epoch_then_resume(project, entry_point):
    edit_params(project, "train", epochs=12)
    lock_before = (project / "dvc.lock").read_bytes()
    command = command_for(entry_point)
    process = subprocess.Popen(
        command,
        cwd=project,
        env=project_environment(project.parent),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_epochs(project, 2, epochs=12)
    os.killpg(process.pid, signal.SIGKILL)  # the whole run at once: flow or dvc, and the training process
    process.wait(timeout=30)
    done = checkpoint_history(project)
    assert 2 <= len(done) < 12
    assert (project / "dvc.lock").read_bytes() == lock_before

    assert_resumes(project, command, last_done=done[-1], epochs=12)


def test_two_flows_at_once_one_refuses_cleanly(project):
    edit_params(project, "train", epochs=6)
    # The first flow holds still for 25 s before landing epoch 2, longer than the second
    # flow needs to start and reach the workspace lock.
    environment = environment_with_fault(project, "epoch-002.keras", fault="pause", pause_s=25)
    first = subprocess.Popen(
        FLOW, cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_epochs(project, 1, epochs=6)
    second = run_command(FLOW, project, check=False)
    first_output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, first_output
    assert second.returncode != 0
    assert "another pipeline run is in progress" in second.stderr + second.stdout
    assert "up to date" in run_command([*DVC, "status"], project).stdout
    yaml.safe_load((project / "dvc.lock").read_text())


def test_dvc_repro_while_flow_trains_refuses_cleanly(project):
    edit_params(project, "train", epochs=6)
    # The flow's training holds still for 20 s before landing epoch 2: the collision is certain.
    environment = environment_with_fault(project, "epoch-002.keras", fault="pause")
    flow = subprocess.Popen(
        FLOW, cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_epochs(project, 1, epochs=6)
    clash = run_command([*DVC, "repro"], project, check=False)
    flow_output, _ = flow.communicate(timeout=600)
    assert flow.returncode == 0, flow_output
    assert clash.returncode != 0
    assert "is busy" in clash.stderr or "Unable to acquire lock" in clash.stderr
    assert ran_stages(clash.stdout) == []
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_corrupted_dvc_lock_is_a_clear_error_and_not_regenerated(project):
    lock = project / "dvc.lock"
    lock.write_text(lock.read_text()[:-40] + "\n  [unclosed\n")
    corrupted = lock.read_bytes()
    for command in ([*DVC, "repro"], FLOW):
        result = run_command(command, project, check=False)
        assert result.returncode != 0
        output = result.stderr + result.stdout
        assert "dvc.lock" in output and ("is invalid" in output or "is corrupted" in output), output
        assert lock.read_bytes() == corrupted


def test_tampered_model_is_refused_before_loading(project):
    model = project / "artifacts/model/model.keras"
    payload = bytearray(model.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    model.chmod(0o644)
    model.write_bytes(bytes(payload))
    result = run_command([sys.executable, "-m", "tasks.evaluate"], project, check=False)
    assert result.returncode == 2
    assert "artifacts/model/model.keras: sha256 is" in result.stderr
    # DVC sees the change too, and `dvc repro` rebuilds the model from its checkpoint.
    status = run_command([*DVC, "status"], project).stdout
    assert "artifacts/model" in status and "modified" in status


def test_tampered_cache_object_is_refused_after_checkout(project):
    model = project / "artifacts/model/model.keras"
    cache = run_command([*DVC, "cache", "dir"], project).stdout.strip()
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    cached = Path(cache) / "files" / "md5" / md5[:2] / md5[2:]
    cached.chmod(0o644)
    payload = bytearray(cached.read_bytes())
    payload[-100] ^= 0xFF
    cached.write_bytes(bytes(payload))
    model.unlink()
    run_command([*DVC, "checkout", "--relink", "artifacts/model"], project, check=False)
    result = run_command([sys.executable, "-m", "tasks.evaluate"], project, check=False)
    assert result.returncode == 2
    assert "model.keras: sha256 is" in result.stderr
