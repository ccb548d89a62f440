"""The harvest's two steps, each run by ghsae.pipeline on one process or a dask worker:

- `plan_step`: claim the run folder, plan once (tokenise, probe, partition), write config.json
  and create the store;
- `write_shards`: produce and commit the listed shards of a planned run. Writing shard s overlaps
  computing shard s+1 (one background writer thread; zarr encodes and writes without holding the
  GIL for long, and torch's matmuls release it), so the forward pass, not the disk, sets the pace.

Both are idempotent: a done shard is skipped, a shard is written whole under its lock and only
counts once its record is renamed into place, so a task re-run after a worker's death is safe.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ghsae import faults
from ghsae.atomic import move_into_place
from ghsae.cache.store import (
    ROW_METADATA_BYTES,
    ActivationStore,
    StoreGeometry,
    damaged_metadata,
    repair_hint,
    restore_metadata,
)
from ghsae.config import PipelineConfig, config_from_dict
from ghsae.errors import ConfigError, DamagedFileError, RunDirError, StoreError
from ghsae.harvest.plan import PlanBuilder, check_model_fits, ensure_plan, model_plan_builder
from ghsae.harvest.rundir import claim_run_dir, prepare_run_dir
from ghsae.harvest.shards import ShardProducer, commit_shard
from ghsae.harvest.text import resolve_files
from ghsae.layout import STAGING_PREFIX, RunLayout
from ghsae.lm import LoadedModel, cached_model, check_same_model
from ghsae.locks import FileLock, hold_run, try_lock, wait_lock
from ghsae.records import ModelIdentity, Plan, RunConfig, load_record, save_record
from ghsae.run import Run, RunInfo
from ghsae.space import require_free

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSlice:
    """`--shard i/n`: this job runs shards i, i+n, i+2n, ..."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> ShardSlice:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard is {text!r}; expected i/n, for example 0/4") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard is {text!r}; expected 0 <= i < n")
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def select(self, n_shards: int) -> list[int]:
        return list(range(self.index, n_shards, self.count))


@dataclass(frozen=True)
class Written:
    shards: list[int]  # shards this process wrote (others may have been written by another process)
    tokens: int  # token positions of those shards


@dataclass
class HarvestSummary:
    run_dir: str
    shards_written: int
    tokens_written: int
    seconds: float
    info: RunInfo

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


# --- the plan step ------------------------------------------------------------------------------


def plan_step(cfg: PipelineConfig, layout: RunLayout, lm: LoadedModel, overwrite: bool, progress: bool) -> Run:
    """Claim the folder (marker, run lock, --overwrite), plan once, write config.json, create the store."""
    check_model_fits(cfg, lm)  # layers and groups against the model, before tokenising
    return claim_and_plan(cfg, layout, model_plan_builder(cfg, lm, progress), lm.identity, overwrite)


def claim_and_plan(
    cfg: PipelineConfig, layout: RunLayout, build: PlanBuilder, model: ModelIdentity, overwrite: bool
) -> Run:
    """The plan step of a direct harvest and of a derived run alike: claim, plan (with `build`),
    config.json, the store."""
    with claim_run_dir(layout, cfg, overwrite):
        plan = ensure_plan(layout, build)
        # prepare_run_dir checked before planning; a job of another config may have planned since
        check_plan_matches(layout, plan, cfg, model)
        write_run_config(layout, cfg)
        ensure_store(layout, plan, cfg)
        layout.manifest.mkdir(exist_ok=True)
        _clean_staging(layout)
    return Run(layout, plan)


def write_run_config(layout: RunLayout, cfg: PipelineConfig) -> None:
    """config.json, once; rewritten when missing or damaged (it is derived from the config alone)."""
    if layout.config.is_file():
        try:
            load_record(RunConfig, layout.config)
            return
        except DamagedFileError:
            log.warning(
                "%s is damaged; rewriting it from this command's config (the plan's hash matches)", layout.config
            )
    save_record(layout.config, RunConfig(cfg.identity(), cfg.to_dict(), cfg.identity_hash()))


def ensure_store(layout: RunLayout, plan: Plan, cfg: PipelineConfig) -> ActivationStore:
    """Create the store (staging + rename), or restore the metadata an existing one has lost."""
    if not layout.acts.is_dir():
        staging = layout.staging("store")
        _create_empty_store(staging, plan, cfg)
        move_into_place(staging, layout.acts)  # a job that lost the race uses the winner's (equal) store
    elif damaged_metadata(layout.acts, list(plan.group_names)):
        _restore_store_metadata(layout, plan, cfg)
    store = ActivationStore.open(layout.acts)
    if store.root.attrs.get("config_hash") != plan.config_hash:
        raise RunDirError(f"{layout.acts} belongs to another config; re-run with --overwrite to rebuild it")
    return store


