"""Group SAEs measured against per-layer SAEs from one model pass (issue 13).

Every layer is harvested once into an all-layers run; each grouping's store is derived from it
(harvest/derive.py, byte for byte what a direct harvest would store), and per-layer SAEs train on
the all-layers run itself. `ghsae run` keeps the all-layers run inside the grouped one
(RUN/per-layer) and trains per-layer SAEs at a few spot layers (compare.per_layer); `ghsae sweep`
(ghsae/sweep.py) derives one run per G beside a fully fitted all-layers run.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ghsae.cache.store import ROW_METADATA_BYTES
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError
from ghsae.executors import Executor
from ghsae.harvest.derive import derive_run
from ghsae.harvest.rundir import claim_run_dir, prepare_run_dir
from ghsae.harvest.steps import summary_line
from ghsae.layers import span
from ghsae.layout import RunLayout
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


def spot_layers(plan: Plan, cfg: PipelineConfig) -> list[int]:
    """compare.spot_layers, or the middle layer of every group (a singleton group's one layer: there
    group and per-layer SAE see the same rows, so their difference is training noise alone)."""
    if cfg.compare.spot_layers:
        return sorted(set(cfg.compare.spot_layers))
    return [g[len(g) // 2] for g in plan.groups]


def harvest_once(
    cfg: PipelineConfig,
    run_dir: str | Path,
    executor: Executor,
    *,
    overwrite: bool,
    progress: bool,
    say: Callable[[str], None],
) -> Run | None:
    """Harvest every layer into RUN/per-layer and derive RUN's grouped store from it. Returns the
    all-layers run, or None when its store would be too large (RUN is then harvested directly, and
    the report has no per-layer comparison)."""
    from ghsae import pipeline

    layout = RunLayout(Path(run_dir))
    prepare_run_dir(layout, cfg, overwrite)
    source_cfg = per_layer_config(cfg)
    if layout.plan.is_file() and not layout.derived_from.is_file():
        # harvested directly before (an older run, or one made with compare.per_layer = "none"): keep
        # it, and harvest every layer for the comparison in a second model pass
        say(summary_line(pipeline.harvest(cfg, run_dir, executor, overwrite=overwrite, progress=progress)))
        say(f"{run_dir} was harvested directly; harvesting every layer once more for the per-layer comparison")
        say(summary_line(pipeline.harvest(source_cfg, layout.per_layer, executor, progress=progress)))
        return Run.open(layout.per_layer)
    with claim_run_dir(layout, cfg, overwrite):
        pass  # the marker first, so that RUN/per-layer may live inside the run folder
    pipeline.harvest(source_cfg, layout.per_layer, executor, plan_only=True, progress=progress)
    needed = all_layers_bytes(Run.open(layout.per_layer).plan)
    limit = cfg.compare.max_source_bytes or free_bytes(layout.root)
    if needed > limit:
        say(
            f"no per-layer comparison: an all-layers store for these tokens would take {human(needed)}, over "
            f"{'compare.max_source_bytes' if cfg.compare.max_source_bytes else 'the free disk'} ({human(limit)}); "
            "harvesting the grouped run alone"
        )
        shutil.rmtree(layout.per_layer)
        say(summary_line(pipeline.harvest(cfg, run_dir, executor, progress=progress)))
        return None
    say(summary_line(pipeline.harvest(source_cfg, layout.per_layer, executor, progress=progress)))
    derived = derive_run(layout.per_layer, cfg, layout.root, progress=progress)
    groups = ", ".join(span(g) for g in derived.plan.groups)
    say(f"derived {run_dir} ({len(derived.plan.groups)} groups: {groups}) from {layout.per_layer}, without the model")
    return Run.open(layout.per_layer)


def per_layer_groups(source: Run, grouped: Run, cfg: PipelineConfig) -> list[str]:
    """The all-layers run's groups to train: every one (compare.per_layer = all) or the spot layers'."""
    if cfg.compare.per_layer == "all":
        return list(source.plan.group_names)
    layers = spot_layers(grouped.plan, cfg)
    unknown = [x for x in layers if x not in source.plan.layers]
    if unknown:
        raise ConfigError(f"compare.spot_layers {unknown} are not harvested; the run has layers {span(source.plan.layers)}")
    return [source.plan.group_of_layer(x) for x in layers]
