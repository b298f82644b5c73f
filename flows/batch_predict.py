"""Batch inference: predict every new image in a folder exactly once, now or on a cron schedule.

    python -m flows.batch_predict INCOMING --out RESULTS [--model prod] [--resize]
    python -m flows.batch_predict INCOMING --out RESULTS --serve [--cron "*/15 * * * *"]

Each run writes one CSV into RESULTS (atomically: a whole batch or none) with a row per new
image: path, sha256 of its content, predicted class, the probability of every class, or why it
was skipped. An image is new when no batch file in RESULTS holds its sha256, so a renamed or
copied file is not predicted again and a run that died before writing its batch leaves nothing
behind that would stop the next run from predicting those images. No file stops a batch: a
skipped one (unreadable, oversized, a decompression bomb, a link out of INCOMING) is recorded
with its reason and tried again when its content changes, or when --resize now applies. Run
once, the exit status is 2 when the batch skipped a file, as for tasks.predict. Each batch is
compared with the model's reference profile of its test set (tasks.lib.drift): the verdict, `no drift`
or `drift: <features>`, is logged, written beside the batch (.drift.json) and a Prefect artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import flow, serve, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from tasks.lib.cli import EXIT_BAD_INPUT, filter_native_stderr
from tasks.lib.drift import DriftReport
from tasks.lib.io import DataError, atomic_path, write_json
from tasks.lib.numerics import apply_numerics
from tasks.lib.params import ParamsError, load_params
from tasks.predict import ImageSource, image_sources, predict_sources, prod_revision, resolve_model

log = logging.getLogger("flows.batch_predict")

BATCH_GLOB = "batch-*.csv"
BATCH_RECORD = ("sha256", "skipped", "resize")  # the columns that say what a batch has done
DRIFT_TABLE_HEADER = "| feature | score (PSI; class_mix: chi-square p) | |\n|---|---|---|"


def already_done(batches: list[Path], resize: bool) -> set[str]:
    """The content keys that the batches hold and that a run with `resize` need not try again."""
    done: set[str] = set()
    for batch in batches:
        table = pd.read_csv(batch, usecols=lambda column: column in BATCH_RECORD, dtype=str, keep_default_na=False)
        if resize:  # a file skipped without --resize gets another try: resizing may convert it now
            tried_with_resize = table["resize"] == "True" if "resize" in table else False
            table = table[(table["skipped"] == "") | tried_with_resize]
        done.update(table["sha256"])
    return done


def content_key(source: ImageSource) -> str:
    """The sha256 of the source's content; of its name and stamp when it cannot be read (predict says why)."""
    try:
        return hashlib.sha256(source.read()).hexdigest()
    except (DataError, OSError):
        # Unread, so keyed by name and stamp: a change to the file (or its link) gets it tried again.
        return hashlib.sha256(f"unread\0{source.name}\0{source.stamp}".encode()).hexdigest()


@task(cache_policy=NO_CACHE, persist_result=False)
def unseen_images(incoming: Path, results: Path, resize: bool, max_bytes: int) -> list[tuple[ImageSource, str]]:
    """(image, content key) under `incoming` for each content that no batch in `results` has done."""
    seen = already_done(sorted(results.glob(BATCH_GLOB)), resize)
    fresh = []
    for source in image_sources([incoming], max_bytes):
        digest = content_key(source)
        if digest not in seen:
            seen.add(digest)
            fresh.append((source, digest))
    log.info("%d new images under %s", len(fresh), incoming)
    return fresh


