"""Group SAEs measured against per-layer SAEs from one model pass.

Every layer is harvested once into an all-layers run; each grouping's store is derived from it
(harvest/derive.py, byte for byte what a direct harvest would store), and per-layer SAEs train on
the all-layers run itself. `ghsae run` keeps the all-layers run inside the grouped one
(RUN/per-layer) and trains per-layer SAEs at a few spot layers (compare.per_layer); `ghsae sweep`
(ghsae/sweep.py) derives one run per G beside a fully fitted all-layers run. With compare.seeds = N
each arm is trained N times (seed_config): the report and the sweep page give every gap a standard
error across seeds beside the one across eval contexts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ghsae.atomic import link_or_copy
from ghsae.cache.store import ROW_METADATA_BYTES
from ghsae.config import GroupsSpec, PipelineConfig
from ghsae.errors import ConfigError
from ghsae.executors import Executor
from ghsae.harvest import canonical_distance, distance_matrix, solve_grouping
from ghsae.harvest.partition import partition_scope
from ghsae.harvest.steps import plan_run
from ghsae.layers import span
from ghsae.layout import ACTS_STORE, DERIVED_FILE, MANIFEST_DIR, MARKER_FILE, PLAN_DIR, SAE_FILES, RunLayout
from ghsae.records import Plan
from ghsae.run import Run
from ghsae.space import free_bytes, human

log = logging.getLogger(__name__)


def per_layer_config(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with every layer a group of its own: the all-layers run (and per-layer baseline)."""
    return dataclasses.replace(cfg, grouping=dataclasses.replace(cfg.grouping, groups="per-layer"))


def all_layers_bytes(plan: Plan) -> int:
    """Capacity of an all-layers store for this plan's tokens and layers (uncompressed, float16)."""
    return plan.n_shards * plan.shard_rows * len(plan.layers) * (plan.d_model * 2 + ROW_METADATA_BYTES)


SPOT_POSITIONS = ("first", "middle", "last")


