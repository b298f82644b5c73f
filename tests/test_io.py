"""Atomic writers: a failure never leaves a partial file under the final name."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.io import DataError, atomic_path, read_arrays, read_json, verify_sha256, write_arrays, write_json
from tests.conftest import on_a_small_disk


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"accuracy": 0.')
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.json"]


# On a 160 KiB filesystem: a 96 KiB file, then a 256 KiB one over it, which runs out of space mid-write.
ARRAYS_ON_A_FULL_DISK = """
import json, os, sys
from pathlib import Path
import numpy as np
from tasks.lib.io import write_arrays
target = Path(sys.argv[1]) / "dataset.npz"
write_arrays(target, {"x": np.zeros(96 * 1024, np.uint8)})
before, disk = target.read_bytes(), os.statvfs(target.parent)
try:
    write_arrays(target, {"x": np.ones(256 * 1024, np.uint8)})
    error = None
except OSError as failure:
    error = str(failure)
print(json.dumps({"error": error, "free": disk.f_bavail * disk.f_frsize, "kept": target.read_bytes() == before,
                  "files": sorted(os.listdir(target.parent))}))
"""


def test_disk_full_mid_write_keeps_the_previous_file(tmp_path):
    outcome = on_a_small_disk(ARRAYS_ON_A_FULL_DISK, 160, tmp_path / "disk")
    assert "No space left on device" in outcome["error"]
    assert 16 * 1024 <= outcome["free"] < 256 * 1024  # room for part of the new file: the failure came mid-file
    assert outcome["kept"] and outcome["files"] == ["dataset.npz"]  # the old bytes, and no temporary file


def test_arrays_round_trip_and_missing_names_are_reported(tmp_path):
    path = write_arrays(tmp_path / "a.npz", {"x_train": np.ones((2, 3), np.uint8)})
    assert read_arrays(path, ("x_train",))["x_train"].sum() == 6
    with pytest.raises(DataError, match=r"missing arrays \['y_train'\]"):
        read_arrays(path, ("x_train", "y_train"))


def test_corrupt_inputs_are_named(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="bad.npz: not a readable .npz"):
        read_arrays(tmp_path / "bad.npz", ("x",))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(DataError, match="absent.json: file not found"):
        read_json(tmp_path / "absent.json")


def test_json_missing_a_required_key_names_the_file_the_keys_and_what_it_holds(tmp_path):
    write_json(tmp_path / "best.json", {"epoch": 3, "val_loss": 1.2})
    assert read_json(tmp_path / "best.json", required=("epoch",)) == {"epoch": 3, "val_loss": 1.2}
    with pytest.raises(DataError, match=r"best\.json: missing keys \['sha256'\]; found \['epoch', 'val_loss'\]"):
        read_json(tmp_path / "best.json", required=("epoch", "sha256"))


def test_checksum_mismatch_names_both_hashes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    with pytest.raises(DataError, match="expected 0{64}"):
        verify_sha256(path, "0" * 64)
