"""Harvest and fit on a dask.distributed cluster: a LocalCluster (`--workers N`) or a running
scheduler (`--scheduler ADDRESS`, for example one started by dask-jobqueue on SLURM).

No coordinator of our own: the run folder is the state. A task is "produce shard s" or "train
group g", and both are idempotent: a shard task skips a shard whose completion record exists and
otherwise writes the whole shard (its bytes are a pure function of config, seed and shard), a fit
task resumes from the group's checkpoint. So when a worker dies, dask hands its task to another
worker and the result is the same as if nothing had happened. Each worker process loads the model
once and keeps it for every shard it is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ghsae.config import PipelineConfig, config_from_dict
from ghsae.errors import ConfigError

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after a task's own failure; a dying worker is covered by dask's allowed-failures


@contextmanager
def cluster_client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A dask Client on a new LocalCluster of `workers` processes, or on the scheduler at `scheduler`."""
    from dask.distributed import Client, LocalCluster

    if workers and scheduler:
        raise ConfigError("pass --workers N (a local cluster) or --scheduler ADDRESS (a running one), not both")
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if not workers or workers < 1:
        raise ConfigError(f"--workers is {workers}; expected a positive number of worker processes")
    # one thread per process: torch parallelises inside a task, and two tasks per process would
    # share (and fight over) one model copy
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


# --- worker side ------------------------------------------------------------------------------

_MODELS: dict[tuple, Any] = {}  # per worker process: the loaded model, reused across tasks


def _worker_setup(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _worker_model(cfg: PipelineConfig):
    from ghsae.harvest.model import load_model

    key = (cfg.model.path, cfg.model.device, cfg.model.dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker: a new config's model replaces the old one
        _MODELS[key] = load_model(*key)
    return _MODELS[key]


def plan_task(cfg_dict: dict, run_dir: str, overwrite: bool, threads: int | None) -> int:
    """Check the run folder, tokenise, probe and partition (once, on one worker). Returns the shard count."""
    from ghsae.harvest.run import harvest

    _worker_setup(threads)
    cfg = config_from_dict(cfg_dict)
    summary = harvest(cfg, run_dir, overwrite=overwrite, plan_only=True, progress=False, lm=_worker_model(cfg))
    return int(summary.info["shards_total"])


def shard_task(cfg_dict: dict, run_dir: str, shard: int, threads: int | None) -> int:
    """Produce one shard (skipped when already done). Returns the token positions written."""
    from ghsae.harvest.run import produce_shards

    _worker_setup(threads)
    cfg = config_from_dict(cfg_dict)
    return produce_shards(cfg, run_dir, [shard], _worker_model(cfg))


def fit_task(cfg_dict: dict, run_dir: str, group: str, allow_partial: bool, threads: int | None):
    """Train one group's SAE (resuming from its checkpoint); on a GPU host, one GPU per worker."""
    import torch

    from ghsae.train.fit import fit

    _worker_setup(threads)
    cfg = config_from_dict(cfg_dict)
    if cfg.fit.device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        cfg.fit.device = f"cuda:{_worker_index() % torch.cuda.device_count()}"
    return fit(cfg, run_dir, [group], allow_partial, progress=False)[0]


def _worker_index() -> int:
    from dask.distributed import get_worker

    name = get_worker().name
    return int(name) if isinstance(name, int) or str(name).isdigit() else abs(hash(name))


# --- client side ------------------------------------------------------------------------------


def _threads_per_worker(client) -> int | None:
    """Split this host's cores between a LocalCluster's workers; a remote cluster sets its own."""
    n = len(client.scheduler_info().get("workers", {}))
    return max(1, (os.cpu_count() or 1) // n) if n and client.cluster is not None else None


def harvest_on_cluster(
    cfg: PipelineConfig,
    run_dir: Path,
    client,
    overwrite: bool = False,
    progress: bool = True,
    shard_fn: Callable = shard_task,
):
    """Plan on one worker, then spread the shards over all of them; returns the HarvestSummary."""
    import time

    from dask.distributed import as_completed

    from ghsae.cache.manifest import load_plan, run_info, shard_done, write_run_stats
    from ghsae.harvest.run import HarvestSummary, prepare_run_dir
    from ghsae.harvest.text import resolve_files
    from ghsae.layout import RunLayout

    cfg_dict, run = cfg.to_dict(), str(run_dir)
    prepare_run_dir(RunLayout(Path(run_dir)), cfg, overwrite)  # refuse a wrong folder before any worker starts
    resolve_files(cfg.data.dataset)
    threads = _threads_per_worker(client)
    n_shards = client.submit(plan_task, cfg_dict, run, overwrite, threads, pure=False).result()
    layout = RunLayout(Path(run_dir))
    todo = [s for s in range(n_shards) if not shard_done(layout, s)]
    t0 = time.perf_counter()
    futures = [
        client.submit(shard_fn, cfg_dict, run, s, threads, key=f"ghsae-shard-{s}-{os.getpid()}", retries=TASK_RETRIES)
        for s in todo
    ]
    tokens = 0
    with tqdm(
        total=len(futures),
        unit="shard",
        desc=f"harvest on {len(client.scheduler_info()['workers'])} workers",
        disable=not progress,
    ) as bar:
        for future in as_completed(futures):
            tokens += future.result()  # a task that failed every retry raises here, with its traceback
            bar.update()
    seconds = time.perf_counter() - t0
    plan = load_plan(layout)
    if all(shard_done(layout, s) for s in range(plan.n_shards)):
        write_run_stats(layout, plan)
    return HarvestSummary(str(layout.root), len(todo), tokens, seconds, run_info(layout))


def fit_on_cluster(
    cfg: PipelineConfig,
    run_dir: Path,
    client,
    groups: list[str] | None = None,
    allow_partial: bool = False,
    progress: bool = True,
):
    """One task per group; each resumes from its own checkpoint. Returns FitResults in group order."""
    from dask.distributed import as_completed

    from ghsae.cache.manifest import load_plan
    from ghsae.layout import RunLayout
    from ghsae.train.fit import selected_groups

    names = selected_groups(load_plan(RunLayout(Path(run_dir))), groups)
    threads = _threads_per_worker(client)
    futures = {
        g: client.submit(
            fit_task,
            cfg.to_dict(),
            str(run_dir),
            g,
            allow_partial,
            threads,
            key=f"ghsae-fit-{g}-{os.getpid()}",
            retries=TASK_RETRIES,
        )
        for g in names
    }
    with tqdm(total=len(futures), unit="SAE", desc="fit", disable=not progress) as bar:
        for _ in as_completed(list(futures.values())):
            bar.update()
    return [futures[g].result() for g in names]
