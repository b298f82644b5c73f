"""Serve: the registry's prod model over HTTP, in TF Serving's REST shape, following prod as it moves.

    python -m flows.serve [--host 127.0.0.1] [--port 8000] [--model prod|workspace|REV]

    POST /v1/models/cifar10-cnn:predict   {"instances": [32x32x3 uint8 arrays]}, or one PNG/JPEG
                                          (Content-Type image/png, image/jpeg; ?resize=true converts)
    GET  /v1/models/cifar10-cnn           the model served (version, sha256, revision)
    GET  /v1/models/cifar10-cnn/drift     the last window's drift report
    GET  /v2/health/live, /v2/health/ready, /metrics (Prometheus), / (a page for people)

Concurrent requests are grouped into one model call (params `serve`: window_ms, max_batch). With
--model prod the service asks the registry's remote where prod is every serve.poll_s seconds;
when it has moved (a promotion or a rollback from any clone), the new version is fetched through
DVC, its sha256 checked, loaded in safe mode and warmed up, then swapped in between two batches:
no request is dropped, and a version that cannot load leaves the old one serving. Bad requests
get a 4xx and one line saying what was wrong; no request stops the service.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations from here

from tasks.ingest import decode_image
from tasks.lib.cli import filter_native_stderr
from tasks.lib.drift import DriftReport, batch_features, compare, concatenate_features
from tasks.lib.io import DataError
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import Params, load_params
from tasks.predict import Predictor, load_predictor_model, resolve_model
from tasks.promote import ARTIFACT, prod_from_refs, registry_listing

log = logging.getLogger("flows.serve")

PREDICT_PATH = f"/v1/models/{ARTIFACT}:predict"
IMAGE_TYPES = ("image/png", "image/jpeg")
PAGE = Path(__file__).with_name("serve_page.html")


class RequestError(ValueError):
    """A request the service cannot answer: its HTTP status, the metrics' reason, and one line why."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass
class Served:
    """One loaded model: what answers requests until the next switch."""

    version: str  # the registry's version (v0.2.0), or workspace / the revision given
    revision: str  # the git commit it was loaded from ("" for the workspace)
    sha256: str
    class_names: list[str]
    image_size: int
    model: object  # Keras, with the embeddings as a second output
    profile: dict | None

    def describe(self) -> dict:
        """Version, sha256 and revision, as the body and /v1/models say them."""
        return {"name": ARTIFACT, "version": self.version, "sha256": self.sha256, "revision": self.revision}


# ---- the registry, read without writing a ref: a promotion in this clone is never disturbed ----


def registry_prod(root: Path, remote: str) -> tuple[str, str] | None:
    """Where the remote's registry has prod now: (version, commit), or None (a DataError when git cannot say)."""
    return prod_from_refs(registry_listing(root, remote))


