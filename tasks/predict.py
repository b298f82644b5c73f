"""Predict: run a model on new images; a CSV of path, predicted class and the probability of every class.

    python -m tasks.predict PATH... [--model workspace|prod|REV] [--out predictions.csv] [--resize] [--chunk N]

PATH: image files (PNG, JPEG), folders of them (searched recursively) or zips of them. The model
is the workspace's evaluated one (default), the registry's `prod` version, or the one of any git
revision (fetched through DVC, never a stale local copy); its sha256 is checked before it is
loaded in safe mode. Images that are not RGB of the training size are refused unless --resize;
unreadable, oversized (predict.max_file_bytes), bomb-sized (predict.max_pixels) and hostile files
(symbolic links out of their folder, zip members named '..' or absolute) are listed with their
reason, never fatal: the rest are still predicted. Exit status 2 when any file was skipped.
Images are decoded and predicted --chunk at a time, so memory does not grow with their number.
The images are compared with the model's reference profile of its test set (tasks.lib.drift) and the
verdict logged: `no drift`, `drift: <features>`, or no verdict under 200 images.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from tasks.ingest import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_image
from tasks.lib.cli import EXIT_BAD_INPUT, configure_logging, exit_without_teardown, filter_native_stderr
from tasks.lib.drift import DriftReport, batch_features, compare, concatenate_features
from tasks.lib.io import DataError, atomic_path, read_class_names, read_json
from tasks.lib.model_files import load_model
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import DEFAULT_PARAMS_PATH, Params, ParamsError, load_params

log = logging.getLogger(__name__)

# Images decoded and predicted at a time: memory stays bounded (12 MB of 32x32 pixels) however many
# are given. Each image's probabilities do not depend on it (tasks.lib.model.INFERENCE_BATCH).
CHUNK_IMAGES = 4000


@dataclass(frozen=True)
class ImageSource:
    name: str  # the path as the user will recognise it: a file, or zip path + "!" + member
    read: Callable[[], bytes]  # its bytes, or DataError/OSError saying why it cannot be read
    stamp: str = ""  # size and time (or CRC) without reading it: tells a changed file that cannot be read


@dataclass(frozen=True)
class Predictor:
    model_path: Path
    sha256: str
    class_names: list[str]
    image_size: int
    profile: dict | None = None  # evaluate's reference profile of the test set (tasks.lib.drift); None if absent


@dataclass(frozen=True)
class Predictions:
    table: pd.DataFrame  # prediction_table's rows
    skipped: list[tuple[str, str]]  # (name, reason)
    drift: DriftReport | None  # the predicted images against the model's reference profile, if it has one


def refusal(name: str, reason: str) -> Callable[[], bytes]:
    """A `read` that refuses: the file is listed, and skipped with `reason`, never opened."""

    def read() -> bytes:
        raise DataError(f"{name}: {reason}")

    return read


def image_sources(paths: list[Path], max_bytes: int = MAX_IMAGE_BYTES) -> Iterator[ImageSource]:
    """Every image named by `paths`: files as given, folders recursively, zip members; in a stable order.

    Nothing hostile is opened: a symbolic link out of its folder, a file or member over `max_bytes`,
    a member with an absolute or '..' name, or an encrypted one is listed with a reading that refuses.
    """
    for path in paths:
        if path.is_dir():
            inside = path.resolve()
            for file in sorted(item for item in path.rglob("*") if item.is_file()):
                if not file.resolve().is_relative_to(inside):
                    target = file.resolve()
                    yield ImageSource(
                        str(file),
                        refusal(str(file), f"a symbolic link out of {path} (to {target})"),
                        stamp=f"link:{target}",
                    )
                elif file.suffix.lower() in IMAGE_SUFFIXES or zipfile.is_zipfile(file):
                    yield from image_sources([file], max_bytes)
        elif path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
            yield from _zip_sources(path, max_bytes)
        else:
            yield ImageSource(str(path), functools.partial(_read_file, path, max_bytes), stamp=_file_stamp(path))


def _zip_sources(path: Path, max_bytes: int) -> Iterator[ImageSource]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted((info for info in archive.infolist() if not info.is_dir()), key=lambda i: i.filename)
    except (zipfile.BadZipFile, OSError) as error:
        yield ImageSource(str(path), refusal(str(path), f"not a readable zip archive: {error}"), _file_stamp(path))
        return
    for info in members:
        if Path(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        name, stamp = f"{path}!{info.filename}", f"{info.CRC:08x}:{info.file_size}"
        member = PurePosixPath(info.filename)
        if member.is_absolute() or ".." in member.parts:
            yield ImageSource(name, refusal(name, "an absolute or '..' name in the archive"), stamp)
        elif info.flag_bits & 0x1:
            yield ImageSource(name, refusal(name, "encrypted in the archive"), stamp)
        elif info.file_size > max_bytes:
            yield ImageSource(name, refusal(name, _too_big(info.file_size, max_bytes)), stamp)
        else:
            yield ImageSource(name, functools.partial(_read_member, path, info.filename), stamp)


def _too_big(size: int, max_bytes: int) -> str:
    return f"{size:,} bytes, more than predict.max_file_bytes = {max_bytes:,}"


def _file_stamp(path: Path) -> str:
    try:
        status = path.stat()
    except OSError:
        return ""
    return f"{status.st_size}:{status.st_mtime_ns}"


def _read_file(path: Path, max_bytes: int) -> bytes:
    # Read at most one byte past the cap: a file that grows, or lies in its size, is not read whole.
    with open(path, "rb") as file:
        payload = file.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise DataError(f"{path}: {_too_big(path.stat().st_size, max_bytes)}")
    return payload


def _read_member(archive: Path, member: str) -> bytes:
    # Opening a zip parses its whole central directory (0.3 s for CIFAR-10's 60,000 members):
    # once per archive, not once per member. Keyed by its stat too, so a replaced zip is reopened.
    stat = archive.stat()
    try:
        # zipfile stops at the member's declared size (checked against the cap) and checks its CRC.
        return _open_archive(archive, stat.st_mtime_ns, stat.st_size).read(member)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as error:
        raise DataError(f"{archive}!{member}: cannot read it from the archive: {error}") from None


@functools.lru_cache(maxsize=4)
def _open_archive(archive: Path, mtime_ns: int, size: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def decode_sources(
    sources: list[ImageSource], image_size: int, *, resize: bool, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(names, uint8 images, skipped (name, reason)): every source decoded, or skipped with the reason why."""
    names, images, skipped = [], [], []
    for source in sources:
        try:
            images.append(decode_image(source.read(), image_size, source.name, resize=resize, max_pixels=max_pixels))
            names.append(source.name)
        except DataError as error:
            skipped.append((source.name, str(error).removeprefix(f"{source.name}: ")))
        except OSError as error:
            skipped.append((source.name, error.strerror or str(error)))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return names, stacked, skipped


