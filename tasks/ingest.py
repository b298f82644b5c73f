"""Ingest: a dataset source (image folder, .zip, or the CIFAR-10 binary release) to raw uint8 arrays."""

from __future__ import annotations

import http.client
import io
import logging
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.lib.cli import run_stage, run_tool
from tasks.lib.io import DataError, atomic_path, sha256_file, verify_sha256, write_arrays, write_json
from tasks.lib.params import IngestParams, Params, PredictParams

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then 1024 red, 1024 green, 1024 blue
CIFAR10_TRAIN_MEMBERS = tuple(f"data_batch_{index}.bin" for index in range(1, 6))
CIFAR10_TEST_MEMBER = "test_batch.bin"
CIFAR10_META_MEMBER = "batches.meta.txt"
RAW_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# What one image may cost before it is decoded: its file (or zip member) size, and the pixels its
# header claims (16.7 M pixels by default, 50 MB as RGB; Pillow's own bomb limit is 179 M).
MAX_IMAGE_BYTES = PredictParams().max_file_bytes
MAX_IMAGE_PIXELS = PredictParams().max_pixels


@dataclass(frozen=True)
class RawDataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


# ---- image folders (a directory or a .zip of one) ----


@dataclass(frozen=True)
class ImageFile:
    split: str
    class_name: str
    name: str
    read: object  # () -> bytes


def _classify_member(path: PurePosixPath) -> tuple[str, str, str] | None:
    """(split, class, file name) for `[top/]split/class/file.ext`, else None for files to ignore."""
    parts = path.parts
    if len(parts) == 4:  # one enclosing folder, as zips made from a folder often have
        parts = parts[1:]
    if len(parts) != 3 or parts[0] not in SPLITS or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return parts[0], parts[1], parts[2]


def _zip_members(archive: zipfile.ZipFile, source: Path) -> Iterator[ImageFile]:
    seen: set[str] = set()
    for info in archive.infolist():
        if info.is_dir():
            continue
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{source}: member {info.filename!r} has an absolute or '..' path; refusing the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DataError(f"{source}: member {info.filename!r} is a symbolic link; refusing the archive")
        if info.filename in seen:
            raise DataError(f"{source}: member {info.filename!r} appears twice; refusing the archive")
        seen.add(info.filename)
        if info.file_size > MAX_IMAGE_BYTES:
            raise DataError(
                f"{source}: member {info.filename!r} is {info.file_size:,} bytes uncompressed, more than the "
                f"{MAX_IMAGE_BYTES:,} an image may have; refusing the archive"
            )
        located = _classify_member(path)
        if located is None:
            log.debug("ignoring %s: not split/class/image", info.filename)
            continue
        yield ImageFile(*located, read=lambda info=info: archive.read(info))


def _directory_members(root: Path) -> Iterator[ImageFile]:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise DataError(f"{path}: symbolic links are not followed in an image folder")
        if not path.is_file():
            continue
        located = _classify_member(PurePosixPath(path.relative_to(root).as_posix()))
        if located is not None:
            yield ImageFile(*located, read=path.read_bytes)