def spot_layers(plan: Plan, cfg: PipelineConfig) -> list[int]:
    """compare.spot_layers, or one layer of every multi-layer group, its place in the group taken in
    turn first, middle, last along the groups. A group SAE is likely best at its middle and worst at
    its ends, so the middle alone would flatter it; the turns sample every place at a third of the
    cost of all three in every group (compare.spot_layers lists them all where that is wanted). A
    singleton group has none: its SAE is a per-layer SAE of that layer already."""
    if cfg.compare.spot_layers:
        return sorted(set(cfg.compare.spot_layers))
    multi = [g for g in plan.groups if len(g) > 1]
    picks = {"first": lambda g: g[0], "middle": lambda g: g[len(g) // 2], "last": lambda g: g[-1]}
    return sorted(picks[SPOT_POSITIONS[i % 3]](g) for i, g in enumerate(multi))


def seed_config(cfg: PipelineConfig, seed: int, *, layer_draw: bool = True) -> PipelineConfig:
    """`cfg` for seed `seed` of a comparison's arm: seed added to fit.seed (the SAE's initialisation and
    loader order) and, with `layer_draw` (a grouped run), to harvest.seed (which layer each token is
    drawn at). Per-layer SAEs have no layer draw: their seeds share one store. Seed 0 is `cfg` itself."""
    if seed == 0:
        return cfg
    fit = dataclasses.replace(cfg.fit, seed=cfg.fit.seed + seed)
    harvest = dataclasses.replace(cfg.harvest, seed=cfg.harvest.seed + seed) if layer_draw else cfg.harvest
    return dataclasses.replace(cfg, fit=fit, harvest=harvest)


@dataclass(frozen=True)
class SourceSize:
    """Whether an all-layers store (and the stores to derive from it) fits where it would be written."""

    needed: int  # bytes: the all-layers store plus every derived store, uncompressed capacity
    limit: int  # compare.max_source_bytes, or the free disk
    limited_by: str

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit

    def refusal(self) -> str:
        return (
            f"an all-layers store for these tokens (with the stores derived from it) would take {human(self.needed)} "
            f"({self.needed:,} bytes), over {self.limited_by} ({human(self.limit)})"
        )


def n_groups(source: Run, cfg: PipelineConfig, spec: GroupsSpec) -> int:
    """G of grouping `spec` on the all-layers run's layers (auto: on its probe), counted as
    grouping.groups counts it: without the layers that keep an SAE of their own (`stored_groups`)."""
    if spec == "per-layer":
        return len(source.plan.layers)
    if isinstance(spec, int):
        return spec
    if isinstance(spec, list):
        return len(spec)
    with np.load(source.layout.similarity) as sim:
        dist = distance_matrix(sim, canonical_distance(cfg.grouping.distance))
    gc = cfg.grouping
    return solve_grouping(dist, gc.method, gc.objective, gc.last_layer).auto_groups(gc.amad_threshold)


def stored_groups(source: Run, cfg: PipelineConfig, spec: GroupsSpec) -> int:
    """Groups a store of grouping `spec` holds: its G plus the layers after the partition's scope
    (the last, with grouping.last_layer = own), which are groups of their own."""
    g = n_groups(source, cfg, spec)
    if spec == "per-layer" or isinstance(spec, list):
        return g
    n = len(source.plan.layers)
    return g + n - partition_scope(n, cfg.grouping.last_layer, spec)


def plan_all_layers(
    cfg: PipelineConfig, source_dir: Path, executor: Executor, *, derived: list[GroupsSpec], progress: bool
) -> SourceSize:
    """Plan the all-layers run (the model's probe, no shards yet) and size what it and the stores
    of the `derived` groupings would take on disk."""
    source = plan_run(per_layer_config(cfg), source_dir, executor, progress=progress)
    plan = source.plan
    groups = sum(stored_groups(source, cfg, spec) for spec in derived)
    needed = all_layers_bytes(plan) * (len(plan.layers) + groups) // len(plan.layers)
    if cfg.compare.max_source_bytes:
        return SourceSize(needed, cfg.compare.max_source_bytes, "compare.max_source_bytes")
    done = source.info().bytes_on_disk  # a resumed harvest already holds part of it
    return SourceSize(needed, free_bytes(source_dir) + done, "the free disk")


def per_layer_groups(source: Run, grouped: Run, cfg: PipelineConfig) -> list[str]:
    """The all-layers run's groups to train: every one (compare.per_layer = all) or the spot layers'."""
    if cfg.compare.per_layer == "all":
        return list(source.plan.group_names)
    layers = spot_layers(grouped.plan, cfg)
    unknown = [x for x in layers if x not in source.plan.layers]
    if unknown:
        raise ConfigError(f"compare.spot_layers {unknown} are not harvested; the run has layers {span(source.plan.layers)}")
    return [source.plan.group_of_layer(x) for x in layers]


class HeldOutSplit(NamedTuple):
    """The held-out rows of tokens.npy cut in two: [start, stop) of each."""

    eval: tuple[int, int]  # what the sweep evaluates on
    validation: tuple[int, int]  # what a learning rate is chosen on (the end of the held-out rows)


def held_out_split(plan: Plan, cfg: PipelineConfig) -> HeldOutSplit:
    """Validation contexts from the end of the held-out split (compare.validation_tokens, or a quarter of
    it), the rest for the evaluation: a learning rate picked on the contexts it is scored on would flatter
    whichever arm it suits."""
    start, stop = plan.eval_contexts
    ctx = plan.context_length
    tokens = cfg.compare.validation_tokens or (stop - start) * ctx // 4
    n = max(1, -(-tokens // ctx))
    if n >= stop - start:
        raise ConfigError(
            f"compare.validation_tokens needs {n} held-out contexts but the run holds {stop - start}; expected fewer "
            "than that: raise harvest.eval_tokens or lower compare.validation_tokens"
        )
    return HeldOutSplit((start, stop - n), (stop - n, stop))


_LINKED = (MARKER_FILE, DERIVED_FILE, PLAN_DIR, ACTS_STORE, MANIFEST_DIR)  # a run's harvest, config.json aside


def link_run(source: Path, target: Path) -> None:
    """A copy of a run folder's plan, store and records made of hard links (no bytes copied), without
    its SAEs or report: a second set of SAEs on the same store. config.json goes in last, so a link
    that was interrupted is made again; files of the user's already in `target` stay."""
    src, dst = RunLayout(source), RunLayout(target)
    if dst.config.is_file():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in _LINKED:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, copy_function=_relink, dirs_exist_ok=True)
        elif (source / name).is_file():
            _relink(source / name, target / name)
    _relink(src.config, dst.config)
    dst.locks.mkdir(exist_ok=True)


def link_trained_saes(source: Path, target: Path) -> bool:
    """Hard-link the SAEs of `source` (fit.json and each group's files) into `target`, a run on the
    same store trained with the same settings, when every group of `source` is trained and `target`
    holds no SAE yet. `ghsae fit` on `target` then finds them trained (it checks their provenance:
    settings and store) instead of training them again. Returns whether it linked.

    The sweep uses it for the learning-rate grid: each arm's seed 0 at the smallest budget is the
    grid's run at the chosen rate. Every SAE file is written by rename, so a later write in either
    run replaces its own link and never changes the other's file."""
    src, dst = Run.open(source), RunLayout(target)
    groups = list(src.plan.group_names)
    if not groups or not all(src.sae_trained(g) for g in groups) or not src.layout.fit_settings.is_file():
        return False
    if dst.saes.is_dir() and any(dst.sae_dir(g).exists() for g in groups):
        return False
    for g in groups:
        dst.sae_dir(g).mkdir(parents=True, exist_ok=True)
        for name in SAE_FILES:
            if (src.layout.sae_dir(g) / name).is_file():
                _relink(src.layout.sae_dir(g) / name, dst.sae_dir(g) / name)
    _relink(src.layout.fit_settings, dst.fit_settings)  # last: the settings name SAEs that are all there
    return True


def _relink(src: str | Path, dst: str | Path) -> None:
    Path(dst).unlink(missing_ok=True)  # a link made before an interruption is made again
    link_or_copy(src, dst)
