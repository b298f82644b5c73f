"""Faults through the real entry points: kills, concurrent runs, tampering, a corrupted dvc.lock.

Kills are real SIGKILLs of real processes. Where a kill must land at an exact point (inside
a checkpoint write), a sitecustomize.py on the stage's PYTHONPATH makes the process SIGKILL
itself there; the pipeline code has no test hooks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.lib.io import copy_verified, sha256_file
from tests.conftest import (
    DVC,
    FLOW,
    RETRAINING,
    cache_object,
    edit_params,
    project_environment,
    ran_stages,
    run_command,
    seed_run_cache,
    wait_until,
)

# Loaded by every Python process of the stage (as sitecustomize.py); each fault is chosen by
# environment variables and lands at one exact point, so no test depends on timing:
# - FAULT_AT_RENAME=<file name> [FAULT_AT_COUNT=n]: when tasks.lib.io is about to rename a finished
#   temporary file onto that name for the n-th time, SIGKILL this process (FAULT=kill) or hold
#   still (FAULT=pause, FAULT_PAUSE_S seconds) so another run collides with it; with
#   FAULT_PAUSE_ONCE=<marker file>, only the first process to get there holds still. FAULT=kill_worker
#   with FAULT_KILL_WORKER=<candidate>:<n>,... and FAULT_RECORD=<folder>: the first n runs of a sweep
#   candidate (its workspace folder's name starts with <candidate>-) SIGKILL the Dask worker above
#   them, then themselves, each kill recorded in <folder> as <candidate>.<k> holding the worker's pid.
# - FAULT_MID_WRITE=<file name>: SIGKILL after the first two members of a Keras archive have
#   gone into that file's temporary copy: the temporary file is half written.
# - FAULT_AT_BATCH=<epoch>:<batch> (1-based): SIGKILL when training finishes that batch (Keras'
#   callback list is patched: the stage module runs as __main__, so it cannot be patched by name).
# - FAULT_BEFORE_STATUS=<stage>:<marker>: before DVC's Repo.status(targets=[stage]) takes the
#   repository lock, create <marker> and wait until <marker>.released exists (once).
# - FAULT_AT_TOOL=<text> FAULT_WHEN=before|after|during|pause: when tasks.lib.cli.run_tool runs a command
#   line holding <text> (promote's git, gto and dvc calls), SIGKILL this process before it starts,
#   after it succeeded, or while it runs (the command's process killed with it); or hold still
#   FAULT_PAUSE_S seconds before it starts.
FAULT_HOOKS = """
import os, signal, sys, time

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

rename_target = os.environ.get("FAULT_AT_RENAME")
mid_write = os.environ.get("FAULT_MID_WRITE")
at_batch = os.environ.get("FAULT_AT_BATCH")
before_status = os.environ.get("FAULT_BEFORE_STATUS")
at_tool = os.environ.get("FAULT_AT_TOOL")

if mid_write:
    import zipfile

    real_writestr = zipfile.ZipFile.writestr
    written = []

    def writestr(self, *args, **kwargs):
        result = real_writestr(self, *args, **kwargs)
        if os.path.basename(str(self.filename)).startswith("." + mid_write + "."):
            written.append(1)
            if len(written) == 2:
                self.fp.flush()
                _die()
        return result

    zipfile.ZipFile.writestr = writestr

