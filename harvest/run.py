"""`ghsae harvest`: check the run folder, plan once, then produce this job's shards.

Writing shard s overlaps computing shard s+1 (one background writer thread; zarr encodes and
writes without holding the GIL for long, and torch's matmuls release it), so the forward pass,
not the disk, sets the pace.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ghsae import faults
from ghsae.cache.manifest import (
    Plan,
    forget_shard,
    load_plan,
    read_json,
    require_tokens,
    run_info,
    shard_done,
    write_json_atomic,
    write_run_stats,
)
from ghsae.cache.store import ROW_METADATA_BYTES, ActivationStore, StoreGeometry
from ghsae.cache.verify import failing_shards
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, DamagedFileError, RunDirError
from ghsae.harvest.model import LoadedModel, load_model
from ghsae.harvest.plan import check_model_fits, ensure_plan
from ghsae.harvest.rundir import claim_run_dir, prepare_run_dir
from ghsae.harvest.shards import ShardProducer, commit_shard
from ghsae.harvest.text import resolve_files
from ghsae.layout import STAGING_PREFIX, RunLayout
from ghsae.locks import FileLock, hold_run, try_lock, wait_lock
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

    def select(self, n_shards: int) -> list[int]:
        return list(range(self.index, n_shards, self.count))


@dataclass
class HarvestSummary:
    run_dir: str
    shards_written: int
    tokens_written: int
    seconds: float
    info: dict

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


def write_run_config(layout: RunLayout, cfg: PipelineConfig) -> None:
    """config.json, once; rewritten when missing or damaged (it is derived from the config alone)."""
    if layout.config.is_file():
        try:
            read_json(layout.config)
            return
        except DamagedFileError:
            log.warning(
                "%s is damaged; rewriting it from this command's config (the plan's hash matches)", layout.config
            )
    write_json_atomic(
        layout.config, {"identity": cfg.identity(), "resolved": cfg.to_dict(), "hash": cfg.identity_hash()}
    )


def ensure_store(layout: RunLayout, plan: Plan, cfg: PipelineConfig) -> ActivationStore:
    if not layout.acts.is_dir():
        geometry = StoreGeometry(
            n_shards=plan.n_shards,
            shard_rows=plan.data["shard_rows"],
            d_model=plan.data["d_model"],
            chunk_rows=cfg.storage.chunk_rows,
            dtype=cfg.storage.dtype,
            compression=cfg.storage.compression,
        )
        staging = layout.staging(f"store-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        attrs = {"config_hash": plan.data["config_hash"], "layers": plan.layers, "layer_groups": plan.groups}
        ActivationStore.create(staging, plan.group_names, geometry, attrs)
        try:
            os.rename(staging, layout.acts)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not layout.acts.is_dir():
                raise
    store = ActivationStore.open(layout.acts)
    if store.root.attrs.get("config_hash") != plan.data["config_hash"]:
        raise RunDirError(f"{layout.acts} belongs to another config; re-run with --overwrite to rebuild it")
    return store


def check_plan_matches(layout: RunLayout, plan: Plan, cfg: PipelineConfig, lm: LoadedModel) -> None:
    """Refuse to write shards for a plan made by another config or another model."""
    if plan.data["config_hash"] != cfg.identity_hash():
        raise RunDirError(
            f"{layout.plan} was made by config {plan.data['config_hash']}, this command's is {cfg.identity_hash()}; "
            "use another --run-dir or pass --overwrite"
        )
    check_model_matches_plan(lm, plan)


def check_model_matches_plan(lm: LoadedModel, plan: Plan) -> None:
    expected = plan.data["model"]["fingerprint"]
    if lm.fingerprint != expected:
        raise RunDirError(
            f"this run was planned with model {plan.data['model']['source']} (fingerprint {expected}) but the model "
            f"loaded now has fingerprint {lm.fingerprint}; its weights or config changed. Use the original model "
            "or a new --run-dir"
        )


def harvest(
    cfg: PipelineConfig,
    run_dir: str | Path,
    shards: ShardSlice = ShardSlice(),
    overwrite: bool = False,
    plan_only: bool = False,
    progress: bool = True,
    lm: LoadedModel | None = None,
) -> HarvestSummary:
    layout = RunLayout(Path(run_dir))
    prepare_run_dir(layout, cfg, overwrite)  # read-only: a refused folder is refused before the slow load
    resolve_files(cfg.data.dataset)  # fail on a missing dataset before the (slow) model load
    if lm is None:
        lm = load_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
    check_model_fits(cfg, lm)  # layers and groups against the model, before tokenising
    with claim_run_dir(layout, cfg, overwrite):
        plan = ensure_plan(cfg, lm, layout, progress)
        # prepare_run_dir checked before planning; a job of another config may have planned since
        check_plan_matches(layout, plan, cfg, lm)
        write_run_config(layout, cfg)
        store = ensure_store(layout, plan, cfg)
        layout.manifest.mkdir(exist_ok=True)
        selected = shards.select(plan.n_shards)
        recheck_done_shards(layout, plan, store, selected)
        if plan_only:
            return HarvestSummary(str(layout.root), 0, 0, 0.0, run_info(layout))
        todo = [s for s in selected if not shard_done(layout, s)]
        t0 = time.perf_counter()
        written = write_shards(lm, cfg, layout, plan, store, todo, progress)
        seconds = time.perf_counter() - t0
        if all(shard_done(layout, s) for s in range(plan.n_shards)) and (written.shards or not layout.stats.is_file()):
            write_run_stats(layout, plan)
        summary = HarvestSummary(str(layout.root), len(written.shards), written.tokens, seconds, run_info(layout))
        _clean_staging(layout)
    return summary


def recheck_done_shards(layout: RunLayout, plan: Plan, store: ActivationStore, shards: list[int]) -> list[int]:
    """Verify the done shards among `shards` against their records; forget those that fail, so they are
    written again (a flipped byte, a truncated file or a damaged record is repaired by re-running harvest)."""
    bad = []
    for s in (s for s in shards if shard_done(layout, s)):
        lock = try_lock(layout.lock(f"shard-{s:05d}"))
        if lock is None:
            continue  # another process is on this shard; it verifies or writes it
        with lock:
            problem = failing_shards(layout, plan, store, [s]).get(s)
            if problem is not None:
                log.warning("shard %d fails verification (%s); writing it again", s, problem)
                forget_shard(layout, s)
                bad.append(s)
    return bad


def produce_shards(cfg: PipelineConfig, run_dir: str | Path, shards: list[int], lm: LoadedModel) -> int:
    """Write the listed shards of an already planned run (skipping done ones); returns token positions.

    The lean path for a worker that is handed a few shards: the run folder, plan and store were
    checked once by the plan step, so only what could differ per worker (config, model) is checked.
    """
    layout = RunLayout(Path(run_dir))
    with hold_run(layout):
        plan = load_plan(layout)
        check_plan_matches(layout, plan, cfg, lm)
        todo = [s for s in shards if not shard_done(layout, s)]
        return write_shards(lm, cfg, layout, plan, ActivationStore.open(layout.acts), todo, progress=False).tokens


@dataclass(frozen=True)
class Written:
    shards: list[int]  # shards this process wrote (others may have been written by another process)
    tokens: int  # token positions of those shards


def write_shards(
    lm, cfg: PipelineConfig, layout: RunLayout, plan: Plan, store, todo: list[int], progress: bool
) -> Written:
    if not todo:
        return Written([], 0)
    tokens = np.load(require_tokens(layout), mmap_mode="r")
    require_free(layout.acts, shard_bytes(plan, store) * len(todo), f"{len(todo)} shards of {layout.root}")
    producer = ShardProducer(lm, plan, cfg.harvest.seed, cfg.harvest.batch_size, cfg.storage.dtype)
    per_shard = {s: len(range(*plan.shard_contexts(s))) * plan.context_length for s in todo}
    bar = tqdm(total=sum(per_shard.values()), unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    pending: Future | None = None
    written: list[int] = []
    held: list[FileLock] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
            for shard, lock in claim_shards(layout, todo, held):
                t0 = time.perf_counter()
                rows, stats = producer.produce(tokens, shard, on_batch=bar.update)
                if pending is not None:
                    pending.result()  # at most one shard waits for the disk; errors surface here
                pending = writer.submit(
                    _commit_then_release, lock, layout, store, plan, shard, rows, stats, time.perf_counter() - t0
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


def claim_shards(layout: RunLayout, todo: list[int], held: list[FileLock]) -> Iterator[tuple[int, FileLock]]:
    """Yield (shard, its lock) for each shard of `todo` this process should write.

    A shard locked by another process is skipped (and said so) and come back to at the end: then
    this process waits for the lock, and writes the shard only if the other one did not finish it
    (it may have been killed: its lock went with it). Every lock handed out is also put in `held`,
    so the caller can release it whatever happens.
    """
    deferred = []
    for s in todo:
        lock = try_lock(layout.lock(f"shard-{s:05d}"))
        if lock is None:
            log.warning("shard %d is being written by another process; skipping it for now", s)
            deferred.append(s)
            continue
        held.append(lock)
        if shard_done(layout, s):
            lock.release()
            continue
        faults.point(f"shard-{s:05d}/claimed")
        yield s, lock
    for s in deferred:
        lock = wait_lock(layout.lock(f"shard-{s:05d}"), f"shard {s}")
        held.append(lock)
        if shard_done(layout, s):
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
    mb = info["bytes_on_disk"] / 2**20
    ratio = info["storage_ratio"]
    return (
        f"harvested {summary.tokens_written:,} token positions in {summary.shards_written} shards "
        f"({summary.tokens_per_second:,.0f} tok/s); {info['shards_done']}/{info['shards_total']} shards done; "
        f"{len(info['groups'])} groups over {len(info['layers'])} layers; store {mb:,.1f} MiB, "
        f"{info['bytes_per_token'] or 0:,.0f} B/token vs {info['per_layer_bytes_per_token']:,} B/token per-layer"
        + (f" ({ratio:.1f}x smaller)" if ratio else "")
        + f" -> {summary.run_dir}"
    )


def dumps_info(info: dict) -> str:
    return json.dumps(info, indent=1)
