"""Service throughput: requests/s and latency of `python -m flows.serve`, micro-batching on and off.

Usage: python -m bench.serve [--requests N] [--model workspace|prod|REV]

Needs data/prepared and the evaluated model (`dvc repro` or `dvc pull`). Starts the service
twice on free 127.0.0.1 ports (params `serve` as they are, then --max-batch 1: every request its
own model call), sends one PNG test image per request from 1, 8 and 32 clients at once (each a
keep-alive connection), and prints requests/s, p50/p95/p99 latency, the mean images per batch
and the service's peak memory, beside tasks.predict's images/s on the same images.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import io
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from bench.predict import cpu_line
from tasks.lib.io import read_arrays
from tasks.lib.params import load_params

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)
PREDICT_PATH = "/v1/models/cifar10-cnn:predict"


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(model: str, *options: str) -> tuple[subprocess.Popen, int]:
    """The service on a free port, once /v2/health/ready answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--model", model, "--port", str(port), *options],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the service did not become ready in 180 s")


def client(port: int, images: list[bytes]) -> list[float]:
    """Send each image on one keep-alive connection; the latency of each answer, in seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    for payload in images:
        started = time.perf_counter()
        connection.request("POST", PREDICT_PATH, body=payload, headers={"Content-Type": "image/png"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise SystemExit(f"the service answered {answer.status}")
        latencies.append(time.perf_counter() - started)
    connection.close()
    return latencies


def metric(port: int, name: str) -> float:
    """One unlabelled sample from the service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        found = re.search(rf"^{name} (\S+)$", answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def load(port: int, images: list[bytes], clients: int) -> dict:
    """`images` sent by `clients` at once: requests/s, latency percentiles, images per model call."""
    calls, predicted = metric(port, "cifar10_batch_images_count"), metric(port, "cifar10_batch_images_sum")
    shares = [images[index::clients] for index in range(clients)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate([np.asarray(part) for part in pool.map(lambda share: client(port, share), shares)])
    elapsed = time.perf_counter() - started
    calls = metric(port, "cifar10_batch_images_count") - calls
    predicted = metric(port, "cifar10_batch_images_sum") - predicted
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    return {"rps": len(latencies) / elapsed, "p50": p50, "p95": p95, "p99": p99, "batch": predicted / calls}


def peak_memory_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


def predict_rate(model: str, images: np.ndarray) -> float:
    """tasks.predict's model images/s (its own log) on the same images written as PNG files."""
    with tempfile.TemporaryDirectory() as scratch:
        for index, image in enumerate(images):
            Image.fromarray(image).save(Path(scratch) / f"{index:05d}.png")
        out = Path(scratch) / "predictions.csv"
        result = subprocess.run(
            [sys.executable, "-m", "tasks.predict", scratch, "--model", model, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    return float(re.search(r"\((\d+) images/s\)", result.stderr).group(1))


def main() -> None:
    """Entry point for `python -m bench.serve`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=960, help="requests per load (default 960)")
    parser.add_argument("--model", default="workspace")
    arguments = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    test = read_arrays(params.paths.prepared / "dataset.npz", ("x_test",))["x_test"][: arguments.requests]
    pngs = []
    for image in test:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    rows = []
    settings = {
        f"on (window {params.serve.window_ms:g} ms, up to {params.serve.max_batch})": (),
        "off (--max-batch 1)": ("--max-batch", "1"),
    }
    for label, options in settings.items():
        process, port = start_service(arguments.model, *options)
        try:
            client(port, pngs[:32])  # warm the connection path; the model is warm once ready
            for clients in CLIENTS:
                result = load(port, pngs, clients)
                rows.append((label, clients, result))
                print(f"batching {label}, {clients} clients: {result['rps']:.0f} requests/s", file=sys.stderr)
            memory = peak_memory_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        rows.append((label, "peak memory", memory))
    rate = predict_rate(arguments.model, test)
    print(f"\n{cpu_line()}; {len(pngs)} requests of one 32x32 PNG per load\n")
    print("| micro-batching | clients | requests/s | p50 ms | p95 ms | p99 ms | images per batch |")
    print("|---|---|---|---|---|---|---|")
    for label, clients, result in rows:
        if clients == "peak memory":
            print(f"| {label} | peak memory of the service: {result:.0f} MiB | | | | | |")
            continue
        r = result
        print(
            f"| {label} | {clients} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
            f"| {r['batch']:.1f} |"
        )
    print(f"\ntasks.predict on the same {len(test)} images (files, one process): {rate:.0f} images/s")


if __name__ == "__main__":
    main()