if rename_target or at_batch or before_status or at_tool:
    import importlib.abc, importlib.util

    class _Patch(importlib.abc.MetaPathFinder):
        wanted = {"tasks.lib.io"} if rename_target else set()
        wanted |= {"keras.src.callbacks.callback_list"} if at_batch else set()
        wanted |= {"dvc.repo"} if before_status else set()
        wanted |= {"tasks.lib.cli"} if at_tool else set()

        def find_spec(self, name, path=None, target_=None):
            if name not in self.wanted:
                return None
            self.wanted.discard(name)
            if not self.wanted:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            original_exec = spec.loader.exec_module

            def exec_module(module):
                original_exec(module)
                patches = {"tasks.lib.io": _patch_io, "dvc.repo": _patch_dvc_repo, "tasks.lib.cli": _patch_run_tool}
                patches.get(name, _patch_callbacks)(module)

            spec.loader.exec_module = exec_module
            return spec

    def _patch_io(module):
        real_replace = module.os.replace
        landed = []

        class _Os:
            def __getattr__(self, attr):
                return getattr(os, attr)

            @staticmethod
            def replace(source, destination):
                if os.path.basename(str(destination)) == rename_target:
                    landed.append(1)
                    if len(landed) == int(os.environ.get("FAULT_AT_COUNT", "1")):
                        if os.environ.get("FAULT") == "kill_worker":
                            _kill_this_candidates_worker()
                        elif os.environ.get("FAULT") == "pause":
                            once = os.environ.get("FAULT_PAUSE_ONCE")  # a marker file: the first process only
                            if not once or not os.path.exists(once):
                                if once:
                                    open(once, "w").close()
                                time.sleep(float(os.environ.get("FAULT_PAUSE_S", "20")))
                        else:
                            _die()
                return real_replace(source, destination)

        module.os = _Os()

    def _kill_this_candidates_worker():
        record = os.environ["FAULT_RECORD"]
        for entry in os.environ["FAULT_KILL_WORKER"].split(","):
            name, times = entry.rsplit(":", 1)
            if f"/{name}-" not in os.getcwd():
                continue
            kills = [found for found in os.listdir(record) if found.startswith(name + ".")]
            if len(kills) >= int(times):
                return
            worker = os.getpid()
            while b"spawn_main" not in open(f"/proc/{worker}/cmdline", "rb").read():
                worker = int(open(f"/proc/{worker}/stat").read().rpartition(")")[2].split()[1])
            with open(os.path.join(record, f"{name}.{len(kills) + 1}"), "w") as kill:
                kill.write(str(worker))
            os.kill(worker, signal.SIGKILL)
            _die()

    def _patch_callbacks(module):
        # Keras calls these on the list of all callbacks, once per epoch and once per batch.
        epoch_wanted, batch_wanted = (int(part) for part in at_batch.split(":"))
        real_epoch_begin = module.CallbackList.on_epoch_begin
        real_batch_end = module.CallbackList.on_train_batch_end
        current = [0]

        def on_epoch_begin(self, epoch, logs=None):
            current[0] = epoch + 1
            return real_epoch_begin(self, epoch, logs)

        def on_train_batch_end(self, batch, logs=None):
            if (current[0], batch + 1) == (epoch_wanted, batch_wanted):
                _die()
            return real_batch_end(self, batch, logs)

        module.CallbackList.on_epoch_begin = on_epoch_begin
        module.CallbackList.on_train_batch_end = on_train_batch_end

    def _patch_dvc_repo(module):
        stage, marker = before_status.split(":", 1)
        released = marker + ".released"
        real_status = module.Repo.status

        def status(self, *args, **kwargs):
            if kwargs.get("targets") == [stage] and not os.path.exists(released):
                open(marker, "w").close()
                while not os.path.exists(released):
                    time.sleep(0.1)
            return real_status(self, *args, **kwargs)

        module.Repo.status = status

    def _patch_run_tool(module):
        import subprocess

        real_run_tool = module.run_tool
        when = os.environ.get("FAULT_WHEN", "after")

        def run_tool(arguments, cwd, **kwargs):
            if at_tool not in " ".join(map(str, arguments)):
                return real_run_tool(arguments, cwd, **kwargs)
            if when == "before":
                _die()
            if when == "pause":
                time.sleep(float(os.environ.get("FAULT_PAUSE_S", "20")))
            if when == "during":
                child = subprocess.Popen(arguments, cwd=cwd, env=kwargs.get("environment"))
                time.sleep(0.05)
                child.kill()
                _die()
            result = real_run_tool(arguments, cwd, **kwargs)
            if when == "after":
                _die()
            return result

        module.run_tool = run_tool

    sys.meta_path.insert(0, _Patch())
