"""Large packages imported with Python's cyclic garbage collector paused.

Importing Keras on TensorFlow leaves about 440,000 objects that live as long as the process.
While they are created, the collector's full scans go over them again and again and free next
to nothing. Paused (Zen 4, CPU-seconds from the interpreter's start to its exit): `import keras`
2.2-2.5 instead of 3.5-4.0; an evaluate stage of the tests' small project 3.1-3.2 instead of
4.2-4.8; `import flows.pipeline` (Prefect) 1.45-1.67 instead of 2.0-2.36.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterable


class _LoaderWithoutCollection:
    """A package's own loader, run with the collector paused; what the import built is then frozen."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)  # resource readers, get_source and the rest stay the package's

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        if not gc.isenabled():  # inside another paused import (Keras loads TensorFlow), or paused by the program
            self._loader.exec_module(module)
            return
        gc.disable()
        try:
            self._loader.exec_module(module)
        finally:
            # The permanent generation: later collections in this process skip the package's objects.
            gc.freeze()
            gc.enable()


class _PackagesWithoutCollection(importlib.abc.MetaPathFinder):
    """Find the named top-level packages as the path finder does, with a loader that pauses the collector."""

    def __init__(self, packages: frozenset[str]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name not in self.packages:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithoutCollection(spec.loader)
        return spec


def import_without_collection(packages: Iterable[str]) -> None:
    """Load each of these top-level `packages`, when first imported, with the cyclic collector paused."""
    names = frozenset(packages)
    for finder in sys.meta_path:
        if isinstance(finder, _PackagesWithoutCollection):
            finder.packages |= names
            return
    sys.meta_path.insert(0, _PackagesWithoutCollection(names))  # before the path finder that would find them
