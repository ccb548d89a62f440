"""Fault injection for the dask tests, importable by worker processes (tests/ is put on their PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

from ghsae.distributed import shard_task

FAULT_DIR = "GHSAE_TEST_FAULT_DIR"
DOOMED_SHARD = 1


def die_once_mid_shard(cfg_dict: dict, run_dir: str, shard: int, threads: int | None) -> int:
    """The first attempt at DOOMED_SHARD leaves half-written garbage in its files, then kills its worker."""
    if shard == DOOMED_SHARD:
        try:
            fd = os.open(Path(os.environ[FAULT_DIR]) / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # the retry, on a fresh worker
        else:
            os.close(fd)
            for array in (Path(run_dir) / "acts.zarr").glob("*/*"):
                if (array / "zarr.json").is_file():
                    chunk = array / "c" / str(shard)
                    target = chunk / "0" if "acts" == array.name else chunk
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"half a shard" * 100)
            os._exit(1)  # the worker process dies; its nanny starts a new one
    return shard_task(cfg_dict, run_dir, shard, threads)
