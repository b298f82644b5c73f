"""Keras model files: saved atomically with reproducible bytes, loaded in safe mode after a hash check.

Apart from tasks.lib.io so that the stages that never touch a model (ingest, preprocess, split)
do not import, and so do not depend in dvc.yaml on, the model code a loaded model needs.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from tasks.lib.io import DataError, atomic_path, sha256_file, verify_sha256

log = logging.getLogger(__name__)

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# The package our layers and optimizer are registered under (keras.saving.register_keras_serializable).
_OUR_PACKAGE_PREFIX = "tasks>"


def _normalise_config(node):
    """A model config that depends on what the model is: not on how it was made, nor on where its code lives.

    Keras loads the file the same without:
    - `shared_object_id`s. A freshly built model's layers share one dtype policy object, which
      Keras writes once per layer with an id; a model loaded from a file has a policy per layer
      and no ids. Every occurrence carries its full config, so a resumed run writes the bytes an
      unbroken one does.
    - the Python module of the classes registered under our package (written as null, as Keras
      writes a class from `__main__`: a missing key would send Sequential to its legacy loader).
      Keras finds those classes by registered name (`tasks>ErfGelu`) before it looks at the
      module, so moving a class to another file changed every model's bytes and nothing else.
    """
    if isinstance(node, dict):
        ours = str(node.get("registered_name", "")).startswith(_OUR_PACKAGE_PREFIX)
        return {
            key: None if ours and key == "module" else _normalise_config(value)
            for key, value in node.items()
            if key != "shared_object_id"
        }
    if isinstance(node, list):
        return [_normalise_config(item) for item in node]
    return node


def _make_keras_archive_reproducible(path: Path) -> None:
    """Drop the save time, shared-object ids and our classes' modules from a .keras zip: equal weights, equal bytes.

    DVC hashes checkpoints and the model: without this, a rerun with identical weights
    would still change their hashes and rerun every stage below train.
    """
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, payload in members:
            if info.filename == "metadata.json":
                metadata = json.loads(payload)
                metadata.pop("date_saved", None)
                payload = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                payload = json.dumps(_normalise_config(json.loads(payload))).encode()
            archive.writestr(zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH), payload, info.compress_type)


def save_model(path: str | Path, model) -> str:
    """Save a Keras model atomically, byte-for-byte reproducibly, and return its sha256."""
    with atomic_path(path, suffix=".keras") as temporary:
        model.save(temporary)
        _make_keras_archive_reproducible(temporary)
        digest = sha256_file(temporary)
    return digest


def load_model(path: str | Path, sha256: str | None = None):
    """Load a Keras model in safe mode, refusing it first if its sha256 is not `sha256`."""
    import keras  # deferred: importing TensorFlow takes seconds and most callers need no model

    # tasks.lib.model registers the custom layers the saved models use; tasks.lib.optimizers the optimizer
    # a checkpoint saves with its state.
    import tasks.lib.optimizers  # noqa: F401
    from tasks.lib.model import computes_in, in_float32
    from tasks.lib.numerics import bf16_runs_here, keep_graph_arithmetic

    keep_graph_arithmetic()  # before the model's first graph
    if not Path(path).is_file():
        raise DataError(f"{path}: model file not found (run the train stage first)")
    if sha256 is not None:
        verify_sha256(path, sha256)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except ValueError as error:
        if "safe_mode" not in str(error):
            raise
        # Safe mode refuses layers that carry code (Lambda): such a file could run anything on load.
        raise DataError(f"{path}: refused: the model holds code that only loads outside safe mode ({error})") from None

    # A model trained in bfloat16 (native mode) used where bf16 cannot run (no bf16 instructions,
    # or oneDNN capped below them, as portable mode does): its float32 weights, computed in float32.
    if computes_in(model) == "bfloat16" and not bf16_runs_here():
        log.info("%s: trained in bfloat16, which cannot run here: computing in float32", path)
        model = in_float32(model)
    return model
