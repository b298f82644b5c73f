"""Shared fixtures: a tiny learnable image-folder dataset and per-test params and projects."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.lib.params import TUTORIAL_TRAIN

ROOT = Path(__file__).resolve().parent.parent
CLASS_NAMES = ("circle", "cross", "square", "stripes")
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 4
DVC = [sys.executable, "-m", "dvc"]
FLOW = [sys.executable, "-m", "flows.pipeline"]
PROJECT_FILES = ("tasks", "flows", "review", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore")


def class_template(label: int, size: int = 32) -> np.ndarray:
    """A distinct, easy pattern per class so a tiny model can learn it in a few epochs."""
    grid_y, grid_x = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    shapes = (
        (grid_x - centre) ** 2 + (grid_y - centre) ** 2 < (size / 3) ** 2,
        (np.abs(grid_x - centre) < 3) | (np.abs(grid_y - centre) < 3),
        (np.abs(grid_x - centre) < size / 4) & (np.abs(grid_y - centre) < size / 4),
        (grid_x // 4) % 2 == 0,
    )
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[shapes[label]] = (200, 60 + 40 * label, 255 - 50 * label)
    return image


def make_images(count: int, label: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` noisy copies of the class template."""
    noise = rng.integers(0, 40, size=(count, 32, 32, 3))
    return [np.clip(class_template(label).astype(int) + item, 0, 255).astype(np.uint8) for item in noise]


def write_image_folder(root: Path, *, image_format: str = "PNG", seed: int = 0) -> Path:
    """Write train/<class>/NNN.png and test/<class>/NNN.png, as the real loader reads them."""
    rng = np.random.default_rng(seed)
    suffix = ".png" if image_format == "PNG" else ".jpg"
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, pixels in enumerate(make_images(count, label, rng)):
                Image.fromarray(pixels).save(folder / f"{index:04d}{suffix}", format=image_format)
    return root


def make_read_only(root: Path) -> None:
    """Make a tree read-only so any code that writes into its inputs fails."""
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)