def prediction_table(names: list[str], probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per image: path, predicted class, and one probability column per class."""
    table = pd.DataFrame({"path": names, "predicted": np.asarray(class_names)[probabilities.argmax(axis=1)]})
    for column, name in enumerate(class_names):
        table[f"p_{name}"] = probabilities[:, column].round(6)
    return table


def prod_revision(params: Params, root: Path) -> str:
    """The commit of the registry's `prod` version, as its remote has it; DataError when none is in prod."""
    from tasks.promote import champion_version

    champion = champion_version(root, params.promote.remote)
    if champion is None:
        raise DataError("--model prod: no version of the model is in prod yet (python -m tasks.promote)")
    return champion["commit_hexsha"]


REFERENCE_PROFILE = "reference_profile.json"  # evaluate's, under paths.metrics (a DVC output)


def reference_profile_at(root: Path, path: Path, revision: str | None, scratch: Path | None = None) -> dict | None:
    """The reference profile at `path` in the workspace (revision None) or at a git revision; None if it has none."""
    from tasks.promote import PromotionError, fetch_at_revision

    if revision is None:
        return read_json(path) if path.exists() else None
    try:
        return read_json(fetch_at_revision(root, path, revision, scratch / REFERENCE_PROFILE))
    except PromotionError:
        return None  # a model evaluated before profiles existed: predicted as ever, without a drift verdict


@contextlib.contextmanager
def resolve_model(choice: str, params: Params, root: Path) -> Iterator[Predictor]:
    """The model `choice` names (workspace, prod or a git revision), fetched into a temporary folder if needed."""
    from tasks.promote import fetch_at_revision

    size = params.ingest.image_size
    report = params.paths.prepared / "report.json"
    profile_path = params.paths.metrics / REFERENCE_PROFILE
    if choice == "workspace":
        best = read_json(params.paths.model / "best.json", required=("sha256",))
        class_names = read_class_names(report)
        profile = reference_profile_at(root, profile_path, None)
        yield Predictor(params.paths.model / "model.keras", best["sha256"], class_names, size, profile)
        return
    revision = choice
    if choice == "prod":
        revision = prod_revision(params, root)
    with tempfile.TemporaryDirectory() as scratch:
        folder = fetch_at_revision(root, params.paths.model, revision, Path(scratch) / "model")
        fetched_report = fetch_at_revision(root, report, revision, Path(scratch) / "report.json")
        class_names = read_class_names(fetched_report)
        best = read_json(folder / "best.json", required=("sha256",))
        profile = reference_profile_at(root, profile_path, revision, Path(scratch))
        yield Predictor(folder / "model.keras", best["sha256"], class_names, size, profile)


def load_predictor_model(predictor: Predictor):
    """The predictor's model (sha256 checked, safe mode) with its embeddings as a second output."""
    from tasks.lib.model import with_embeddings  # imports Keras: after the numerics are set

    return with_embeddings(load_model(predictor.model_path, sha256=predictor.sha256))


def predict_images(model, images: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, embeddings) of uint8 images from a `load_predictor_model` model."""
    from tasks.lib.model import predict_with_embeddings

    if images.shape[0] == 0:
        return np.zeros((0, num_classes)), np.zeros((0, 0))
    return predict_with_embeddings(model, images)


def predict_sources(
    sources: list[ImageSource],
    predictor: Predictor,
    *,
    resize: bool,
    chunk: int = CHUNK_IMAGES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Predictions:
    """Decode and predict `sources`, `chunk` at a time: the table, the skipped files, the drift report."""
    model = load_predictor_model(predictor)
    num_classes = len(predictor.class_names)
    tables, skipped, features = [], [], []
    decoding = predicting = 0.0
    for start in range(0, len(sources), chunk):
        started = time.perf_counter()
        names, images, refused = decode_sources(
            sources[start : start + chunk], predictor.image_size, resize=resize, max_pixels=max_pixels
        )
        decoded = time.perf_counter()
        probabilities, embeddings = predict_images(model, images, num_classes)
        tables.append(prediction_table(names, probabilities, predictor.class_names))
        if predictor.profile is not None and len(images):
            features.append(batch_features(predictor.profile, images, probabilities, embeddings))
        skipped += refused
        decoding, predicting = decoding + decoded - started, predicting + time.perf_counter() - decoded
        if len(sources) > chunk:
            log.info("%d of %d files done", min(start + chunk, len(sources)), len(sources))
    predicted = sum(len(table) for table in tables)
    log.info(
        "predicted %d images (%d skipped): decoding %.1f s, model %.1f s (%.0f images/s)",
        predicted,
        len(skipped),
        decoding,
        predicting,
        predicted / max(predicting, 1e-9),
    )
    tables = [table for table in tables if len(table)] or [
        prediction_table([], np.zeros((0, num_classes)), predictor.class_names)
    ]
    drift = compare(predictor.profile, concatenate_features(features)) if features else None
    if drift is not None:
        log.info("inputs against the test set's profile: %s", drift.verdict)
    return Predictions(pd.concat(tables, ignore_index=True), skipped, drift)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def main() -> None:
    """Entry point for `python -m tasks.predict`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files, folders or zips")
    parser.add_argument("--model", default="workspace", help="workspace (default), prod, or a git revision")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    parser.add_argument("--resize", action="store_true", help="convert other sizes and modes instead of refusing")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: params.yaml)")
    parser.add_argument(
        "--chunk", type=positive_int, default=CHUNK_IMAGES, help=f"images in memory at once (default {CHUNK_IMAGES})"
    )
    arguments = parser.parse_args()
    filter_native_stderr()
    configure_logging()
    try:
        params = load_params(arguments.params)
        apply_numerics(params.numerics)  # before TensorFlow is imported: the same numbers as evaluate
        with resolve_model(arguments.model, params, Path.cwd()) as predictor:
            log.info("model %s: %s (sha256 %s)", arguments.model, predictor.model_path.name, predictor.sha256[:12])
            sources = list(image_sources(arguments.paths, params.predict.max_file_bytes))
            predictions = predict_sources(
                sources, predictor, resize=arguments.resize, chunk=arguments.chunk, max_pixels=params.predict.max_pixels
            )
    except (ParamsError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    with atomic_path(arguments.out, suffix=".csv") as temporary:
        predictions.table.to_csv(temporary, index=False)
    log.info("wrote %s", arguments.out)
    for name, reason in predictions.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if predictions.skipped:
        sys.exit(EXIT_BAD_INPUT)
    exit_without_teardown()


if __name__ == "__main__":
    main()