def _create_empty_store(path: Path, plan: Plan, cfg: PipelineConfig) -> None:
    """The store's metadata, every array preallocated and no shard written: a pure function of plan and config."""
    geometry = StoreGeometry(
        n_shards=plan.n_shards,
        shard_rows=plan.shard_rows,
        d_model=plan.d_model,
        chunk_rows=cfg.storage.chunk_rows,
        dtype=cfg.storage.dtype,
        compression=cfg.storage.compression,
    )
    attrs = {"config_hash": plan.config_hash, "layers": list(plan.layers), "layer_groups": [list(g) for g in plan.groups]}
    ActivationStore.create(path, list(plan.group_names), geometry, attrs)


def _restore_store_metadata(layout: RunLayout, plan: Plan, cfg: PipelineConfig) -> None:
    """A zarr.json of the store was deleted or damaged: write it again from an empty store of the same
    plan. The shards keep their records; the re-check after the plan verifies each against its checksums."""
    staging = layout.staging("storemeta")
    try:
        _create_empty_store(staging, plan, cfg)
        restored = restore_metadata(layout.acts, staging, list(plan.group_names))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.warning(
        "%s had lost %d metadata files (%s); restored them from the plan",
        layout.acts,
        len(restored),
        ", ".join(str(p.relative_to(layout.acts)) for p in restored[:5]),
    )


def check_plan_matches(layout: RunLayout, plan: Plan, cfg: PipelineConfig, model: ModelIdentity) -> None:
    """Refuse to write shards for a plan made by another config or another model."""
    if plan.config_hash != cfg.identity_hash():
        raise RunDirError(
            f"{layout.plan} was made by config {plan.config_hash}, this command's is {cfg.identity_hash()}; "
            "use another --run-dir or pass --overwrite"
        )
    check_same_model(plan.model, model)


def plan_run(
    cfg: PipelineConfig, run_dir: str | Path, executor, *, overwrite: bool = False, progress: bool = True,
    lm: LoadedModel | None = None,
) -> Run:
    """Check the folder and the dataset (read-only, before the slow model load), then plan the run
    once: one task of `executor` (a ghsae.executors.Executor). Returns the planned run."""
    layout = RunLayout(Path(run_dir))
    prepare_run_dir(layout, cfg, overwrite)
    resolve_files(cfg.data.dataset)
    here = lm if executor.in_process else None
    executor.call(plan_task, cfg.to_dict(), str(run_dir), overwrite, executor.task_progress(progress), here)
    return Run.open(layout.root)


def plan_task(cfg_dict: dict, run_dir: str, overwrite: bool, progress: bool, lm: LoadedModel | None = None) -> int:
    """Claim the folder and plan the run (once, on one worker). Returns the shard count."""
    cfg = config_from_dict(cfg_dict)
    model = lm if lm is not None else cached_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
    return plan_step(cfg, RunLayout(Path(run_dir)), model, overwrite, progress).plan.n_shards


def recheck_done_shards(run: Run, shards: list[int]) -> list[int]:
    """Verify the done shards among `shards` against their records; forget those that fail, so they are
    written again (a flipped byte, a truncated file or a damaged record is repaired by re-running harvest)."""
    lost = damaged_metadata(run.layout.acts, list(run.plan.group_names))
    if lost:  # a store-wide problem, not the shards': their records stay (the plan step restores metadata)
        raise StoreError(f"{lost[0]} is missing or damaged; {repair_hint(run.layout.acts)}")
    bad = []
    for s in (s for s in shards if run.shard_done(s)):
        lock = try_lock(run.layout.lock(f"shard-{s:05d}"))
        if lock is None:
            continue  # another process is on this shard; it verifies or writes it
        with lock:
            problem = run.failing_shards([s], once=True).get(s)
            if problem is not None:
                log.warning("shard %d fails verification (%s); writing it again", s, problem)
                run.forget_shard(s)
                bad.append(s)
    return bad


# --- the shard step -----------------------------------------------------------------------------


