"""The service's page in headless Chromium: drop real images on it, screenshot what it shows.

Usage: python -m bench.page [--model workspace|prod|REV] [--out bench/results/page.png]

Needs Debian's chromium (apt-get install chromium) and the evaluated model. Starts the service,
opens its page over Chrome's DevTools protocol, drops two real photographs on the drop zone (a
CIFAR-10 test image from the team's DVC store, and matplotlib's sample portrait, which the page
sends with ?resize=true), waits for their answers, saves a screenshot and prints the class each
one shows beside tasks.predict's class for the same file.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import dvc.api
import pandas as pd
from matplotlib import cbook
from websockets.sync.client import connect

from bench.serve import ROOT, free_port, start_service

CHROMIUM = "/usr/bin/chromium"
# Offline and quiet: no background connections, which this machine's closed network refuses.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=900,1100",
)


class DevTools:
    """One page's Chrome DevTools protocol session."""

    def __init__(self, url: str):
        self.socket, self.counter = connect(url, max_size=None), 0

    def call(self, method: str, **params) -> dict:
        self.counter += 1
        self.socket.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.counter:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def page_target(port: int) -> str:
    """The websocket URL of Chromium's first page, once its DevTools endpoint answers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as answer:
                pages = [target for target in json.load(answer) if target["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("Chromium's DevTools endpoint did not answer in 30 s")


def real_images(folder: Path) -> list[Path]:
    """A CIFAR-10 test JPEG (the team's DVC store) and matplotlib's sample portrait, as files in `folder`."""
    with dvc.api.open("data/external/cifar10-jpeg.zip", repo=str(ROOT), mode="rb") as file:
        archive = zipfile.ZipFile(io.BytesIO(file.read()))
    ship = folder / "ship-0007.jpg"
    ship.write_bytes(archive.read("test/ship/0007.jpg"))
    portrait = folder / "grace_hopper.jpg"
    portrait.write_bytes(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())
    return [ship, portrait]


def main() -> None:
    """Entry point for `python -m bench.page`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="workspace")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "page.png")
    arguments = parser.parse_args()
    service, port = start_service(arguments.model)
    debug_port = free_port()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as scratch:
        files = real_images(Path(scratch))
        browser = subprocess.Popen(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={scratch}/profile",
                f"--remote-debugging-port={debug_port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            tools = DevTools(page_target(debug_port))
            tools.call("Page.enable")
            tools.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            deadline = time.monotonic() + 30
            while "loading" in (tools.evaluate("document.getElementById('model')?.textContent") or "loading"):
                if time.monotonic() > deadline:
                    raise SystemExit("the page did not show its model in 30 s")
                time.sleep(0.2)
            box = tools.evaluate("JSON.stringify(document.getElementById('drop').getBoundingClientRect())")
            box = json.loads(box)
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            data = {"items": [], "files": [str(file) for file in files], "dragOperationsMask": 1}
            for kind in ("dragEnter", "dragOver", "drop"):
                tools.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)
            deadline = time.monotonic() + 60
            shown = []
            while time.monotonic() < deadline:
                shown = tools.evaluate("[...document.querySelectorAll('.result')].map(r => r.innerText)") or []
                if len(shown) == len(files) and all("…" not in text for text in shown):
                    break
                time.sleep(0.3)
            model_line = tools.evaluate("document.getElementById('model').textContent")
            screenshot = tools.call("Page.captureScreenshot", format="png")["data"]
            arguments.out.parent.mkdir(parents=True, exist_ok=True)
            arguments.out.write_bytes(base64.b64decode(screenshot))
            out = Path(scratch) / "predictions.csv"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tasks.predict",
                    *map(str, files),
                    "--resize",
                    "--model",
                    arguments.model,
                    "--out",
                    str(out),
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            expected = pd.read_csv(out)
        finally:
            browser.terminate()
            service.terminate()
            browser.wait(timeout=30)  # before its profile folder is removed
            service.wait(timeout=30)
    print(model_line)
    for text in shown:
        print("page shows:", " | ".join(text.splitlines()[:3]))
    for path, predicted in zip(expected["path"], expected["predicted"], strict=True):
        print(f"tasks.predict --resize: {Path(path).name} -> {predicted}")
    print(f"screenshot: {arguments.out}")


if __name__ == "__main__":
    main()
