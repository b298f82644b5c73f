"""Send the files of DVC's run-cache records that `dvc push --run-cache` leaves behind.

    python -m flows.run_cache        # in a DVC workspace, after `dvc push --run-cache` or `dvc exp push --run-cache`

`--run-cache` pushes the records, but not the objects of a stage's uncached outputs
(history.csv, metrics.json: git keeps them in the workspace). A restore elsewhere would find
the record, miss those files and run the stage again. DVC saved the objects to the local cache
with each record; this pushes them to the default remote. It runs as a process of its own in
the workspace, because DVC resolves a record's outputs against the working directory.
"""

from __future__ import annotations


def push_run_cache_objects() -> None:
    """Push every run-cache record of this repository, then the objects its outputs need."""
    from dvc.repo import Repo

    with Repo() as repo:
        records = repo.stage_cache.push(None)
        for objects in repo.stage_cache.get_used_objs(records).values():
            repo.cloud.push(objects)  # an object missing here came from the remote: skipped


if __name__ == "__main__":
    push_run_cache_objects()