def cifar10_batch(labels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Records in the official layout: a label byte then the red, green and blue planes."""
    planes = rng.integers(0, 256, size=(labels.size, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None].astype(np.uint8), planes.reshape(labels.size, -1)], axis=1)
    return records.tobytes(), planes.transpose(0, 2, 3, 1)


def build_cifar10_archive(
    path: Path,
    records_per_batch: int = 20,
    seed: int = 0,
    *,
    corrupt_member: str | None = None,
    bad_label: int | None = None,
) -> dict:
    """A small .tar.gz in the official binary layout; returns the expected arrays."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {"x_train": [], "y_train": []}
    members: dict[str, bytes] = {"batches.meta.txt": "\n".join(f"class{i}" for i in range(10)).encode() + b"\n\n"}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(records_per_batch) % 10
        if bad_label is not None and name == "data_batch_1.bin":
            labels[0] = bad_label
        payload, images = cifar10_batch(labels, rng)
        if name == corrupt_member:
            payload = payload[:-7]
        members[name] = payload
        split = "test" if name == "test_batch.bin" else "train"
        if split == "train":
            expected["x_train"].append(images)
            expected["y_train"].append(labels)
        else:
            expected["x_test"], expected["y_test"] = images, labels
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    expected["x_train"] = np.concatenate(expected["x_train"])
    expected["y_train"] = np.concatenate(expected["y_train"])
    return expected


def cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (theirs, and their waited-for children's)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """With CIFAR10_TEST_CPU_LOG set, append a JSON line there per test: its CPU and wall seconds.

    The CPU is the test's own and that of the processes it started and waited for. A process
    counts when it is reaped: the shared Prefect server, which the run stops after its last
    test, towards none. bench.ci_time reads the log.
    """
    log = os.environ.get("CIFAR10_TEST_CPU_LOG")
    if not log:
        yield
        return
    cpu_before, start = cpu_seconds(), time.monotonic()
    yield
    record = {"test": item.nodeid, "cpu_s": round(cpu_seconds() - cpu_before, 2)}
    record["wall_s"] = round(time.monotonic() - start, 2)
    with open(log, "a") as output:  # one append per line: workers share the file
        output.write(json.dumps(record) + "\n")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the long-running tests first: at the end of a run with several workers, one would run alone."""
    items.sort(key=lambda item: item.get_closest_marker("long_running") is None)  # a stable sort


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A read-only image-folder dataset: 4 classes, 12 train and 4 test images each (64 in all)."""
    root = write_image_folder(tmp_path_factory.mktemp("dataset") / "images")
    make_read_only(root)
    return root


def small_params(raw: dict, root: Path, source: Path) -> dict:
    """The project's params with every path under `root` and a tiny training profile."""
    raw = yaml.safe_load(yaml.safe_dump(raw))
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    raw["ingest"].update(source=str(source), sha256=None, url=None, max_per_class=None)
    raw["split"]["validation_fraction"] = 0.25
    # The tutorial's recipe at toy size: the machinery under test, not the speed recipe (test_train has that).
    raw["train"] = {**TUTORIAL_TRAIN, "epochs": 2, "batch_size": 8}
    return raw


@pytest.fixture
def params_path(tmp_path, image_folder) -> Path:
    """A per-test copy of params.yaml pointed into tmp_path and at the synthetic dataset."""
    raw = small_params(yaml.safe_load((ROOT / "params.yaml").read_text()), tmp_path / "work", image_folder)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def split_params(params_path) -> Path:
    """`params_path` after ingest, preprocess and split have run in this process: ready to train."""
    from tasks import ingest, preprocess, split
    from tasks.lib.params import load_params

    params = load_params(params_path)
    for module in (ingest, preprocess, split):
        module.run(params)
    return params_path


def project_environment(home: Path) -> dict[str, str]:
    """Environment for subprocesses: this interpreter first on PATH, Prefect and DVC kept offline and local."""
    environment = dict(os.environ)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    environment.update(
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    return environment


def run_command(
    command: list[str], cwd: Path, *, check: bool = True, timeout: float = 600, environment: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command in a project, failing the test with its output when `check` and it fails."""
    result = subprocess.run(
        command,
        cwd=cwd,
        env=environment or project_environment(cwd.parent),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def create_project(destination: Path, source: Path) -> Path:
    """A fresh git + DVC project holding this repo's pipeline code and small params reading `source`."""
    destination.mkdir(parents=True)
    for name in PROJECT_FILES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, destination / name)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = small_params(raw, Path("."), Path("source"))
    raw["paths"] = {key: str(Path(value)) for key, value in raw["paths"].items()}
    (destination / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(source, destination / "source")
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "baseline"],
    ):
        run_command(command, destination)
    return destination


@pytest.fixture(scope="session")
def pristine(tmp_path_factory, image_folder) -> Path:
    """A committed project that has never run."""
    return create_project(tmp_path_factory.mktemp("pristine") / "project", image_folder)


def run_folder(tmp_path_factory) -> Path:
    """The test run's temporary folder: above each pytest-xdist worker's own, where the workers share things."""
    basetemp = tmp_path_factory.getbasetemp()
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test run, shared by every pytest-xdist worker: the first builds, the rest wait."""
    shared = run_folder(tmp_path_factory)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died mid-build
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, pristine) -> tuple[Path, str]:
    """The pristine project after one full `dvc repro`, with its output: built once for all workers."""

    def build(folder: Path) -> None:
        project = folder / "project"
        shutil.copytree(pristine, project, symlinks=True)
        result = run_command([sys.executable, "-m", "dvc", "repro"], project)
        run_command(["git", "add", "-A"], project)
        run_command(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "first run"], project)
        (folder / "repro.log").write_text(result.stdout)

    folder = built_once(tmp_path_factory, "reproduced", build)
    return folder / "project", (folder / "repro.log").read_text()


@pytest.fixture
def project(tmp_path, reproduced) -> Path:
    """A private copy of the reproduced project for a test to change."""
    copy = tmp_path / "project"
    shutil.copytree(reproduced[0], copy, symlinks=True)
    return copy


# The change the `retrained` fixture makes to the reproduced project's tiny recipe (2 epochs).
RETRAINING = {"epochs": 3}


@pytest.fixture(scope="session")
def retrained(tmp_path_factory, reproduced) -> tuple[Path, dict, str]:
    """The reproduced project after RETRAINING (`train.epochs` 2 -> 3) and `dvc repro`, uncommitted: built once.

    (project, `dvc status --json` before the rerun, the rerun's output): one run for the tests
    that each made this very change and rerun.
    """

    def build(folder: Path) -> None:
        project = folder / "project"
        shutil.copytree(reproduced[0], project, symlinks=True)
        edit_params(project, "train", **RETRAINING)
        (folder / "status.json").write_text(run_command([*DVC, "status", "--json"], project).stdout)
        (folder / "repro.log").write_text(run_command([*DVC, "repro"], project).stdout)

    folder = built_once(tmp_path_factory, "retrained", build)
    status = json.loads((folder / "status.json").read_text())
    return folder / "project", status, (folder / "repro.log").read_text()


# A model far worse than the committed tiny recipe's: the challenger the promotion gate must refuse.
WEAK_TRAINING = {"learning_rate": 1e-7, "epochs": 1}


@pytest.fixture(scope="session")
def weak_run_cache(tmp_path_factory, reproduced) -> Path:
    """A DVC cache with the reproduced project's runs and its rerun at WEAK_TRAINING: built once for all workers."""

    def build(folder: Path) -> None:
        project = folder / "project"
        shutil.copytree(reproduced[0], project, symlinks=True)
        edit_params(project, "train", **WEAK_TRAINING)
        run_command([*DVC, "repro"], project)

    return built_once(tmp_path_factory, "weak-run", build) / "project/.dvc/cache"


def seed_run_cache(project: Path, cache: Path, *, except_stage: str | None = None) -> None:
    """Add a DVC cache's objects and run-cache entries to the project's, so that its `dvc repro` restores those runs.

    The runs of `except_stage` are left out: that stage runs, and the stages after it restore
    theirs where its outputs are the same bytes as in `cache`.
    """
    left_out = f"python -m tasks.{except_stage}"
    for source in (path for path in cache.rglob("*") if path.is_file()):
        relative = source.relative_to(cache)
        destination = project / ".dvc/cache" / relative
        if destination.exists():  # the same bytes: objects are named by their hash, runs by their key
            continue
        if except_stage and relative.parts[0] == "runs" and yaml.safe_load(source.read_text())["cmd"] == left_out:
            continue  # nor its folder: DVC takes a run's folder without a run in it for a broken cache
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


@pytest.fixture
def retrained_project(tmp_path, retrained) -> Path:
    """A private copy of the retrained project for a test to change."""
    copy = tmp_path / "retrained"
    shutil.copytree(retrained[0], copy, symlinks=True)
    return copy


def edit_params(project: Path, section: str, **changes) -> None:
    """Change keys of one params.yaml section in a project."""
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw[section].update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def ran_stages(output: str) -> list[str]:
    """Stage names in the order `dvc repro` ran them."""
    return re.findall(r"Running stage '([a-z_]+)'", output)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers; assert the whole group is gone."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Its children got the signal too, and may need a moment more than the leader (a `dvc get`).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"process group {process.pid} still has processes 10 s after its leader was stopped")


def on_a_small_disk(script: str, size_kib: int, disk: Path) -> dict:
    """Run a Python `script` with a fresh `size_kib` KiB tmpfs mounted at `disk` (its argv[1]); its JSON line.

    The mount lives in a private mount namespace (`unshare`, as root or as a user), so it is
    gone with the process: the writes under test meet a real full filesystem, mid-file.
    """
    disk.mkdir(parents=True, exist_ok=True)
    mount_then_run = 'mount -t tmpfs -o size="$0"k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount_then_run]
    result = subprocess.run(
        [*command, str(size_kib), str(disk), sys.executable, script],
        env=os.environ | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll `predicate` until it returns something truthy (returned), or fail the test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def prefect_healthy(api_url: str) -> bool:
    """Whether a Prefect API answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_prefect_server(home: Path, port: int) -> subprocess.Popen:
    """A real `prefect server` (SQLite under `home`) on 127.0.0.1:`port`, answering its health check."""
    environment = project_environment(home) | {
        "PREFECT_SERVER_UI_ENABLED": "false",
        # Let a queued deployment run take its slot seconds after the running one ends (default 30 s).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
        # As pyproject.toml sets it for a server started from the project root: leases survive a restart.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    }
    # Loop services no test relies on (tests start their runs themselves; none waits for 03:00, a
    # pause or a work pool): a third of an idle server's CPU, 8 CPU-seconds of a CI run's shared server.
    # Repossessor (leases), triggers (the zombie automation), events and task runs stay on.
    for service in ("SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "FOREMAN"):
        environment[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=home,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: prefect_healthy(api_url), 120, "the Prefect server to answer /api/health")
    except BaseException:
        stop_process(server)
        raise
    return server


PREFECT_SERVER = "prefect-server"  # its folder in the run's: SQLite database, home, and server.json
_started_servers: list[subprocess.Popen] = []  # referenced, so no garbage collection warns about a live child


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server (SQLite, 127.0.0.1) that the run's flow runs report to, shared by every worker.

    Without it every flow run starts Prefect's temporary server (~15 s on 2 cores); one server per
    pytest-xdist worker cost each its start-up and idle loops, about 30 CPU-seconds a CI run. The
    first worker to ask starts it; pytest_sessionfinish stops it, and checks it gone, once all are done.
    """

    def start(folder: Path) -> None:
        folder.mkdir()
        port = free_port()
        _started_servers.append(start_prefect_server(folder, port))
        record = {"pid": _started_servers[-1].pid, "api_url": f"http://127.0.0.1:{port}/api"}
        (folder / "server.json").write_text(json.dumps(record))

    api_url = json.loads((built_once(tmp_path_factory, PREFECT_SERVER, start) / "server.json").read_text())["api_url"]
    os.environ["PREFECT_API_URL"] = api_url  # inherited by every subprocess the tests start
    try:
        yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def group_states(group: int) -> dict[int, str]:
    """{pid: state letter} of the processes of process group `group`, from /proc ("Z": a zombie)."""
    states = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(process_group) == group:
            states[int(stat.parent.name)] = state
    return states


def group_running(group: int) -> bool:
    """Whether a process of process group `group` still runs (a zombie, only waiting to be reaped, does not)."""
    return any(state != "Z" for state in group_states(group).values())


def stop_process_group(group: int, timeout_s: float = 30) -> None:
    """SIGTERM a process group (its leader need not be our child), SIGKILL it if it lingers; raise if it stays."""
    for signal_number, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal_number)
        deadline = time.monotonic() + wait_s
        while group_running(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_running(group):
            return
    raise RuntimeError(f"process group {group} still runs after SIGKILL")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On the run's main process, after every worker is done: stop the shared Prefect server if one was started."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: others may still need the server
        return
    # The tmp_path_factory of the main process (pytest-xdist reads it too, to place the workers' folders).
    record = run_folder(session.config._tmp_path_factory) / PREFECT_SERVER / "server.json"
    if record.exists():
        stop_process_group(json.loads(record.read_text())["pid"])


def track_zip_source(project: Path) -> bytes:
    """Zip the project's images, track the zip with `dvc add` as ingest's pinned source, run and commit."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(project / "images.zip", "w") as archive:
        for path in sorted((project / "source").rglob("*.png")):
            archive.write(path, path.relative_to(project / "source").as_posix())
    payload = (project / "images.zip").read_bytes()
    run_command([*DVC, "add", "images.zip"], project)
    edit_params(project, "ingest", source="images.zip", sha256=hashlib.sha256(payload).hexdigest())
    run_command([*DVC, "repro"], project)
    run_command(["git", "add", "-A"], project)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "tracked zip source"], project)
    return payload


def cache_object(project: Path, md5: str) -> Path:
    """Where the project's DVC cache (the default, .dvc/cache) keeps the object with this md5."""
    return project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def flip_a_byte(path: Path) -> None:
    """Corrupt one byte in the middle of a file (replacing it, never writing through a cache link)."""
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(payload))


# ---- the registry: a bare repository as the team's shared remote (promote, serve) ----


def git(project: Path, *arguments: str) -> str:
    return run_command(["git", *arguments], project).stdout.strip()


def shared_remote(project: Path, bare: Path) -> Path:
    """A new bare repository as the project's `origin`, holding its branch: the registry's home."""
    run_command(["git", "init", "--quiet", "--bare", str(bare)], project.parent)
    if "origin" in git(project, "remote").split():
        git(project, "remote", "remove", "origin")
    git(project, "remote", "add", "origin", str(bare))
    git(project, "push", "--quiet", "origin", "HEAD")
    return bare


@pytest.fixture
def registry_project(project, tmp_path):
    """The reproduced tiny project with a git identity, a local DVC remote and a bare git remote, as promotion needs."""
    git(project, "config", "user.name", "Pipeline Test")
    git(project, "config", "user.email", "pipeline@example.com")
    run_command([*DVC, "remote", "add", "-d", "store", str(tmp_path / "dvc-remote")], project)
    git(project, "commit", "-qam", "DVC remote")
    shared_remote(project, tmp_path / "shared.git")
    return project
