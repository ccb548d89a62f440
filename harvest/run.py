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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ghsae.cache.manifest import Plan, load_plan, read_json, run_info, shard_done, write_json_atomic, write_run_stats
from ghsae.cache.store import ActivationStore, StoreGeometry
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, RunDirError
from ghsae.harvest.model import LoadedModel, load_model
from ghsae.harvest.plan import ensure_plan
from ghsae.harvest.shards import ShardProducer, commit_shard
from ghsae.harvest.text import resolve_files
from ghsae.layout import STAGING_PREFIX, RunLayout

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


def prepare_run_dir(layout: RunLayout, cfg: PipelineConfig, overwrite: bool) -> None:
    """Refuse a run folder that belongs to another config (or to nobody), unless asked to overwrite."""
    root = layout.root
    if not root.exists():
        return
    if not root.is_dir():
        raise RunDirError(f"run folder {root} is a file; choose a folder path for --run-dir")
    entries = [p for p in root.iterdir() if not p.name.startswith(STAGING_PREFIX)]
    if not entries:
        return
    if layout.config.is_file():
        diffs = _config_diffs(read_json(layout.config).get("identity", {}), cfg.identity())
    elif layout.plan.is_file():
        # killed between the plan's rename and config.json: the plan's hash still identifies the run
        planned = read_json(layout.plan)["config_hash"]
        diffs = (
            [] if planned == cfg.identity_hash() else [f"config hash {planned} in the run, {cfg.identity_hash()} now"]
        )
    else:
        raise RunDirError(
            f"{root} is not empty and holds no {layout.config.name}: not a ghsae run folder. "
            "Choose an empty or new folder for --run-dir"
        )
    if not diffs:
        return
    if overwrite:
        log.warning("--overwrite: removing run %s (its config differs: %s)", root, "; ".join(diffs))
        for p in root.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    raise RunDirError(
        f"{root} holds a run with a different config ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}). "
        "Use another --run-dir, or pass --overwrite to delete that run"
    )


def _config_diffs(old: dict, new: dict) -> list[str]:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} in the run, {b.get(key)!r} now")
    return diffs


def write_run_config(layout: RunLayout, cfg: PipelineConfig) -> None:
    if not layout.config.is_file():
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
    prepare_run_dir(layout, cfg, overwrite)
    resolve_files(cfg.data.dataset)  # fail on a missing dataset before the (slow) model load
    if lm is None:
        lm = load_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
    layout.root.mkdir(parents=True, exist_ok=True)
    plan = ensure_plan(cfg, lm, layout, progress)
    # prepare_run_dir checked before planning; a job of another config may have planned since
    check_plan_matches(layout, plan, cfg, lm)
    write_run_config(layout, cfg)
    store = ensure_store(layout, plan, cfg)
    layout.manifest.mkdir(exist_ok=True)
    if plan_only:
        return HarvestSummary(str(layout.root), 0, 0, 0.0, run_info(layout))
    todo = [s for s in shards.select(plan.n_shards) if not shard_done(layout, s)]
    t0 = time.perf_counter()
    tokens = write_shards(lm, cfg, layout, plan, store, todo, progress)
    seconds = time.perf_counter() - t0
    if all(shard_done(layout, s) for s in range(plan.n_shards)) and (todo or not layout.stats.is_file()):
        write_run_stats(layout, plan)
    summary = HarvestSummary(str(layout.root), len(todo), tokens, seconds, run_info(layout))
    _clean_staging(layout)
    return summary


def produce_shards(cfg: PipelineConfig, run_dir: str | Path, shards: list[int], lm: LoadedModel) -> int:
    """Write the listed shards of an already planned run (skipping done ones); returns token positions.

    The lean path for a worker that is handed a few shards: the run folder, plan and store were
    checked once by the plan step, so only what could differ per worker (config, model) is checked.
    """
    layout = RunLayout(Path(run_dir))
    plan = load_plan(layout)
    check_plan_matches(layout, plan, cfg, lm)
    todo = [s for s in shards if not shard_done(layout, s)]
    return write_shards(lm, cfg, layout, plan, ActivationStore.open(layout.acts), todo, progress=False)


def write_shards(lm, cfg: PipelineConfig, layout: RunLayout, plan: Plan, store, todo: list[int], progress: bool) -> int:
    tokens = np.load(layout.tokens, mmap_mode="r")
    producer = ShardProducer(lm, plan, cfg.harvest.seed, cfg.harvest.batch_size, cfg.storage.dtype)
    total = sum(len(range(*plan.shard_contexts(s))) for s in todo) * plan.context_length
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        for shard in todo:
            t0 = time.perf_counter()
            rows, stats = producer.produce(tokens, shard, on_batch=bar.update)
            if pending is not None:
                pending.result()  # at most one shard waits for the disk; errors surface here
            pending = writer.submit(commit_shard, layout, store, plan, shard, rows, stats, time.perf_counter() - t0)
            bar.set_postfix(shard=shard)
        if pending is not None:
            pending.result()
    bar.close()
    return total


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