"""


def environment_with_fault(project: Path, **faults: str | int | float) -> dict[str, str]:
    """Environment whose Python processes meet the FAULT_HOOKS faults named by `faults` (FAULT_AT_RENAME=...)."""
    hooks = project.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(FAULT_HOOKS)
    environment = project_environment(project.parent)
    environment.update(PYTHONPATH=str(hooks), **{key: str(value) for key, value in faults.items()})
    return environment


RESUME = Path("artifacts/resume")
CHECKPOINTS = Path("artifacts/checkpoints")


def checkpoint_history(project: Path, folder: Path = RESUME) -> list[int]:
    return pd.read_csv(project / folder / "history.csv")["epoch"].tolist()


def checkpoint_bytes(project: Path, epochs, folder: Path = RESUME) -> list[bytes]:
    return [(project / folder / f"epoch-{epoch:03d}.keras").read_bytes() for epoch in epochs]


# Flow runs report to one real Prefect server for the session instead of starting their own.
pytestmark = pytest.mark.usefixtures("prefect_api")


def command_for(entry_point: str) -> list[str]:
    return [*DVC, "repro"] if entry_point == "dvc" else FLOW


def run_killed(project: Path, command: list[str], **fault) -> subprocess.CompletedProcess:
    """Run `command` with a FAULT_HOOKS fault that kills it; assert it failed."""
    killed = subprocess.run(
        command, cwd=project, env=environment_with_fault(project, **fault), capture_output=True, text=True
    )
    assert killed.returncode != 0, killed.stdout + killed.stderr
    return killed


def kill_and_resume(project: Path, entry_point: str, retrained_cache: Path, *, last_done: int, **fault) -> None:
    """Run with `fault` (which kills training), check nothing was lost, resume, check the same again.

    The run resumes to the `retrained` fixture's epochs. Its select_best and evaluate, which read
    the very bytes that fixture's train wrote, are then restored from a copy of its run cache.
    """
    epochs = RETRAINING["epochs"]
    edit_params(project, "train", **RETRAINING)
    seed_run_cache(project, retrained_cache, except_stage="train")
    lock_before = (project / "dvc.lock").read_bytes()
    command = command_for(entry_point)
    killed = run_killed(project, command, **fault)
    if entry_point == "flow":
        assert "stage train failed" in killed.stdout + killed.stderr  # the failed run names its stage
    if written := fault.get("FAULT_MID_WRITE"):
        (partial,) = (project / RESUME).glob(f".{written}.*.tmp.keras")
        assert partial.stat().st_size > 0  # the kill landed inside the write, not after it
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(partial)
        assert not (project / RESUME / written).exists()
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert checkpoint_history(project) == list(range(1, last_done + 1))
    kept = checkpoint_bytes(project, range(1, last_done + 1))

    resumed = run_command(command, project)
    output = resumed.stdout + resumed.stderr
    assert "resuming from" in output and f"epoch {last_done} of {epochs}" in output
    assert checkpoint_history(project) == checkpoint_history(project, CHECKPOINTS) == list(range(1, epochs + 1))
    # Epochs from before the kill are the very bytes written then, in the resume state and the output.
    assert checkpoint_bytes(project, range(1, last_done + 1)) == kept
    assert checkpoint_bytes(project, range(1, last_done + 1), CHECKPOINTS) == kept
    assert not [path.name for path in (project / RESUME).iterdir() if ".tmp" in path.name]
    assert "up to date" in run_command([*DVC, "status"], project).stdout


# Each entry point meets one of the two kills: the entry point only starts the train process, and
# either kill lands at the same point in it whichever started it (a pair of runs fewer per CI run).
@pytest.mark.parametrize(
    ("entry_point", "fault"),
    [
        # Killed after batch 2 of epoch 3 (each epoch has 36 / 8 = 5 batches).
        ("dvc", {"FAULT_AT_BATCH": "3:2"}),
        # Killed halfway through writing checkpoint 3: a half-written temporary file only, never epoch-003.keras.
        ("flow", {"FAULT_MID_WRITE": "epoch-003.keras"}),
    ],
    ids=["dvc-during-an-epoch", "flow-mid-checkpoint-write"],
)
def test_a_run_killed_during_an_epoch_or_mid_checkpoint_write_resumes(project, retrained, entry_point, fault):
    kill_and_resume(project, entry_point, retrained[0] / ".dvc/cache", last_done=2, **fault)


def test_a_train_process_killed_in_epoch_2_resumes_to_the_bytes_of_an_unbroken_run(project, retrained):
    edit_params(project, "train", **RETRAINING)
    train = [sys.executable, "-m", "tasks.train"]
    run_killed(project, train, FAULT_AT_BATCH="2:2")  # SIGKILL after batch 2 of epoch 2
    resumed = run_command(train, project)
    assert "resuming from artifacts/resume/epoch-001.keras (epoch 1 of 3)" in resumed.stderr, resumed.stderr

    def published(root: Path) -> dict[str, bytes]:
        folders = (CHECKPOINTS, Path("artifacts/training"))
        return {str(path.relative_to(root)): path.read_bytes() for f in folders for path in (root / f).iterdir()}

    after_resume, unbroken = published(project), published(retrained[0])  # the same commit and params
    assert sorted(after_resume) == sorted(unbroken) and len(after_resume) == 6
    for name, payload in unbroken.items():  # every file, not only the weights inside them
        assert after_resume[name] == payload, name


def test_kill_between_checkpoint_and_its_history_row(project):
    # Epoch 3's checkpoint has landed; its history row (the 3rd history.csv rename) never does.
    edit_params(project, "train", epochs=3)
    run_killed(project, [*DVC, "repro"], FAULT_AT_RENAME="history.csv", FAULT_AT_COUNT=3)
    assert (project / RESUME / "epoch-003.keras").exists() and checkpoint_history(project) == [1, 2]
    kept = checkpoint_bytes(project, (1, 2))

    resumed = run_command([*DVC, "repro", "train"], project)  # the stages after it add nothing here
    assert "epoch 2 of 3" in resumed.stdout + resumed.stderr  # the row-less epoch 3 is trained again
    history = pd.read_csv(project / CHECKPOINTS / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    for row in history.itertuples():  # every row names its checkpoint's exact bytes
        assert sha256_file(project / CHECKPOINTS / f"epoch-{row.epoch:03d}.keras") == row.sha256
    assert checkpoint_bytes(project, (1, 2), CHECKPOINTS) == kept
    # An epoch from before the kill can still be selected: select_best verifies and copies it.
    for row in history[history["epoch"] <= 2].itertuples():
        destination = project / "chosen" / f"{row.epoch}.keras"
        copy_verified(project / CHECKPOINTS / f"epoch-{row.epoch:03d}.keras", row.sha256, destination)
        assert destination.read_bytes() == kept[row.epoch - 1]


def test_change_of_training_code_or_data_starts_training_over(project):
    # One module stands for all: the fingerprint hashes every file of training_code_files(), which
    # test_dependencies.py holds equal to the train stage's code deps.
    edit_params(project, "train", epochs=3)
    killed = subprocess.run(
        [*DVC, "repro"], cwd=project, env=environment_with_fault(project, FAULT_AT_BATCH="3:1"), capture_output=True
    )
    assert killed.returncode != 0 and checkpoint_history(project) == [1, 2]
    # The killed run's workspace twice over: one change each, from the same resumable state.
    twin = project.parent / "twin"
    shutil.copytree(project, twin, symlinks=True)
    for workspace, change in ((project, "tasks/lib/io.py"), (twin, "split")):
        if change == "split":
            edit_params(workspace, "split", validation_fraction=0.5)
        else:
            with open(workspace / change, "a") as source:
                source.write("\n# changed\n")
        rerun = run_command([*DVC, "repro", "train"], workspace)  # train is the claim; the stages after it add nothing
        assert "resuming from" not in rerun.stdout + rerun.stderr, change
        assert checkpoint_history(workspace) == [1, 2, 3]


def wait_for_epochs(project: Path, count: int, epochs: int, timeout_s: float = 240) -> None:
    """Block until the run training for `epochs` epochs (not an earlier run's leftovers) has done `count`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            current = json.loads((project / RESUME / "fingerprint.json").read_text())["train"]["epochs"] == epochs
            if current and len(checkpoint_history(project)) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass  # not written yet
        time.sleep(0.05)
    pytest.fail(f"training did not complete {count} epochs in {timeout_s} s")


def test_two_flows_at_once_one_refuses_cleanly(project):
    edit_params(project, "train", epochs=6)
    # The first flow holds still for 25 s before landing epoch 2, longer than the second
    # flow needs to start and reach the workspace lock.
    environment = environment_with_fault(project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause", FAULT_PAUSE_S=25)
    first = subprocess.Popen(
        FLOW, cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_epochs(project, 1, epochs=6)
    second = run_command(FLOW, project, check=False)
    first_output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, first_output
    assert second.returncode == 75  # busy: the same run later will work
    assert "another pipeline run or promotion is in progress" in second.stderr + second.stdout
    assert "up to date" in run_command([*DVC, "status"], project).stdout
    yaml.safe_load((project / "dvc.lock").read_text())


def test_dvc_repro_while_flow_trains_refuses_cleanly(project):
    edit_params(project, "train", epochs=6)
    # The flow's training holds still for 20 s before landing epoch 2: the collision is certain.
    environment = environment_with_fault(project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause")
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


def test_flow_started_during_dvc_repro_waits_for_it_then_finds_everything_done(project):
    edit_params(project, "train", epochs=4)
    # `dvc repro` holds DVC's repository lock, and holds still for 10 s before landing epoch 2.
    repro = subprocess.Popen(
        [*DVC, "repro"],
        cwd=project,
        env=environment_with_fault(project, FAULT_AT_RENAME="epoch-002.keras", FAULT="pause", FAULT_PAUSE_S=10),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_epochs(project, 1, epochs=4)
    flow = run_command(FLOW, project, check=False)
    repro_output, _ = repro.communicate(timeout=600)
    assert repro.returncode == 0, repro_output
    assert ran_stages(repro_output) == ["train", "select_best", "evaluate"]
    output = flow.stdout + flow.stderr
    # Documented outcome: the flow finds DVC busy, retries, and then has nothing left to do.
    assert flow.returncode == 0, output
    assert "another DVC process holds" in output and "Retry" in output
    assert "up to date: no stage ran" in output
    assert "up to date" in run_command([*DVC, "status"], project).stdout


def test_dvc_repro_between_two_flow_stages_leaves_the_flow_nothing_to_do(project, tmp_path):
    edit_params(project, "train", epochs=3)
    marker = tmp_path / "flow-paused"
    flow = subprocess.Popen(
        FLOW,
        cwd=project,
        env=environment_with_fault(project, FAULT_BEFORE_STATUS=f"select_best:{marker}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(marker.exists, 300, "the flow to finish train and stop before checking select_best")
    # DVC's repository lock is free between two flow stages: a user's `dvc repro` runs the rest.
    repro = run_command([*DVC, "repro"], project)
    assert ran_stages(repro.stdout) == ["select_best", "evaluate"]
    marker.with_name(marker.name + ".released").touch()
    output, _ = flow.communicate(timeout=300)
    # Documented outcome: the flow completes, finding what `dvc repro` did up to date; one dvc.lock.
    assert flow.returncode == 0, output
    assert "stage train: running" in output
    assert "stage select_best: up to date" in output and "stage evaluate: up to date" in output
    assert "up to date" in run_command([*DVC, "status"], project).stdout
    yaml.safe_load((project / "dvc.lock").read_text())


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
    cached = cache_object(project, hashlib.md5(model.read_bytes()).hexdigest())
    cached.chmod(0o644)
    payload = bytearray(cached.read_bytes())
    payload[-100] ^= 0xFF
    cached.write_bytes(bytes(payload))
    model.unlink()
    run_command([*DVC, "checkout", "--relink", "artifacts/model"], project, check=False)
    result = run_command([sys.executable, "-m", "tasks.evaluate"], project, check=False)
    assert result.returncode == 2
    assert "model.keras: sha256 is" in result.stderr
