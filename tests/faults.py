"""Fault injection for the dask tests, importable by worker processes (tests/ is put on their PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

from ghsae.cache.store import ARRAYS, ActivationStore
from ghsae.pipeline import shards_task

FAULT_DIR = "GHSAE_TEST_FAULT_DIR"
DOOMED_SHARD = 1


def die_once_mid_shard(shards: list[int], cfg_dict: dict, run_dir: str, progress: bool, lm=None):
    """The first attempt at DOOMED_SHARD leaves half-written garbage in its files, then kills its worker."""
    if DOOMED_SHARD in shards:
        try:
            fd = os.open(Path(os.environ[FAULT_DIR]) / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # the retry, on a fresh worker
        else:
            os.close(fd)
            store = ActivationStore.open(Path(run_dir) / "acts.zarr")
            for group in store.groups:
                for name in ARRAYS:
                    target = store.shard_file(group, name, DOOMED_SHARD)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"half a shard" * 100)
            os._exit(1)  # the worker process dies; its nanny starts a new one
    return shards_task(shards, cfg_dict, run_dir, progress, lm)
