"""Ingest: image folders (directory and zip), the CIFAR-10 binary layout, and downloads."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.ingest import (
    CIFAR10_RECORD_BYTES,
    download,
    read_cifar10_binary,
    read_image_folder,
)
from tasks.lib.io import DataError
from tests.conftest import CLASS_NAMES, TEST_PER_CLASS, TRAIN_PER_CLASS, build_cifar10_archive, write_image_folder


def zip_folder(folder: Path, destination: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(destination, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
        for name, payload in (extra or {}).items():
            archive.writestr(name, payload)
    return destination


def test_directory_source_gives_uint8_arrays_and_sorted_classes(image_folder):
    dataset = read_image_folder(image_folder, image_size=32, max_per_class=None)
    assert dataset.class_names == CLASS_NAMES
    assert dataset.x_train.shape == (TRAIN_PER_CLASS * 4, 32, 32, 3) and dataset.x_train.dtype == np.uint8
    assert dataset.x_test.shape == (TEST_PER_CLASS * 4, 32, 32, 3)
    assert np.bincount(dataset.y_train).tolist() == [TRAIN_PER_CLASS] * 4


def test_zip_source_matches_directory_and_ignores_extra_files(image_folder, tmp_path):
    archive = zip_folder(image_folder, tmp_path / "images.zip", extra={"README.txt": b"hi", "train/.DS_Store": b"x"})
    from_zip = read_image_folder(archive, image_size=32, max_per_class=None)
    from_dir = read_image_folder(image_folder, image_size=32, max_per_class=None)
    np.testing.assert_array_equal(from_zip.x_train, from_dir.x_train)
    np.testing.assert_array_equal(from_zip.y_test, from_dir.y_test)


def test_max_per_class_keeps_the_first_images(image_folder):
    dataset = read_image_folder(image_folder, image_size=32, max_per_class=3)
    assert np.bincount(dataset.y_train).tolist() == [3] * 4


def test_jpeg_images_are_read(tmp_path):
    folder = write_image_folder(tmp_path / "jpeg", image_format="JPEG")
    assert read_image_folder(folder, image_size=32, max_per_class=2).x_test.shape == (8, 32, 32, 3)


@pytest.mark.parametrize(
    ("member", "problem"),
    [("../evil.png", "'..' path"), ("/abs/train/a/x.png", "absolute")],
)
def test_zip_members_escaping_the_tree_are_refused(image_folder, tmp_path, monkeypatch, member, problem):
    monkeypatch.chdir(tmp_path)
    archive = zip_folder(image_folder, tmp_path / "bad.zip", extra={member: b"x"})
    with pytest.raises(DataError, match=problem):
        read_image_folder(archive, image_size=32, max_per_class=None)
    # Where the member would land if extracted, from the archive's folder or the working directory.
    assert not (tmp_path / member.lstrip("/")).resolve().exists() and not Path(member).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.zip"]


def test_corrupt_zip_is_one_clear_error(tmp_path):
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="corrupt.zip: not a readable zip archive"):
        read_image_folder(tmp_path / "corrupt.zip", image_size=32, max_per_class=None)


def test_wrong_size_mode_and_undecodable_images_are_named(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    Image.new("RGB", (28, 28)).save(folder / "train/cross/0000.png")
    with pytest.raises(DataError, match=r"train/cross/0000.png: image is 28x28, expected 32x32"):
        read_image_folder(folder, image_size=32, max_per_class=None)
    Image.new("L", (32, 32)).save(folder / "train/cross/0000.png")
    with pytest.raises(DataError, match=r"train/cross/0000.png: image mode is L, expected RGB"):
        read_image_folder(folder, image_size=32, max_per_class=None)
    (folder / "train/cross/0000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"train/cross/0000.png: cannot decode image"):
        read_image_folder(folder, image_size=32, max_per_class=None)


def test_class_missing_from_test_is_rejected(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    for path in (folder / "test/square").iterdir():
        path.unlink()
    (folder / "test/square").rmdir()
    with pytest.raises(DataError, match=r"only in train \['square'\]"):
        read_image_folder(folder, image_size=32, max_per_class=None)


def test_empty_source_is_rejected(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        read_image_folder(tmp_path / "empty", image_size=32, max_per_class=None)


# ---- the CIFAR-10 binary release ----


def test_binary_release_is_decoded_channel_planes_to_hwc(tmp_path):
    expected = build_cifar10_archive(tmp_path / "cifar.tar.gz")
    dataset = read_cifar10_binary(tmp_path / "cifar.tar.gz", max_per_class=None)
    np.testing.assert_array_equal(dataset.x_train, expected["x_train"])
    np.testing.assert_array_equal(dataset.y_test, expected["y_test"])
    assert dataset.class_names == tuple(f"class{i}" for i in range(10))
    assert dataset.x_train.shape == (100, 32, 32, 3)


def test_binary_member_of_wrong_size_is_rejected(tmp_path):
    build_cifar10_archive(tmp_path / "cifar.tar.gz", corrupt_member="data_batch_3.bin")
    with pytest.raises(
        DataError, match=f"data_batch_3.bin: .* not a whole number of {CIFAR10_RECORD_BYTES}-byte records"
    ):
        read_cifar10_binary(tmp_path / "cifar.tar.gz", max_per_class=None)


@pytest.mark.parametrize("payload", [b"\x1f\x8b\x08\x00garbage", b"random bytes, not gzip at all"])
def test_corrupt_tar_gz_is_one_clear_error(tmp_path, payload):
    (tmp_path / "cifar.tar.gz").write_bytes(payload)
    with pytest.raises(DataError, match=r"cifar.tar.gz: not a readable .tar.gz archive"):
        read_cifar10_binary(tmp_path / "cifar.tar.gz", max_per_class=None)


def test_binary_archive_with_symlink_member_is_refused(tmp_path):
    with tarfile.open(tmp_path / "cifar.tar.gz", "w:gz") as archive:
        link = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(DataError, match="not a regular file"):
        read_cifar10_binary(tmp_path / "cifar.tar.gz", max_per_class=None)


# ---- downloads from a local HTTP server ----


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    truncate_first = 0  # cut the connection on this many requests first
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        if type(self).requests <= self.truncate_first:
            self.wfile.write(self.payload[: len(self.payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A 127.0.0.1 server whose payload and failure mode the test sets; stopped afterwards."""
    handler = type("Handler", (_Handler,), {"requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler, f"http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_verifies_and_renames(tmp_path, http_server):
    _, handler, url = http_server
    build_cifar10_archive(tmp_path / "built.tar.gz")
    handler.payload = (tmp_path / "built.tar.gz").read_bytes()
    handler.truncate_first = 1
    target = tmp_path / "downloads" / "cifar.tar.gz"
    download(url, target, sha256=hashlib.sha256(handler.payload).hexdigest(), backoff_s=0.01)
    assert target.read_bytes() == handler.payload
    assert handler.requests == 2  # the cut connection was retried once
    assert read_cifar10_binary(target, max_per_class=None).x_train.shape == (100, 32, 32, 3)


def test_truncated_downloads_fail_closed_after_retries(tmp_path, http_server):
    _, handler, url = http_server
    handler.payload, handler.truncate_first = b"x" * 100_000, 99
    target = tmp_path / "cifar.tar.gz"
    with pytest.raises(DataError, match="download failed after 3 attempts"):
        download(url, target, sha256=hashlib.sha256(handler.payload).hexdigest(), attempts=3, backoff_s=0.01)
    assert handler.requests == 3
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temp left


def test_checksum_mismatch_fails_at_once_without_retrying(tmp_path, http_server):
    _, handler, url = http_server
    handler.payload = b"y" * 1000
    flipped = bytearray(handler.payload)
    flipped[500] ^= 1
    with pytest.raises(DataError, match="sha256 is"):
        download(url, tmp_path / "cifar.tar.gz", sha256=hashlib.sha256(flipped).hexdigest(), backoff_s=0.01)
    assert handler.requests == 1
    assert list(tmp_path.iterdir()) == []


def test_binary_label_out_of_range_names_the_member(tmp_path):
    build_cifar10_archive(tmp_path / "cifar.tar.gz", bad_label=10)
    with pytest.raises(DataError, match=r"cifar.tar.gz:data_batch_1.bin: labels \[10\] are out of range 0..9"):
        read_cifar10_binary(tmp_path / "cifar.tar.gz", max_per_class=None)


def test_empty_class_folder_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    for path in (folder / "train/square").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"train/square: class folder holds no PNG or JPEG images"):
        read_image_folder(folder, image_size=32, max_per_class=None)


def test_zip_symlink_and_duplicate_members_are_refused(image_folder, tmp_path):
    link = zipfile.ZipInfo("train/cross/link.png")
    link.external_attr = 0o120777 << 16  # a symbolic link, as zip -y stores one
    archive_path = zip_folder(image_folder, tmp_path / "links.zip")
    with zipfile.ZipFile(archive_path, "a") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(DataError, match="is a symbolic link"):
        read_image_folder(archive_path, image_size=32, max_per_class=None)
    duplicate_path = zip_folder(image_folder, tmp_path / "dupes.zip")
    with zipfile.ZipFile(duplicate_path, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("train/cross/0000.png", b"again")
    with pytest.raises(DataError, match="appears twice"):
        read_image_folder(duplicate_path, image_size=32, max_per_class=None)


def _tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("../../cifar-10-batches-bin/test_batch.bin", tarfile.REGTYPE, "'..' path"),
        ("{tmp}/absolute/cifar-10-batches-bin/test_batch.bin", tarfile.REGTYPE, "absolute"),
        ("cifar-10-batches-bin/test_batch.bin", tarfile.LNKTYPE, "not a regular file"),
    ],
)
def test_binary_archive_escaping_or_linked_members_are_refused(tmp_path, monkeypatch, name, kind, problem):
    name = name.format(tmp=tmp_path)
    folder = tmp_path / "deep" / "er"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)  # a member extracted here or beside the archive would land under tmp_path
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = CIFAR10_RECORD_BYTES if kind == tarfile.REGTYPE else 0
    member.linkname = "" if kind == tarfile.REGTYPE else "cifar-10-batches-bin/data_batch_1.bin"
    with pytest.raises(DataError, match=problem):
        read_cifar10_binary(_tar_with(folder / "cifar.tar.gz", member), max_per_class=None)
    # Nothing extracted: not beside the archive, not where the escaping member points, nowhere under tmp_path.
    landing = Path(name) if Path(name).is_absolute() else (folder / name).resolve()
    assert landing.is_relative_to(tmp_path) and not landing.exists()
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "deep",
        "deep/er",
        "deep/er/cifar.tar.gz",
    ]


def test_binary_archive_duplicate_member_is_refused(tmp_path):
    members = []
    for _ in range(2):
        member = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        member.size = CIFAR10_RECORD_BYTES
        members.append(member)
    with pytest.raises(DataError, match="appears twice"):
        read_cifar10_binary(_tar_with(tmp_path / "cifar.tar.gz", *members), max_per_class=None)
