"""Large packages load with the cyclic collector paused, and everything else about their import is as before."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

PACKAGES = {
    # Records whether the collector ran while it loaded, and still after a nested listed package had.
    "big/__init__.py": (
        "import gc\n"
        "from importlib.resources import files\n"
        "PAUSED = not gc.isenabled()\n"
        "import inner\n"
        "STILL_PAUSED = not gc.isenabled()\n"
        "DATA = files(__name__).joinpath('data.txt').read_text()\n"
    ),
    "big/data.txt": "read through the package's own loader",
    "inner/__init__.py": "import gc\nPAUSED = not gc.isenabled()\n",
    "small/__init__.py": "import gc\nPAUSED = not gc.isenabled()\n",
    "broken/__init__.py": "raise RuntimeError('broken while it loads')\n",
}

SCRIPT = """
import gc, inspect
from tasks.lib.imports import import_without_collection
import_without_collection(["big", "inner", "broken"])
import small
try:
    import broken
except RuntimeError:
    pass
after_broken = gc.isenabled()
frozen = gc.get_freeze_count()
import big, inner
print(small.PAUSED, after_broken, big.PAUSED, inner.PAUSED, big.STILL_PAUSED, gc.isenabled())
print(gc.get_freeze_count() > frozen, "STILL_PAUSED" in inspect.getsource(big))
print(big.DATA)
"""


def test_listed_packages_load_with_the_collector_paused_then_frozen_and_a_failed_one_restores_it(tmp_path):
    for name, text in PACKAGES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # small is not listed; broken failed and left the collector on; big and the inner package it
    # imports loaded paused, and the inner one's end did not restart it; it runs again afterwards.
    assert lines[0].split() == ["False", "True", "True", "True", "True", "True"], lines
    # What big built is frozen; its source and its data read as from any package.
    assert lines[1].split() == ["True", "True"], lines
    assert lines[2] == PACKAGES["big/data.txt"]


def test_a_flow_process_loads_prefect_with_the_collector_paused():
    script = "import gc, flows.pipeline, prefect\nprint(gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
    environment = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"], result.stdout