def decode_image(
    payload: bytes, image_size: int, origin: str, *, resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode a PNG/JPEG to uint8 (size, size, 3); other sizes or modes are refused, or converted with `resize`."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            # The header's size, before a pixel is decoded: a 1.2 MB PNG can claim 20000x20000.
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(
                    f"{origin}: decompression bomb: the header claims {width}x{height} pixels, "
                    f"more than the {max_pixels:,} allowed"
                )
            image.load()
            if resize and (image.mode != "RGB" or image.size != (image_size, image_size)):
                # 16-bit greyscale has no direct RGB conversion: scale it to 8 bits first.
                if image.mode.startswith("I;16") or image.mode == "I":
                    image = image.point(lambda value: value / 256).convert("L")
                image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            if image.mode != "RGB":
                raise DataError(f"{origin}: image mode is {image.mode}, expected RGB")
            if image.size != (image_size, image_size):
                raise DataError(
                    f"{origin}: image is {image.size[0]}x{image.size[1]}, expected {image_size}x{image_size}"
                )
            return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own limit, checked as the file is opened
        raise DataError(f"{origin}: decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise DataError(f"{origin}: cannot decode image: not a PNG or JPEG file") from None
    except Exception as error:
        # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError, ... on
        # hostile or broken bytes: whichever it is, this one file cannot be decoded.
        raise DataError(f"{origin}: cannot decode image: {error or type(error).__name__}") from None


def assemble_image_folder(
    files: Iterable[ImageFile], *, image_size: int, max_per_class: int | None, origin: str
) -> RawDataset:
    """Decode image files into arrays; classes are the sorted train folder names."""
    by_split: dict[str, dict[str, list[ImageFile]]] = {split: {} for split in SPLITS}
    for item in files:
        by_split[item.split].setdefault(item.class_name, []).append(item)
    train_classes, test_classes = sorted(by_split["train"]), sorted(by_split["test"])
    if not train_classes:
        raise DataError(f"{origin}: no images found under train/<class>/ (expected PNG or JPEG files)")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{origin}: train and test classes differ: only in train {only_train}, only in test {only_test}"
        )
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images, labels = [], []
        for label, class_name in enumerate(train_classes):
            members = sorted(by_split[split][class_name], key=lambda item: item.name)[:max_per_class]
            for item in members:
                where = f"{origin}:{split}/{class_name}/{item.name}"
                images.append(decode_image(item.read(), image_size, where))
                labels.append(label)
        arrays[f"x_{split}"] = np.stack(images)
        arrays[f"y_{split}"] = np.asarray(labels, dtype=np.uint8)
        log.info("decoded %d %s images from %s", len(images), split, origin)
    return RawDataset(**arrays, class_names=tuple(train_classes))


def _check_class_folders(root: Path) -> None:
    for split in SPLITS:
        for folder in sorted(path for path in (root / split).glob("*") if path.is_dir()):
            if not any(image.suffix.lower() in IMAGE_SUFFIXES for image in folder.iterdir()):
                raise DataError(f"{folder}: class folder holds no PNG or JPEG images")


def read_image_folder(source: Path, *, image_size: int, max_per_class: int | None) -> RawDataset:
    """Read an image-folder dataset from a directory or a .zip of one."""
    if source.is_dir():
        _check_class_folders(source)
        return assemble_image_folder(
            _directory_members(source), image_size=image_size, max_per_class=max_per_class, origin=str(source)
        )
    try:
        with zipfile.ZipFile(source) as archive:
            return assemble_image_folder(
                _zip_members(archive, source), image_size=image_size, max_per_class=max_per_class, origin=str(source)
            )
    except zipfile.BadZipFile as error:
        raise DataError(f"{source}: not a readable zip archive: {error}") from None


# ---- the CIFAR-10 binary release ----


def parse_cifar10_batch(payload: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Split one binary batch into uint8 images (N, 32, 32, 3) and labels (N,)."""
    if not payload or len(payload) % CIFAR10_RECORD_BYTES:
        raise DataError(
            f"{origin}: {len(payload)} bytes is not a whole number of {CIFAR10_RECORD_BYTES}-byte records"
            " (the official batches are 30,730,000 bytes: 10,000 records)"
        )
    records = np.frombuffer(payload, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].copy()


def read_cifar10_binary(source: Path, *, max_per_class: int | None) -> RawDataset:
    """Read the official binary release member by member, without extracting or unpickling."""
    wanted = {*CIFAR10_TRAIN_MEMBERS, CIFAR10_TEST_MEMBER, CIFAR10_META_MEMBER}
    payloads: dict[str, bytes] = {}
    try:
        with tarfile.open(source, mode="r:gz") as archive:
            for member in archive:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise DataError(
                        f"{source}: member {member.name!r} has an absolute or '..' path; refusing the archive"
                    )
                name = path.name
                if name not in wanted:
                    continue
                if not member.isfile():
                    raise DataError(f"{source}: member {member.name!r} is not a regular file; refusing the archive")
                if name in payloads:
                    raise DataError(f"{source}: member {name!r} appears twice; refusing the archive")
                payloads[name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{source}: not a readable .tar.gz archive: {error}") from None
    missing = sorted(wanted - set(payloads))
    if missing:
        raise DataError(f"{source}: missing members {missing} of the CIFAR-10 binary layout")
    class_names = tuple(line.strip() for line in payloads[CIFAR10_META_MEMBER].decode().splitlines() if line.strip())
    batches = {
        name: parse_cifar10_batch(payloads[name], f"{source}:{name}")
        for name in (*CIFAR10_TRAIN_MEMBERS, CIFAR10_TEST_MEMBER)
    }
    for name, (_, labels) in batches.items():
        if labels.max() >= len(class_names):
            bad = sorted({int(label) for label in labels if label >= len(class_names)})
            raise DataError(
                f"{source}:{name}: labels {bad[:5]} are out of range 0..{len(class_names) - 1}"
                f" ({len(class_names)} class names in {CIFAR10_META_MEMBER})"
            )
    train = [batches[name] for name in CIFAR10_TRAIN_MEMBERS]
    x_test, y_test = batches[CIFAR10_TEST_MEMBER]
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    if max_per_class is not None:
        x_train, y_train = _first_per_class(x_train, y_train, max_per_class)
        x_test, y_test = _first_per_class(x_test, y_test, max_per_class)
    return RawDataset(x_train, y_train, x_test, y_test, class_names)


def _first_per_class(images: np.ndarray, labels: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == label)[:limit] for label in np.unique(labels)])
    keep.sort()
    return images[keep], labels[keep]


# ---- download ----


def download(
    url: str, destination: Path, *, sha256: str, attempts: int = 4, timeout_s: float = 60.0, backoff_s: float = 1.0
) -> Path:
    """Download `url` to `destination` with retries and a progress bar, verifying sha256 before the rename."""
    from tqdm import tqdm  # deferred: only downloads need it

    for attempt in range(1, attempts + 1):
        try:
            with atomic_path(destination) as temporary:
                with urllib.request.urlopen(url, timeout=timeout_s) as response, open(temporary, "wb") as sink:
                    expected_bytes = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=destination.name) as bar:
                        received = 0
                        while chunk := response.read(1 << 16):
                            sink.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                    if expected_bytes is not None and received != expected_bytes:
                        raise urllib.error.ContentTooShortError(f"received {received} of {expected_bytes} bytes", None)
                # A wrong checksum on a complete download will not fix itself: fail at once.
                verify_sha256(temporary, sha256)
            return destination
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            # Network faults are worth retrying; a DataError (bad checksum) propagates at once.
            if attempt == attempts:
                raise DataError(f"{url}: download failed after {attempts} attempts: {error}") from None
            delay_s = backoff_s * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, error, attempt, attempts - 1, delay_s)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def fetch_source(params: IngestParams) -> Path:
    """Make sure the source exists locally, downloading it when a URL is configured."""
    if params.source.exists():
        return params.source
    if params.url is None:
        raise DataError(
            f"{params.source}: dataset source not found (for the team copy run `dvc pull`; "
            "or set ingest.url and ingest.sha256 to download it)"
        )
    log.info("downloading %s to %s", params.url, params.source)
    return download(params.url, params.source, sha256=params.sha256)


# ---- the last good copy ----

RESTORE_HINT = "Bring back the last good copy with: python -m tasks.ingest --restore"


def source_pointer(source: Path) -> Path | None:
    """The DVC pointer (`<source>.dvc`) that tracks the source, if there is one."""
    pointer = source.with_name(source.name + ".dvc")
    return pointer if pointer.is_file() else None


def restore_source(params: IngestParams) -> Path:
    """Put back the last good source: the committed DVC pointer and its cached file, or a fresh download."""
    pointer = source_pointer(params.source)
    if pointer is not None:
        # `dvc repro` re-points the .dvc file at a modified source before ingest can refuse it
        # (and autostage may stage that), so the good pointer is the one in git's HEAD.
        log.info("restoring %s from the committed %s", params.source, pointer)
        run_tool(["git", "checkout", "HEAD", "--", str(pointer)], Path.cwd(), what="git checkout", error=DataError)
        # Every tracked file and output back as dvc.lock and the pointers say: the last good state.
        run_tool([sys.executable, "-m", "dvc", "checkout", "--force"], Path.cwd(), what="dvc checkout", error=DataError)
    elif params.url is not None:
        log.info("downloading %s again from %s", params.source, params.url)
        params.source.unlink(missing_ok=True)
        download(params.url, params.source, sha256=params.sha256)
    else:
        raise DataError(f"{params.source}: nothing to restore it from (no {params.source}.dvc pointer, no ingest.url)")
    if params.sha256 is not None:
        verify_sha256(params.source, params.sha256)
    return params.source


# ---- stage ----


def read_source(params: IngestParams) -> RawDataset:
    """Verify the configured source and read it into raw arrays."""
    source = params.source
    if not source.exists():
        raise DataError(
            f"{source}: dataset source not found "
            "(run `dvc pull`, or set ingest.url and run `python -m tasks.ingest --fetch`)"
        )
    if params.sha256 is not None and source.is_file():
        try:
            verify_sha256(source, params.sha256)
        except DataError as error:
            raise DataError(f"{error}. {RESTORE_HINT}") from None
    if params.kind == "cifar10_binary":
        return read_cifar10_binary(source, max_per_class=params.max_per_class)
    return read_image_folder(source, image_size=params.image_size, max_per_class=params.max_per_class)


def build_manifest(dataset: RawDataset, params: IngestParams) -> dict:
    """Source, checksum and per-class counts of an ingested dataset."""

    def counts(labels: np.ndarray) -> dict[str, int]:
        tally = Counter(labels.tolist())
        return {name: tally.get(index, 0) for index, name in enumerate(dataset.class_names)}

    return {
        "source": str(params.source),
        "kind": params.kind,
        "sha256": sha256_file(params.source) if params.source.is_file() else None,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.x_train.shape[1:]),
        "counts": {"train": counts(dataset.y_train), "test": counts(dataset.y_test)},
    }


def run(params: Params) -> list[Path]:
    """Read the source and write raw arrays plus a manifest."""
    dataset = read_source(params.ingest)
    raw = params.paths.raw
    written = write_arrays(raw / "dataset.npz", {name: getattr(dataset, name) for name in RAW_ARRAYS})
    manifest = write_json(raw / "manifest.json", build_manifest(dataset, params.ingest))
    log.info("wrote %s (%d train, %d test images)", written, len(dataset.y_train), len(dataset.y_test))
    return [written, manifest]


def fetch(params: Params) -> list[Path]:
    """Download the source when it is missing and a URL is configured (`--fetch`)."""
    return [fetch_source(params.ingest)]


def restore(params: Params) -> list[Path]:
    """Bring back the last good copy of the source and every DVC output (`--restore`)."""
    return [restore_source(params.ingest)]


def main() -> None:
    """Entry point for `python -m tasks.ingest [--fetch | --restore]`."""
    run_stage({"run": run, "fetch": fetch, "restore": restore}, __doc__)


if __name__ == "__main__":
    main()