@task(cache_policy=NO_CACHE, persist_result=False)
def predict_batch(images: list[tuple[ImageSource, str]], root: Path, model: str, resize: bool, results: Path) -> Path:
    """Predict `images` and write them, and the skipped ones with their reason, as one new batch file."""
    params = load_params(root / "params.yaml")
    with resolve_model(model, params, root) as predictor:
        predictions = predict_sources(
            [source for source, _ in images], predictor, resize=resize, max_pixels=params.predict.max_pixels
        )
    table, skipped = predictions.table, predictions.skipped
    for name, why in skipped:
        log.warning("skipped %s: %s", name, why)
    skipped_rows = pd.DataFrame({"path": [name for name, _ in skipped], "skipped": [why for _, why in skipped]})
    batch = pd.concat([table.assign(skipped=""), skipped_rows], ignore_index=True)
    batch.insert(1, "sha256", batch["path"].map({source.name: digest for source, digest in images}))
    batch["resize"] = resize
    # Named by time and content: a sorted listing reads in arrival order, and two runs never collide.
    digest = hashlib.sha256("".join(sorted(digest for _, digest in images)).encode()).hexdigest()[:8]
    path = results / f"batch-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest}.csv"
    results.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as temporary:
        batch.to_csv(temporary, index=False)
    verdict = record_drift(predictions.drift, path)
    create_table_artifact(
        table=batch[["path", "predicted", "skipped"]].fillna("").to_dict("records"),
        key="cifar10-batch-predictions",
        description=f"{len(table)} images predicted, {len(skipped)} skipped; {verdict}: {path}",
    )
    return path


def record_drift(drift: DriftReport | None, batch: Path) -> str:
    """Write the batch's drift report beside it (.drift.json) and as a Prefect artifact; its verdict."""
    if drift is None:
        return "no drift verdict: the model has no reference profile"
    write_json(batch.with_suffix(".drift.json"), drift.as_dict())
    rows = [
        f"| {name} | {score} | {'drift' if name in drift.drifted else ''} |" for name, score in drift.scores.items()
    ]
    create_markdown_artifact(
        key="cifar10-batch-drift",
        markdown="\n".join(
            [f"**{drift.verdict}** ({drift.images} images, {batch.name})", "", DRIFT_TABLE_HEADER, *rows]
        ),
        description=f"{batch.name}: {drift.verdict}",
    )
    log.log(logging.WARNING if drift.drifted else logging.INFO, "%s: %s", batch.name, drift.verdict)
    return drift.verdict


@flow(name="cifar10-batch-predict", persist_result=False)
def batch_predict(incoming: str, results: str, model: str = "prod", resize: bool = False, root: str = ".") -> str:
    """Predict the images under `incoming` that no batch in `results` holds; the new batch file ("" if none)."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    # Before TensorFlow is imported in this process: the same numbers as the evaluate stage.
    apply_numerics(params.numerics)
    fresh = unseen_images(Path(incoming).resolve(), Path(results).resolve(), resize, params.predict.max_file_bytes)
    if not fresh:
        return ""
    return str(predict_batch(fresh, root_path, model, resize, Path(results).resolve()))


def main() -> None:
    """Entry point for `python -m flows.batch_predict`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("incoming", help="folder of images (PNG, JPEG; zips too)")
    parser.add_argument("--out", required=True, help="folder of batch CSV files (and the record of what was done)")
    parser.add_argument("--model", default="prod", help="prod (default), workspace, or a git revision")
    parser.add_argument("--resize", action="store_true", help="convert other sizes and modes instead of skipping")
    parser.add_argument("--serve", action="store_true", help="serve as a deployment on --cron instead of running once")
    parser.add_argument("--cron", default="*/15 * * * *", help="schedule with --serve (default: every 15 minutes)")
    arguments = parser.parse_args()
    filter_native_stderr()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parameters = {
        "incoming": str(Path(arguments.incoming).resolve()),
        "results": str(Path(arguments.out).resolve()),
        "model": arguments.model,
        "resize": arguments.resize,
        "root": str(Path.cwd()),
    }
    if not arguments.serve:
        try:
            if arguments.model == "prod":  # before the flow: a missing prod is bad input, not a failed task
                prod_revision(load_params("params.yaml"), Path.cwd())
            batch = batch_predict(**parameters)
        except (ParamsError, DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        # As tasks.predict: exit 2 when this batch skipped a file (each is logged with its reason).
        skipped = batch and (pd.read_csv(batch, usecols=["skipped"], keep_default_na=False)["skipped"] != "").any()
        sys.exit(EXIT_BAD_INPUT if skipped else 0)
    deployment = batch_predict.to_deployment(
        name="batch",
        cron=arguments.cron,
        parameters=parameters,
        # One batch at a time: two overlapping runs would both see the same images as new.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    )
    serve(deployment, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
