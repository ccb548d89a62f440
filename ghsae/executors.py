"""Where a stage's tasks run: this process, or a dask.distributed cluster (a LocalCluster for
`--workers N`, or a running scheduler for `--scheduler ADDRESS`, e.g. one dask-jobqueue started on
SLURM).

No coordinator of our own: the run folder is the state. A task is "plan the run", "produce these
shards", "train this group" or "write the report", and each is idempotent (a done shard is
skipped, a shard is written whole and counts once its record is renamed into place, a fit resumes
from its checkpoint), so when a worker dies, dask hands its task to another and the result is the
same as if nothing had happened. ghsae.pipeline submits the tasks; the executor decides only where
and how they run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from ghsae.errors import ConfigError

log = logging.getLogger(__name__)

SCHEDULER_TIMEOUT_S = 20  # connecting to --scheduler; a dead address fails after this
TASK_RETRIES = 3  # attempts after a task's own failure; a dying worker is covered by dask's allowed-failures


@runtime_checkable
class Executor(Protocol):
    """Where a stage's tasks run. A new executor (a process pool, a job queue) implements these five
    members; ghsae.pipeline needs nothing else of it."""

    in_process: bool
    """Tasks run in the caller's process (they may share its memory and show their own bars)."""

    @property
    def workers(self) -> int:
        """Workers that run tasks now (1 in process)."""
        ...

    def call(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) as one task; its result."""
        ...

    def map(self, fn: Callable, items: Sequence, *args: Any, desc: str = "", unit: str = "task") -> list:
        """fn(item, *args) for each item, each an idempotent task; the results in the order of items."""
        ...

    def split(self, items: list) -> list[list]:
        """items cut into the units one task handles."""
        ...

    def task_progress(self, progress: bool) -> bool:
        """Whether a task should draw its own progress bars."""
        ...


class InProcess:
    """Every task in this process, in order. Shards go to one task, so writing one shard overlaps
    computing the next (harvest/steps.py); the tasks' own progress bars show."""

    in_process = True
    workers = 1  # a constant here, a live count on a cluster

    def call(self, fn: Callable, *args: Any) -> Any:
        return fn(*args)

    def map(self, fn: Callable, items: Sequence, *args: Any, desc: str = "", unit: str = "task") -> list:
        return [fn(item, *args) for item in items]

    def split(self, items: list) -> list[list]:
        return [items] if items else []

    def task_progress(self, progress: bool) -> bool:
        return progress


class DaskCluster:
    """Tasks on a dask cluster through `client`, one unit of work per task, retried on failure."""

    in_process = False

    def __init__(self, client: Any, progress: bool = True):
        self.client = client
        self.progress = progress
        n = self.workers
        # split this host's cores between a LocalCluster's workers; a remote cluster sets its own
        self.threads = max(1, (os.cpu_count() or 1) // n) if n and client.cluster is not None else None

    @property
    def workers(self) -> int:
        """Workers connected now (on a scheduler, workers may join after the client)."""
        return len(self.client.scheduler_info().get("workers", {}))

    def call(self, fn: Callable, *args: Any) -> Any:
        return self.client.submit(_with_threads, self.threads, fn, *args, pure=False).result()

    def map(self, fn: Callable, items: Sequence, *args: Any, desc: str = "", unit: str = "task") -> list:
        """One task per item; results in the order of `items`. A task that failed every retry raises
        here, with its traceback."""
        from dask.distributed import as_completed

        futures = [
            self.client.submit(
                _with_threads,
                self.threads,
                fn,
                item,
                *args,
                key=f"ghsae-{getattr(fn, '__name__', 'task')}-{_key(item)}-{os.getpid()}",
                retries=TASK_RETRIES,
                pure=False,
            )
            for item in items
        ]
        with tqdm(total=len(futures), unit=unit, desc=f"{desc} on {self.workers} workers", disable=not self.progress) as bar:
            for future in as_completed(futures):
                future.result()
                bar.update()
        return [f.result() for f in futures]

    def split(self, items: list) -> list[list]:
        return [[item] for item in items]

    def task_progress(self, progress: bool) -> bool:
        return False  # a worker's bars would interleave; the client shows one bar over the tasks



def _key(item: Any) -> str:
    if isinstance(item, (list, tuple)):
        return "-".join(str(i) for i in item)
    return str(item)


def _with_threads(threads: int | None, fn: Callable, *args: Any) -> Any:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


@contextmanager
def open_executor(workers: int | None = None, scheduler: str | None = None, progress: bool = True) -> Iterator[Executor]:
    """This process (neither given), a new LocalCluster of `workers` processes, or the scheduler at
    `scheduler`; a cluster is closed on leaving."""
    if workers is not None and scheduler:
        raise ConfigError("pass --workers N (a local cluster) or --scheduler ADDRESS (a running one), not both")
    if workers is None and not scheduler:
        yield InProcess()
        return
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except ValueError as e:  # dask's address parsing: no port, an unknown scheme (http://)
            raise ConfigError(
                f"--scheduler is {scheduler!r}, not a dask scheduler address ({e}); expected one like "
                "tcp://host:8786, as `dask scheduler` prints it"
            ) from None
        except (OSError, TimeoutError) as e:
            raise ConfigError(
                f"cannot reach the dask scheduler at {scheduler} within {SCHEDULER_TIMEOUT_S} s ({type(e).__name__}); "
                "start it (dask scheduler, or your cluster's job) or check --scheduler, then re-run"
            ) from None
        with client:
            yield DaskCluster(client, progress)
        return
    if workers is None or workers < 1:
        raise ConfigError(f"--workers is {workers}; expected a positive number of worker processes")
    workers = capped_workers(workers)
    # one thread per process: torch parallelises inside a task, and two tasks per process would
    # share (and fight over) one model copy
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield DaskCluster(client, progress)


def usable_cores() -> int:
    """The cores this process may run on (a cluster job's allocation, not the whole host)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def capped_workers(workers: int) -> int:
    """--workers, at most one per usable core: each worker is a process with its own model copy, so
    more workers than cores only add memory and contention (1,000 on 2 cores once started them all)."""
    cores = usable_cores()
    if workers > cores:
        log.warning("--workers %d is more than the %d cores this machine gives ghsae; starting %d workers", workers, cores, cores)
        return cores
    return workers


def worker_index() -> int:
    """This dask worker's number (for spreading workers over several GPUs); 0 outside a worker."""
    try:
        from dask.distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return int(name) if isinstance(name, int) or str(name).isdigit() else abs(hash(name))