def fetch_version(root: Path, remote: str, version: str) -> None:
    """Bring the version's promotion branch into remote-tracking refs: its commit, for DVC to read."""
    fetched = subprocess.run(
        [
            "git",
            "fetch",
            "--quiet",
            "--no-tags",
            remote,
            f"+refs/heads/{ARTIFACT}/{version}:refs/remotes/{remote}/{ARTIFACT}/{version}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if fetched.returncode != 0:
        raise DataError(f"fetching {ARTIFACT}/{version} from {remote!r}: {fetched.stderr.strip()}")


def load_served(choice: str, version: str, params: Params, root: Path) -> Served:
    """Fetch, check, load and warm up the model `choice` names (workspace or a revision)."""
    with resolve_model(choice, params, root) as predictor:
        model = load_predictor_model(predictor)
        served = served_from(predictor, model, version, "" if choice == "workspace" else choice)
    # Traced before the first request: every call has the one shape (tasks.lib.model.INFERENCE_BATCH).
    predict_batch(served, np.zeros((1, served.image_size, served.image_size, 3), np.uint8))
    return served


def served_from(predictor: Predictor, model, version: str, revision: str) -> Served:
    """A Served from a resolved predictor and its loaded model."""
    return Served(
        version, revision, predictor.sha256, predictor.class_names, predictor.image_size, model, predictor.profile
    )


def predict_batch(served: Served, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, embeddings) for a batch of uint8 images."""
    from tasks.lib.model import predict_with_embeddings

    return predict_with_embeddings(served.model, images)


# ---- metrics ----


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cifar10_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.errors = Counter(
            "cifar10_request_errors", "Requests refused, by reason", ["reason"], registry=self.registry
        )
        self.latency = Histogram(
            "cifar10_request_seconds",
            "Time to answer a predict request",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "cifar10_batch_images",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.images = Counter("cifar10_images_predicted", "Images predicted", registry=self.registry)
        self.model_info = Gauge(
            "cifar10_model_info", "The model served (1)", ["version", "sha256"], registry=self.registry
        )
        self.switches = Counter("cifar10_model_switches", "Switches to a new version", registry=self.registry)
        self.load_failures = Counter(
            "cifar10_model_load_failures", "Versions that could not be loaded", registry=self.registry
        )
        self.drift_score = Gauge(
            "cifar10_drift_score",
            "Last window's drift score (PSI; class_mix: p-value)",
            ["feature"],
            registry=self.registry,
        )
        self.drift_detected = Gauge("cifar10_drift_detected", "1 when the last window drifted", registry=self.registry)
        self.drift_windows = Counter(
            "cifar10_drift_windows", "Windows compared, by verdict", ["verdict"], registry=self.registry
        )

    def serving(self, served: Served) -> None:
        """Show `served` as the one model in cifar10_model_info."""
        self.model_info.clear()
        self.model_info.labels(version=served.version, sha256=served.sha256).set(1)

    def drift(self, report: DriftReport) -> None:
        """Publish a window's drift report."""
        for feature, score in report.scores.items():
            self.drift_score.labels(feature=feature).set(score)
        self.drift_detected.set(1 if report.drifted else 0)
        self.drift_windows.labels(verdict="drift" if report.drifted else "no drift").inc()


# ---- the service's state: the model, the batcher, the drift window ----


@dataclass
class Pending:
    images: np.ndarray
    future: asyncio.Future


@dataclass
class Service:
    params: Params
    root: Path
    choice: str  # prod, workspace or a revision
    max_batch: int
    window_s: float
    metrics: Metrics = field(default_factory=Metrics)
    served: Served | None = None
    drift_report: DriftReport | None = None
    load_error: str = ""
    _window: list = field(default_factory=list)
    _queue: asyncio.Queue | None = None
    _arriving: int = 0  # predict requests being read or decoded: they may join the batch being formed
    _stop: threading.Event = field(default_factory=threading.Event)
    # One thread runs the model: Keras calls in order, the event loop free for requests meanwhile.
    _executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    )

    # The model, loaded then kept current.

    def load_first(self) -> None:
        """Load the model to serve; with prod, then follow the registry until the service stops."""
        while not self._stop.is_set():
            try:
                self.switch_if_moved()
            except Exception as error:  # a bad version or an offline remote must not kill the service
                self.report_load_failure(error)
            if self.served is not None and self.choice != "prod":
                return
            self._stop.wait(self.params.serve.poll_s if self.served is not None else 1.0)

    def switch_if_moved(self) -> None:
        """Load the version to serve if it is not the one served; swap it in once warmed up."""
        if self.choice != "prod":
            version = self.choice
            revision = self.choice
        else:
            where = registry_prod(self.root, self.params.promote.remote)
            if where is None:
                raise DataError(f"no version of {ARTIFACT} is in prod yet (python -m tasks.promote)")
            version, revision = where
            if self.served is not None and (self.served.version, self.served.revision) == where:
                return
            fetch_version(self.root, self.params.promote.remote, version)
        started = time.perf_counter()
        loaded = load_served(revision, version, self.params, self.root)
        previous, self.served = self.served, loaded  # one assignment: the next batch uses the new model
        self.load_error = ""
        self._window = []
        self.metrics.serving(loaded)
        if previous is None:
            log.info(
                "serving %s %s (sha256 %s), ready in %.1f s",
                ARTIFACT,
                loaded.version,
                loaded.sha256[:12],
                time.perf_counter() - started,
            )
        else:
            self.metrics.switches.inc()
            log.info(
                "prod moved: switched from %s to %s (sha256 %s), loaded in %.1f s",
                previous.version,
                loaded.version,
                loaded.sha256[:12],
                time.perf_counter() - started,
            )

    def report_load_failure(self, error: Exception) -> None:
        """Log why a version did not load, once per distinct reason; the old model keeps serving."""
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if message != self.load_error:
            keeping = f"; still serving {self.served.version}" if self.served else ""
            log.error("cannot load the model: %s%s", message, keeping)
        self.load_error = message
        self.metrics.load_failures.inc()

    # The batcher.

    async def predict(self, images: np.ndarray) -> tuple[Served, np.ndarray]:
        """Probabilities for `images`, computed in one model call with whatever else is waiting."""
        if self.served is None:
            raise RequestError(503, "not_ready", not_ready_message(self.load_error))
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Pending(images, future))
        return await future

    async def batch_forever(self) -> None:
        """Group waiting requests into model calls, for as long as the service runs.

        A batch closes when it holds max_batch images, when its first request has waited window_ms,
        or when no other request is queued or being read: a lone client never waits for company.
        """
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            count, deadline = len(group[0].images), loop.time() + self.window_s
            while count < self.max_batch and (remaining := deadline - loop.time()) > 0:
                if self._queue.empty() and not self._arriving:
                    break  # nobody else is on the way: waiting would only add latency
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
                group.append(item)
                count += len(item.images)
            served = self.served  # the whole group on one version, even if a switch lands meanwhile
            images = np.concatenate([item.images for item in group])
            try:
                probabilities, _ = await loop.run_in_executor(self._executor, self.run_model, served, images)
            except Exception as error:
                log.exception("the model failed on a batch of %d images", len(images))
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(RequestError(500, "model_error", f"the model failed: {error}"))
                continue
            start = 0
            for item in group:
                end = start + len(item.images)
                if not item.future.done():  # a client that hung up has a cancelled future
                    item.future.set_result((served, probabilities[start:end]))
                start = end

    def run_model(self, served: Served, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One model call (in the model thread), counted, with its images added to the drift window."""
        probabilities, embeddings = predict_batch(served, images)
        self.metrics.batch_images.observe(len(images))
        self.metrics.images.inc(len(images))
        if served.profile is not None and served is self.served:
            self._window.append(batch_features(served.profile, images, probabilities, embeddings))
            if sum(len(part["predicted"]) for part in self._window) >= self.params.serve.drift_window:
                report = compare(served.profile, concatenate_features(self._window))
                self._window = []
                self.drift_report = report
                self.metrics.drift(report)
                log.log(
                    logging.WARNING if report.drifted else logging.INFO,
                    "served images: %s (%s)",
                    report.verdict,
                    ", ".join(f"{k} {v}" for k, v in report.scores.items()),
                )
        return probabilities, embeddings


# ---- requests ----


def not_ready_message(load_error: str) -> str:
    """Why a request got 503: no model yet, and why not when a load failed."""
    return "no model loaded yet" + (f": {load_error}" if load_error else "")


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413,
            "too_large",
            f"request body: {int(declared):,} bytes, more than the {limit:,} allowed (predict.max_file_bytes)",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413, "too_large", f"request body: more than the {limit:,} bytes allowed (predict.max_file_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def instances_array(body: bytes, image_size: int) -> np.ndarray:
    """The uint8 images of a TF Serving request body {"instances": [...]}; RequestError saying what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise RequestError(400, "malformed_json", f"request body: malformed JSON: {error}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
        raise RequestError(
            400,
            "wrong_shape",
            'request body: expected {"instances": [...]}, a non-empty list of '
            f"{image_size}x{image_size}x3 arrays of 0-255",
        )
    try:
        images = np.array(payload["instances"], dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(
            400,
            "wrong_shape",
            f"instances: expected {image_size}x{image_size}x3 arrays of numbers "
            "0-255, all the same shape (got ragged or non-numeric ones)",
        ) from None
    expected = (image_size, image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        got = "x".join(map(str, images.shape[1:])) or "scalars"
        raise RequestError(
            400,
            "wrong_shape",
            f"instances: expected arrays of shape {image_size}x{image_size}x3 (height, width, RGB), got {got}",
        )
    if not np.all(np.isfinite(images)) or np.any(images != np.round(images)) or images.min() < 0 or images.max() > 255:
        raise RequestError(400, "wrong_values", "instances: pixel values must be whole numbers from 0 to 255 (uint8)")
    return images.astype(np.uint8)


def image_array(body: bytes, image_size: int, resize: bool, max_pixels: int) -> np.ndarray:
    """One decoded PNG/JPEG as a batch of one; RequestError (bombs 413, the rest 400) saying why not."""
    try:
        return decode_image(body, image_size, "request body", resize=resize, max_pixels=max_pixels)[None]
    except DataError as error:
        message = str(error)
        if "decompression bomb" in message:
            raise RequestError(413, "decompression_bomb", message) from None
        if "expected" in message:
            raise RequestError(400, "wrong_size_or_mode", f"{message} (add ?resize=true to convert it)") from None
        raise RequestError(400, "not_an_image", message) from None


def prediction_records(probabilities: np.ndarray, class_names: list[str]) -> list[dict]:
    """The CSV's columns for each image: predicted, then p_<class> rounded to 6 digits as the CSV prints them."""
    # prediction_table rounds the float32 probabilities; as float64 they then print as the CSV does.
    rounded = probabilities.round(6).astype(np.float64).round(6)
    names = [f"p_{name}" for name in class_names]
    return [
        {"predicted": class_names[int(best)], **dict(zip(names, row.tolist(), strict=True))}
        for best, row in zip(probabilities.argmax(axis=1), rounded, strict=True)
    ]


def create_app(service: Service):
    """The FastAPI application around `service`."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def lifespan(app):
        service._queue = asyncio.Queue()
        batcher = asyncio.create_task(service.batch_forever())
        loader = threading.Thread(target=service.load_first, name="follow-prod", daemon=True)
        loader.start()
        yield
        service._stop.set()
        batcher.cancel()

    app = FastAPI(title="cifar10-cnn", lifespan=lifespan, docs_url=None, redoc_url=None)

    def refused(route: str, error: RequestError) -> JSONResponse:
        service.metrics.errors.labels(reason=error.reason).inc()
        service.metrics.requests.labels(route=route, status=str(error.status)).inc()
        log.info("%s %s: %s", error.status, route, error)
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.post(PREDICT_PATH)
    async def predict(request: Request, resize: bool = False):
        started = time.perf_counter()
        kind = "json"
        service._arriving += 1
        try:
            try:
                if service.served is None:
                    raise RequestError(503, "not_ready", not_ready_message(service.load_error))
                size = service.served.image_size
                content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
                body = await read_body(request, service.params.predict.max_file_bytes)
                if content_type in IMAGE_TYPES:
                    kind = "image"
                    images = image_array(body, size, resize, service.params.predict.max_pixels)
                elif content_type in ("application/json", ""):
                    images = instances_array(body, size)
                else:
                    raise RequestError(
                        415,
                        "unsupported_media_type",
                        f"Content-Type {content_type!r}: expected application/json, image/png or image/jpeg",
                    )
            finally:
                service._arriving -= 1
            served, probabilities = await service.predict(images)
        except RequestError as error:
            return refused("predict", error)
        service.metrics.latency.labels(kind=kind).observe(time.perf_counter() - started)
        service.metrics.requests.labels(route="predict", status="200").inc()
        return JSONResponse(
            {"predictions": prediction_records(probabilities, served.class_names), "model": served.describe()},
            headers={"X-Model-Version": served.version, "X-Model-Sha256": served.sha256},
        )

    @app.get(f"/v1/models/{ARTIFACT}")
    async def model_status():
        if service.served is None:
            return JSONResponse({"error": "no model loaded yet", "load_error": service.load_error}, status_code=503)
        return {
            **service.served.describe(),
            "load_error": service.load_error,
            "reference_profile": service.served.profile is not None,
        }

    @app.get(f"/v1/models/{ARTIFACT}/drift")
    async def drift():
        report = service.drift_report
        window = sum(len(part["predicted"]) for part in service._window)
        return {
            "last_window": report.as_dict() if report else None,
            "images_in_current_window": window,
            "window": service.params.serve.drift_window,
        }

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if service.served is None:
            return JSONResponse({"ready": False, "load_error": service.load_error}, status_code=503)
        return {"ready": True, "version": service.served.version}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    return app


def main() -> None:
    """Entry point for `python -m flows.serve`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--model", default="prod", help="prod (default: follows the registry), workspace, or a revision"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--max-batch", type=int, help="images per batch (default serve.max_batch; 1: no batching)")
    parser.add_argument("--window-ms", type=float, help="how long a batch waits for more (default serve.window_ms)")
    arguments = parser.parse_args()
    filter_native_stderr()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(arguments.params)
    apply_numerics(params.numerics)  # before TensorFlow is imported: the same numbers as evaluate
    max_batch = arguments.max_batch or params.serve.max_batch
    window_ms = params.serve.window_ms if arguments.window_ms is None else arguments.window_ms
    service = Service(params, Path.cwd(), arguments.model, max_batch, window_ms / 1000)
    import uvicorn

    uvicorn.run(create_app(service), host=arguments.host, port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
