"""The HTTP service as a real uvicorn process on a free port: answers, refusals, following prod, kill -9."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tasks.promote import prod_from_refs
from tests.conftest import (
    WEAK_TRAINING,
    edit_params,
    free_port,
    git,
    project_environment,
    run_command,
    seed_run_cache,
    stop_process,
    wait_until,
)
from tests.test_predict import png_header_claiming
from tests.test_promote import GTO, PROMOTE, prod, retrain

SERVE = [sys.executable, "-m", "flows.serve"]
PREDICT = [sys.executable, "-m", "tasks.predict"]
PREDICT_PATH = "/v1/models/cifar10-cnn:predict"


class Service:
    """A `python -m flows.serve` process in `project`, and requests to it."""

    def __init__(self, project: Path, *arguments: str):
        self.project, self.arguments, self.port = project, arguments, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = project.parent / f"serve-{self.port}.log"
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*SERVE, "--port", str(self.port), *self.arguments],
                cwd=self.project,
                env=project_environment(self.project.parent),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self.ready, 120, f"the service to be ready (log: {self.log})")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the service exited {self.process.returncode}:\n{self.log.read_text()}")
        return self.get("/v2/health/ready")[0] == 200

    def request(self, path: str, body: bytes | None = None, content_type: str = "application/json", timeout=60):
        """(status, headers, parsed JSON or text) of one request."""
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, payload = error.code, error.headers, error.read()
        except (OSError, http.client.IncompleteRead):
            return 0, {}, None  # not listening (yet), or cut off mid-answer (the body shorter than its length)
        headers = {name.lower(): value for name, value in headers.items()}
        text = payload.decode()
        is_json = headers.get("content-type", "").startswith("application/json")
        return status, headers, json.loads(text) if is_json else text

    def get(self, path: str):
        return self.request(path)[::2]

    def predict_image(self, payload: bytes, content_type: str = "image/png", query: str = ""):
        return self.request(PREDICT_PATH + query, payload, content_type)

    def predict_instances(self, images: np.ndarray):
        return self.request(PREDICT_PATH, json.dumps({"instances": images.tolist()}).encode())

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics, read with Prometheus' own parser (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics")[1]):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def service_factory():
    started = []

    def start(project: Path, *arguments: str) -> Service:
        started.append(Service(project, *arguments))
        return started[-1]

    yield start
    for service in started:
        service.stop()


def test_answers_equal_tasks_predict_for_images_and_instances_sent_at_once(project, service_factory):
    files = sorted((project / "source/test").rglob("*.png"))
    run_command([*PREDICT, "source/test", "--out", "expected.csv"], project)
    expected = pd.read_csv(project / "expected.csv").set_index("path")
    expected.index = [str(Path(path)) for path in expected.index]
    service = service_factory(project, "--model", "workspace", "--window-ms", "50")
    status, model = service.get("/v1/models/cifar10-cnn")
    assert status == 200 and model["version"] == "workspace" and model["reference_profile"]
    jpeg = io.BytesIO()
    Image.open(files[0]).save(jpeg, format="JPEG", quality=95)

    def ask(index: int):
        file = files[index % len(files)]
        if index % 3 == 0:  # JSON instances, two images at a time
            pixels = np.stack([np.asarray(Image.open(file)), np.asarray(Image.open(file))])
            return [str(file.relative_to(project))] * 2, service.predict_instances(pixels)
        return [str(file.relative_to(project))], service.predict_image(file.read_bytes())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(3 * len(files))))
    columns = [column for column in expected.columns if column != "predicted"]
    for names, (status, headers, body) in answers:
        assert status == 200, body
        assert headers["x-model-sha256"] == model["sha256"] == body["model"]["sha256"]
        for name, prediction in zip(names, body["predictions"], strict=True):
            row = expected.loc[name]
            assert prediction["predicted"] == row["predicted"]
            assert [prediction[column] for column in columns] == row[columns].tolist()
    # Eight clients at once, a 50 ms window: the requests shared model calls.
    calls, images = service.metric("cifar10_batch_images_count"), service.metric("cifar10_batch_images_sum")
    assert images == sum(len(names) for names, _ in answers)  # the warm-up's calls are not counted
    assert calls < len(answers) / 2, (calls, len(answers))
    assert service.metric("cifar10_model_info", version="workspace", sha256=model["sha256"]) == 1
    status, _, body = service.predict_image(jpeg.getvalue(), "image/jpeg")
    assert status == 200 and body["predictions"][0]["predicted"] in expected["predicted"].tolist()


def test_every_bad_request_gets_its_status_and_one_line_and_the_next_good_one_is_answered(project, service_factory):
    edit_params(project, "predict", max_file_bytes=100_000)
    service = service_factory(project, "--model", "workspace")
    good = (project / "source/test/circle/0000.png").read_bytes()
    big = io.BytesIO()
    Image.open(project / "source/test/circle/0000.png").resize((64, 48)).convert("RGBA").save(big, format="PNG")
    cases = [
        (service.predict_image(b"not an image at all"), 400, "request body: cannot decode image"),
        (service.predict_image(good[: len(good) // 2]), 400, "request body: cannot decode image"),
        (service.predict_image(big.getvalue()), 400, "image mode is RGBA, expected RGB (add ?resize=true"),
        (service.predict_image(png_header_claiming(20000, 20000)), 413, "decompression bomb"),
        (service.predict_image(png_header_claiming(32, 600_000)), 413, "claims 32x600000 pixels"),
        (service.predict_image(os.urandom(200_000)), 413, "200,000 bytes, more than the 100,000 allowed"),
        (service.request(PREDICT_PATH, b'{"instances": [[1, 2'), 400, "malformed JSON"),
        (service.request(PREDICT_PATH, b'{"inputs": []}'), 400, 'expected {"instances": [...]}'),
        (service.predict_instances(np.zeros((1, 16, 16, 3))), 400, "shape 32x32x3 (height, width, RGB), got 16x16x3"),
        (service.request(PREDICT_PATH, b'{"instances": [[[1, 2]], [3]]}'), 400, "ragged or non-numeric"),
        (service.predict_instances(np.full((1, 32, 32, 3), 256)), 400, "whole numbers from 0 to 255"),
        (service.predict_instances(np.full((1, 32, 32, 3), 0.5)), 400, "whole numbers from 0 to 255"),
        (service.request(PREDICT_PATH, good, "text/plain"), 415, "expected application/json, image/png or image/jpeg"),
    ]
    for (status, _, body), expected_status, message in cases:
        assert status == expected_status, (message, body)
        assert message in body["error"] and "\n" not in body["error"], body
    status, _, body = service.predict_image(big.getvalue(), query="?resize=true")
    assert status == 200 and body["predictions"][0]["predicted"] == "circle"
    status, _, body = service.predict_image(good)
    assert status == 200 and body["predictions"][0]["predicted"] == "circle"
    assert service.metric("cifar10_request_errors_total", reason="decompression_bomb") == 2
    assert service.metric("cifar10_request_errors_total", reason="too_large") == 1
    assert service.metric("cifar10_requests_total", route="predict", status="200") == 2


@pytest.mark.long_running
def test_prod_follows_promotions_and_rollbacks_with_requests_in_flight_and_survives_kill_9(
    registry_project, weak_run_cache, service_factory, tmp_path
):
    project = registry_project
    edit_params(project, "serve", poll_s=0.5, drift_window=200)
    git(project, "commit", "-qam", "serve: poll fast")
    seed_run_cache(project, weak_run_cache)
    retrain(project, **WEAK_TRAINING)  # a weak first champion, from DVC's run cache
    run_command(PROMOTE, project)
    service = service_factory(project, "--model", "prod")
    assert service.get("/v1/models/cifar10-cnn")[1]["version"] == "v0.1.0"
    image = (project / "source/test/cross/0000.png").read_bytes()
    seen, failures, stop = [[] for _ in range(2)], [], threading.Event()

    def client(answered: list):
        while not stop.is_set():
            status, headers, body = service.predict_image(image)
            (answered if status == 200 else failures).append(headers.get("x-model-version", body))
            # About 20 requests a second per client: requests arriving all through each switch, and
            # the CPU left to the retraining and promotions the service must follow.
            stop.wait(0.05)

    clients = [threading.Thread(target=client, args=(answered,)) for answered in seen]
    for thread in clients:
        thread.start()
    try:
        retrain(project, learning_rate=0.001, epochs=2)  # the tiny recipe as committed: far better
        run_command(PROMOTE, project)
        assert prod(project)["version"] == "v0.2.0"
        wait_until(lambda: all(answered[-1] == "v0.2.0" for answered in seen), 60, "answers from v0.2.0")
        run_command([*PROMOTE, "--rollback", "--reason", "checking the service follows"], project)
        # Every client, not the first alone: one still waiting on its last answer has not seen the switch.
        wait_until(
            lambda: all(answered[-1] == "v0.1.0" for answered in seen), 60, "answers from v0.1.0 after the rollback"
        )
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert not failures, failures[:3]
    for answered in seen:  # each client saw v0.1.0, then v0.2.0, then v0.1.0 again: one switch each way
        changes = [answered[0]] + [now for before, now in itertools.pairwise(answered) if now != before]
        assert changes == ["v0.1.0", "v0.2.0", "v0.1.0"], changes
    assert service.metric("cifar10_model_switches_total") == 2
    v1_sha = git(project, "show", "cifar10-cnn/v0.1.0:artifacts/promotion/decision.json")
    assert service.metric("cifar10_model_info", version="v0.1.0", sha256=json.loads(v1_sha)["challenger"]["sha256"])
    # The served images were watched: windows of 200 compared with v0.1.0's reference profile.
    status, drift = service.get("/v1/models/cifar10-cnn/drift")
    assert status == 200 and drift["window"] == 200
    assert service.metric("cifar10_drift_windows_total", verdict="drift") >= 1  # one image, over and over
    # The registry read without a single ref written: the same prod as gto's, from ls-remote alone.
    listing = run_command(["git", "ls-remote", "--tags", "origin"], project).stdout
    assert prod_from_refs(listing)[0] == prod(project)["version"] == "v0.1.0"
    # kill -9 in the middle of requests; a restart is ready again and serves the same version.
    in_flight = concurrent.futures.ThreadPoolExecutor(4)
    answers = [in_flight.submit(service.predict_image, image) for _ in range(40)]
    time.sleep(0.05)
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait(timeout=10)
    statuses = {answer.result()[0] for answer in answers}
    in_flight.shutdown()
    assert statuses <= {200, 0}, statuses  # answered, or cut off with the process: nothing half-written
    service.start()
    status, headers, _ = service.predict_image(image)
    assert status == 200 and headers["x-model-version"] == "v0.1.0"
    assert "serving cifar10-cnn v0.1.0" in service.log.read_text()
    # From another clone, prod moves to a version whose model no DVC cache or remote holds: the
    # service keeps answering with v0.1.0, says why it cannot switch, and counts the failure.
    broken_version(tmp_path / "shared.git", tmp_path / "colleague")
    wait_until(lambda: service.metric("cifar10_model_load_failures_total") >= 1, 60, "a failed load")
    status, headers, _ = service.predict_image(image)
    assert status == 200 and headers["x-model-version"] == "v0.1.0"
    assert service.get("/v1/models/cifar10-cnn")[1]["load_error"]
    assert "cannot load the model" in service.log.read_text() and "still serving v0.1.0" in service.log.read_text()


def broken_version(bare: Path, clone: Path) -> None:
    """Register v0.9.0, whose dvc.lock names a model folder no cache holds, and assign it to prod, in `bare`."""
    run_command(["git", "clone", "--quiet", str(bare), str(clone)], bare.parent)
    git(clone, "config", "user.name", "A Colleague")
    git(clone, "config", "user.email", "colleague@example.com")
    lock = clone / "dvc.lock"
    model = next(
        out
        for out in yaml.safe_load(lock.read_text())["stages"]["select_best"]["outs"]
        if out["path"].endswith("model")
    )
    lock.write_text(lock.read_text().replace(model["md5"], "0" * 32 + ".dir"))
    git(clone, "checkout", "-q", "-b", "cifar10-cnn/v0.9.0")
    git(clone, "commit", "-qam", "a model no cache holds")
    run_command([*GTO, "register", "cifar10-cnn", "HEAD", "--version", "v0.9.0"], clone)
    run_command([*GTO, "assign", "cifar10-cnn", "--version", "v0.9.0", "--stage", "prod"], clone)
    git(clone, "push", "--quiet", "--atomic", "origin", "cifar10-cnn/v0.9.0", "--tags")
