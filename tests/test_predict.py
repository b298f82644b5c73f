"""Predict on new images through the CLI: refused and unreadable files are named, the rest predicted."""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import edit_params, run_command

PREDICT = [sys.executable, "-m", "tasks.predict"]
FLOW = [sys.executable, "-m", "flows.batch_predict"]


def test_predictions_of_the_test_images_equal_evaluates(project):
    result = run_command([*PREDICT, "source/test", "--out", "new.csv"], project)
    predicted = pd.read_csv(project / "new.csv")
    evaluated = pd.read_csv(project / "artifacts/metrics/predictions.csv")
    # The test folder's files in ingest's order: class by class, file names sorted.
    assert predicted["path"].str.split("/").str[-2].tolist() == evaluated["actual"].tolist()
    assert predicted["predicted"].tolist() == evaluated["predicted"].tolist()
    probabilities = predicted.filter(like="p_").to_numpy()
    assert list(predicted.columns[2:]) == ["p_circle", "p_cross", "p_square", "p_stripes"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert "images/s" in result.stderr


def test_wrong_size_and_corrupt_files_are_named_and_the_rest_predicted(project):
    incoming = project / "incoming"
    incoming.mkdir()
    shutil.copy(project / "source/test/cross/0000.png", incoming / "good.png")
    Image.new("RGB", (40, 30), "red").save(incoming / "big.png")
    Image.new("L", (32, 32)).save(incoming / "grey.png")
    (incoming / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_command([*PREDICT, "incoming", "--out", "out.csv"], project, check=False)
    assert result.returncode == 2, result.stderr
    assert pd.read_csv(project / "out.csv")["path"].tolist() == ["incoming/good.png"]
    assert "skipped incoming/big.png: image is 40x30, expected 32x32" in result.stderr
    assert "skipped incoming/grey.png: image mode is L, expected RGB" in result.stderr
    assert "skipped incoming/broken.jpg: cannot decode image" in result.stderr
    # --resize converts what it can; a file that is no image stays skipped.
    result = run_command([*PREDICT, "incoming", "--out", "out.csv", "--resize"], project, check=False)
    assert result.returncode == 2 and "broken.jpg" in result.stderr and "big.png" not in result.stderr
    assert sorted(pd.read_csv(project / "out.csv")["path"]) == [f"incoming/{n}.png" for n in ("big", "good", "grey")]


def test_chunks_keep_memory_bounded_and_give_the_same_table(project):
    incoming = project / "incoming"
    shutil.copytree(project / "source/test", incoming)
    (incoming / "circle/broken.png").write_bytes(b"not an image")
    whole = run_command([*PREDICT, "incoming", "--out", "whole.csv"], project, check=False)
    chunked = run_command([*PREDICT, "incoming", "--out", "chunked.csv", "--chunk", "3"], project, check=False)
    assert whole.returncode == chunked.returncode == 2  # the broken file is skipped in both
    assert "skipped incoming/circle/broken.png" in chunked.stderr
    files = len(list(incoming.rglob("*.png")))
    assert f"3 of {files} files done" in chunked.stderr and f"{files} of {files} files done" in chunked.stderr
    expected, table = pd.read_csv(project / "whole.csv"), pd.read_csv(project / "chunked.csv")
    assert len(table) == files - 1
    assert table[["path", "predicted"]].equals(expected[["path", "predicted"]])
    # Batches of 3 instead of all at once: the kernels may add in another order, so the last digit may move.
    np.testing.assert_allclose(table.filter(like="p_"), expected.filter(like="p_"), atol=1e-5)
    refused = run_command([*PREDICT, "incoming", "--chunk", "0"], project, check=False)
    assert refused.returncode == 2 and "--chunk: expected a whole number of at least 1, got 0" in refused.stderr


def test_zip_members_are_read_from_the_archive_as_it_is_now(tmp_path):
    from tasks.predict import image_sources

    archive = tmp_path / "batch.zip"

    def write(contents: dict[str, bytes]) -> None:
        with zipfile.ZipFile(archive, "w") as opened:
            for name, data in contents.items():
                opened.writestr(name, data)

    write({"a.png": b"first", "b.png": b"second"})
    assert [source.read() for source in image_sources([archive])] == [b"first", b"second"]
    # Rewritten in place (a served batch flow sees the same path again): the open archive is not reused.
    write({"a.png": b"replaced, and longer", "c.png": b"new"})
    assert {Path(source.name).name: source.read() for source in image_sources([archive])} == {
        "batch.zip!a.png": b"replaced, and longer",
        "batch.zip!c.png": b"new",
    }


def test_a_zip_and_a_model_of_another_revision_fetched_through_dvc(project):
    with zipfile.ZipFile(project / "batch.zip", "w") as archive:
        for path in sorted((project / "source/test/square").glob("*.png")):
            archive.write(path, f"square/{path.name}")
    run_command([*PREDICT, "batch.zip", "--model", "HEAD", "--out", "zip.csv"], project)
    table = pd.read_csv(project / "zip.csv")
    assert table["path"].tolist() == [f"batch.zip!square/{index:04d}.png" for index in range(4)]
    evaluated = pd.read_csv(project / "artifacts/metrics/predictions.csv")
    assert table["predicted"].tolist() == evaluated.loc[evaluated["actual"] == "square", "predicted"].tolist()


def test_a_model_file_that_does_not_match_its_recorded_hash_is_not_loaded(project):
    model = project / "artifacts/model/model.keras"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes() + b"\0")
    result = run_command([*PREDICT, "source/test", "--out", "x.csv"], project, check=False)
    assert result.returncode == 2 and "sha256" in result.stderr and "model.keras" in result.stderr
    assert not (project / "x.csv").exists()


def test_batch_flow_predicts_each_file_once(project, prefect_api):
    incoming = project / "incoming"
    incoming.mkdir()
    for name in ("0000", "0001", "0002"):
        shutil.copy(project / f"source/test/circle/{name}.png", incoming / f"circle-{name}.png")
    shutil.copy(project / "source/test/circle/0000.png", incoming / "same-content.png")
    (incoming / "broken.png").write_bytes(b"not an image")
    batch = [*FLOW, "incoming", "--out", "results", "--model", "workspace"]
    assert run_command(batch, project, check=False).returncode == 2  # broken.png skipped, the rest predicted
    (first,) = sorted((project / "results").glob("batch-*.csv"))
    table = pd.read_csv(first, keep_default_na=False)
    assert sorted(Path(path).name for path in table["path"]) == [
        "broken.png",
        "circle-0000.png",
        "circle-0001.png",
        "circle-0002.png",
    ]  # the copy of circle-0000 under another name is the same content: predicted once
    assert table.set_index(table["path"].map(lambda path: Path(path).name)).loc["broken.png", "skipped"]
    assert (table.loc[table["skipped"] == "", "predicted"] != "").all()
    # Compared with the model's reference profile of its test set: too few images here for a verdict.
    drift = json.loads(first.with_suffix(".drift.json").read_text())
    assert drift["images"] == 3 and drift["verdict"] == "no verdict: 3 images, fewer than 200"
    assert set(drift["scores"]) >= {"brightness", "sharpness", "confidence", "embedding_distance", "class_mix"}
    run_command(batch, project)  # nothing new: no second batch
    assert sorted((project / "results").glob("batch-*.csv")) == [first]
    shutil.copy(project / "source/test/cross/0000.png", incoming / "cross.png")
    run_command(batch, project)
    second = next(path for path in (project / "results").glob("batch-*.csv") if path != first)
    assert [Path(path).name for path in pd.read_csv(second)["path"]] == ["cross.png"]


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height RGB pixels (a decompression bomb's shape), data truncated."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 64, 9)  # the first 64 rows of black
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def hostile_folder(project: Path) -> dict[str, str]:
    """incoming/ with good images and every kind of hostile one; {file name: the reason it must be skipped for}."""
    incoming = project / "incoming"
    incoming.mkdir()
    for name in ("0000", "0001"):
        shutil.copy(project / f"source/test/square/{name}.png", incoming / f"good-{name}.png")
    (incoming / "bomb.png").write_bytes(png_header_claiming(20000, 20000))  # past Pillow's own limit
    (incoming / "tall.png").write_bytes(png_header_claiming(32, 600_000))  # under Pillow's, over ours
    good = (project / "source/test/cross/0000.png").read_bytes()
    (incoming / "truncated.png").write_bytes(good[: len(good) // 2])
    colour = Image.open(project / "source/test/cross/0001.png")
    for mode, name in (("RGBA", "rgba"), ("P", "palette"), ("L", "grey")):
        colour.convert(mode).save(incoming / f"{name}.png")
    Image.fromarray(np.asarray(colour.convert("L"), np.uint16) * 200).save(incoming / "sixteen-bit.png")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(incoming / "huge-file.png")  # 270 kB: over the test's max_file_bytes
    outside = project.parent / "outside.png"
    shutil.copy(project / "source/test/circle/0000.png", outside)
    (incoming / "link.png").symlink_to(outside)
    with zipfile.ZipFile(incoming / "batch.zip", "w") as archive:
        archive.writestr("inner.png", good)
        archive.writestr("../escape.png", good)
        archive.writestr("/absolute.png", good)
    return {
        "bomb.png": "decompression bomb",
        "tall.png": "decompression bomb: the header claims 32x600000 pixels",
        "truncated.png": "cannot decode image",
        "rgba.png": "image mode is RGBA, expected RGB",
        "palette.png": "image mode is P, expected RGB",
        "grey.png": "image mode is L, expected RGB",
        "sixteen-bit.png": "image mode is I",
        "huge-file.png": "more than predict.max_file_bytes = 100,000",
        "link.png": "a symbolic link out of incoming",
        "batch.zip!../escape.png": "an absolute or '..' name in the archive",
        "batch.zip!/absolute.png": "an absolute or '..' name in the archive",
    }


def skipped_lines(stderr: str) -> dict[str, str]:
    """{file name under incoming/: reason} from the `skipped PATH: reason` lines a command printed."""
    found = re.findall(r"skipped (\S*incoming/)(\S+): (.*)$", stderr, re.MULTILINE)
    return {name: reason for _, name, reason in found}


def test_hostile_images_are_skipped_with_their_reason_and_the_rest_predicted(project, prefect_api):
    edit_params(project, "predict", max_file_bytes=100_000)
    expected = hostile_folder(project)
    predict = [*PREDICT, "incoming", "--out", "out.csv"]
    result = run_command(["/usr/bin/time", "-f", "peak %M KiB", *predict], project, check=False)
    assert result.returncode == 2, result.stderr
    skipped = skipped_lines(result.stderr)
    assert skipped.keys() == expected.keys(), skipped
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped[name])
    predicted = pd.read_csv(project / "out.csv")["path"].tolist()
    assert predicted == ["incoming/batch.zip!inner.png", "incoming/good-0000.png", "incoming/good-0001.png"]
    peak_kib = int(re.search(r"peak (\d+) KiB", result.stderr).group(1))
    assert peak_kib < 1.5 * 2**20, peak_kib  # the 20000x20000 claim would be 1.2 GB decoded
    # --resize converts the modes; the hostile files stay skipped.
    resized = run_command([*predict, "--resize"], project, check=False)
    assert resized.returncode == 2
    converted = {"rgba.png", "palette.png", "grey.png", "sixteen-bit.png"}
    assert skipped_lines(resized.stderr).keys() == expected.keys() - converted
    # The batch flow: a batch each run, the skips recorded with their reason, never fatal.
    batch = [*FLOW, "incoming", "--out", "results", "--model", "workspace"]
    first = run_command(batch, project, check=False)
    assert first.returncode == 2, first.stderr
    (written,) = (project / "results").glob("batch-*.csv")
    table = pd.read_csv(written, keep_default_na=False).set_index("path")
    assert {Path(path).name for path in table.index[table["skipped"] != ""]} >= {"bomb.png", "link.png"}
    assert (table.loc[table["skipped"] == "", "predicted"] != "").all() and (table["skipped"] == "").sum() == 3
    # A new image arrives; the same run again predicts it, and tries no skipped file again.
    shutil.copy(project / "source/test/circle/0001.png", project / "incoming/new.png")
    second = run_command(batch, project)
    (newer,) = set((project / "results").glob("batch-*.csv")) - {written}
    assert [Path(path).name for path in pd.read_csv(newer)["path"]] == ["new.png"], second.stderr
    # With --resize, the files skipped for their mode get their second try, and are predicted.
    run_command([*batch, "--resize"], project, check=False)
    (third,) = set((project / "results").glob("batch-*.csv")) - {written, newer}
    retried = pd.read_csv(third, keep_default_na=False)
    assert {Path(path).name for path in retried.loc[retried["skipped"] == "", "path"]} == converted


def test_batch_flow_without_a_model_in_prod_is_one_clear_error(project, prefect_api):
    (project / "incoming").mkdir()
    shutil.copy(project / "source/test/circle/0000.png", project / "incoming/a.png")
    run_command(["git", "init", "--quiet", "--bare", str(project.parent / "shared.git")], project)
    run_command(["git", "remote", "add", "origin", str(project.parent / "shared.git")], project)
    result = run_command([*FLOW, "incoming", "--out", "results"], project, check=False)
    assert result.returncode == 2, result.stderr
    assert "error: --model prod: no version of the model is in prod yet (python -m tasks.promote)" in result.stderr
    assert "Traceback" not in result.stderr and not (project / "results").exists()