def write_shards(run: Run, cfg: PipelineConfig, lm: LoadedModel, todo: list[int], progress: bool) -> Written:
    """Produce and commit the shards of `todo` that are not done yet, under the run lock (shared)."""
    with hold_run(run.layout):
        check_plan_matches(run.layout, run.plan, cfg, lm.identity)
        todo = [s for s in todo if not run.shard_done(s)]
        if not todo:
            return Written([], 0)
        return _write(run, cfg, lm, todo, progress)


def _write(run: Run, cfg: PipelineConfig, lm: LoadedModel, todo: list[int], progress: bool) -> Written:
    layout, plan, store = run.layout, run.plan, run.store
    tokens = run.tokens()
    require_free(layout.acts, shard_bytes(plan, store) * len(todo), f"{len(todo)} shards of {layout.root}")
    producer = ShardProducer(lm, plan, cfg.harvest.seed, cfg.harvest.batch_size, cfg.storage.dtype)
    per_shard = {s: len(range(*plan.shard_contexts(s))) * plan.context_length for s in todo}
    bar = tqdm(total=sum(per_shard.values()), unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    pending: Future | None = None
    written: list[int] = []
    held: list[FileLock] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
            for shard, lock in claim_shards(run, todo, held):
                t0 = time.perf_counter()
                rows, sums = producer.produce(tokens, shard, on_batch=bar.update)
                if pending is not None:
                    pending.result()  # at most one shard waits for the disk; errors surface here
                pending = writer.submit(
                    _commit_then_release, lock, layout, store, plan, shard, rows, sums, time.perf_counter() - t0
                )
                written.append(shard)
                bar.set_postfix(shard=shard)
            if pending is not None:
                pending.result()
    finally:
        for lock in held:
            lock.release()
    bar.close()
    return Written(written, sum(per_shard[s] for s in written))


def _commit_then_release(lock: FileLock, *args) -> None:
    try:
        commit_shard(*args)
    finally:
        lock.release()


def claim_shards(run: Run, todo: list[int], held: list[FileLock]) -> Iterator[tuple[int, FileLock]]:
    """Yield (shard, its lock) for each shard of `todo` this process should write.

    A shard locked by another process is skipped (and said so) and come back to at the end: then
    this process waits for the lock, and writes the shard only if the other one did not finish it
    (it may have been killed: its lock went with it). Every lock handed out is also put in `held`,
    so the caller can release it whatever happens.
    """
    deferred = []
    for s in todo:
        lock = try_lock(run.layout.lock(f"shard-{s:05d}"))
        if lock is None:
            log.warning("shard %d is being written by another process; skipping it for now", s)
            deferred.append(s)
            continue
        held.append(lock)
        if run.shard_done(s):
            lock.release()
            continue
        faults.point(f"shard-{s:05d}/claimed")
        yield s, lock
    for s in deferred:
        lock = wait_lock(run.layout.lock(f"shard-{s:05d}"), f"shard {s}")
        held.append(lock)
        if run.shard_done(s):
            log.warning("shard %d was written by the other process", s)
            lock.release()
            continue
        yield s, lock


def shard_bytes(plan: Plan, store: ActivationStore) -> int:
    """Upper bound of one shard's bytes on disk: every group's capacity, uncompressed, plus its sums."""
    g = store.geometry
    rows = g.shard_rows * len(plan.group_names) * (g.act_bytes_per_row + ROW_METADATA_BYTES)
    return rows + len(plan.layers) * g.d_model * 8


def _clean_staging(layout: RunLayout) -> None:
    """Remove staging folders left by killed processes of this host (not other hosts' live ones)."""
    for p in layout.root.glob(f"{STAGING_PREFIX}*"):
        parts = p.name.split("-")
        if len(parts) >= 3 and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summary_line(summary: HarvestSummary) -> str:
    info = summary.info
    mb = info.bytes_on_disk / 2**20
    ratio = info.storage_ratio
    return (
        f"harvested {summary.tokens_written:,} token positions in {summary.shards_written} shards "
        f"({summary.tokens_per_second:,.0f} tok/s); {info.shards_done}/{info.shards_total} shards done; "
        f"{len(info.groups)} groups over {len(info.layers)} layers; store {mb:,.1f} MiB, "
        f"{info.bytes_per_token or 0:,.0f} B/token vs {info.per_layer_bytes_per_token:,} B/token per-layer"
        + (f" ({ratio:.1f}x smaller)" if ratio else "")
        + f" -> {summary.run_dir}"
    )

