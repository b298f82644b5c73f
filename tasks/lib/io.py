"""The only place arrays, JSON and tables are written and read (Keras models: tasks.lib.model_files).

Every writer goes through `atomic_path`: data lands under a temporary name in the
destination folder and is renamed into place only once complete, so a crash, a kill or
a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

_HASH_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """An input file is missing, corrupt or not what the stage expected."""


class WorkspaceBusyError(RuntimeError):
    """Another flow run or promotion (or another DVC process) holds this workspace: try again later."""


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=f".tmp{suffix}")
    os.close(handle)
    temporary = Path(name)
    os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise DataError unless the file's sha256 equals `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: sha256 is {actual}, expected {expected}: "
            "the file is corrupt, or not the file that hash was taken from"
        )


def copy_verified(source: str | Path, sha256: str, destination: str | Path) -> str:
    """Copy `source` to `destination` atomically, only if the copy's sha256 is `sha256` (recorded when it was made)."""
    if not Path(source).is_file():
        raise DataError(f"{source}: file not found (run the stage that writes it first)")
    with atomic_path(destination, suffix=Path(destination).suffix) as temporary:
        shutil.copyfile(source, temporary)
        # Hash the copy, not the source: what lands is exactly what was checked.
        copied = sha256_file(temporary)
        if copied != sha256:
            raise DataError(
                f"{source}: sha256 is {copied}, expected {sha256} (recorded when it was written); "
                "it was changed afterwards: rerun the stage that wrote it"
            )
    return copied


def write_json(path: str | Path, payload: object) -> Path:
    """Write JSON atomically (sorted keys, so diffs stay small)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_json(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """Read a JSON object, with an error naming the file when it is missing, corrupt or lacks a `required` key."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; found {sorted(payload)}")
    return payload


def read_class_names(report: str | Path) -> list[str]:
    """The class names in label order, from preprocess's report.json."""
    return read_json(report, required=("class_names",))["class_names"]


def write_table(path: str | Path, table: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV atomically, without the index."""
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)
    return Path(path)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV table written by `write_table`."""
    import pandas as pd  # here: ingest, preprocess and split read no table, and pandas is 0.2 s of CPU to import

    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run the stage that writes it first)") from None


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write named arrays to one uncompressed .npz, atomically."""
    with atomic_path(path, suffix=".npz") as temporary, open(temporary, "wb") as sink:
        np.savez(sink, **arrays)
    return Path(path)


def read_arrays(path: str | Path, expected: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the named arrays of an .npz, failing clearly on a missing file, corruption or key."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = sorted(set(expected) - set(archive.files))
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; found {sorted(archive.files)}")
            return {name: archive[name] for name in expected}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run the stage that writes it first)") from None
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz array file: {error}") from None
