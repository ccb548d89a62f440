"""`ghsae sweep`: the quality-versus-compute trade-off over G, against per-layer SAEs (issue 13).

    SWEEP/ghsae-sweep.json   the sweep's record: its groupings (what resumes it)
    SWEEP/per-layer/         every layer harvested once (the one model pass), its per-layer SAEs
    SWEEP/G<n>/              a run of n groups, its store derived from per-layer/ (no model)
    SWEEP/G<n>-transfer/     the same store (hard links), SAEs each started from the previous group's
    SWEEP/report/            sweep.html, metrics.parquet (one row per grouping, SAE and layer), summary.md

Every grouping trains its SAEs with the same [fit] settings, so tokens per SAE are equal (each
layer of a group sees about T/|g| of them); the page checks that from the SAEs' records. When an
all-layers store would not fit (the free disk, or compare.max_source_bytes), the sweep says so
with the bytes it would take and harvests each grouping directly instead (one model pass per G;
no per-layer SAEs then).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ghsae import pipeline
from ghsae.compare import all_layers_bytes, per_layer_config
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, RunDirError
from ghsae.executors import Executor, InProcess
from ghsae.harvest import canonical_distance, distance_matrix, solve
from ghsae.harvest.derive import derive_run
from ghsae.harvest.steps import summary_line
from ghsae.layout import LOCKS_DIR, REPORT_DIR, RUN_FORMAT_VERSION, SAES_DIR, RunLayout, SweepLayout
from ghsae.records import SweepRecord, load_record, save_record
from ghsae.run import Run
from ghsae.space import free_bytes, human
from ghsae.train.fit import summary_lines

log = logging.getLogger(__name__)

SWEEP_FORMAT = "ghsae-sweep"
PER_LAYER = "per-layer"
DEFAULT_GROUPINGS = "2,3,4,6,8,auto,per-layer"


def parse_groupings(text: str) -> list[str]:
    """--groups 2,3,auto,per-layer: numbers of groups, `auto` (the AMAD rule's G) and `per-layer`."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not (part.isdigit() and int(part) >= 1) and part not in ("auto", PER_LAYER):
            raise ConfigError(f"--groups names {part!r}; expected numbers of groups, auto or per-layer, e.g. 2,4,auto,per-layer")
        out.append(part)
    if not out:
        raise ConfigError("--groups is empty; expected e.g. 2,3,4,6,8,auto,per-layer")
    return list(dict.fromkeys(out))


def grouping_config(cfg: PipelineConfig, groups: int) -> PipelineConfig:
    return dataclasses.replace(cfg, grouping=dataclasses.replace(cfg.grouping, groups=groups))


def transfer_config(cfg: PipelineConfig) -> PipelineConfig:
    return dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, transfer="previous-group"))


def auto_groups(source: Run, cfg: PipelineConfig) -> int:
    """The G `groups = auto` picks from the all-layers run's probe (the paper's rule under cfg's method)."""
    with np.load(source.layout.similarity) as sim:
        dist = distance_matrix(sim, canonical_distance(cfg.grouping.distance))
    return solve(dist, cfg.grouping.method, cfg.grouping.objective).auto_groups(cfg.grouping.amad_threshold)


def open_sweep(layout: SweepLayout, cfg: PipelineConfig, groupings: list[str], overwrite: bool) -> SweepRecord:
    """Claim the sweep folder (its record first), or resume one made with the same groupings."""
    root, marker = layout.root, layout.marker
    record = SweepRecord(SWEEP_FORMAT, RUN_FORMAT_VERSION, tuple(groupings), cfg.identity_hash(), time.time())
    if marker.is_file():
        old = load_record(SweepRecord, marker, fix=f"delete {marker} only if {root} is not a sweep")
        if (old.groupings, old.config_hash) != (record.groupings, record.config_hash) and not overwrite:
            raise RunDirError(
                f"{root} holds a sweep of {', '.join(old.groupings)} (config {old.config_hash}); this one is "
                f"{', '.join(groupings)} (config {record.config_hash}). Use another --run-dir, or --overwrite"
            )
        if (old.groupings, old.config_hash) == (record.groupings, record.config_hash):
            return old
    elif root.is_dir() and any(root.iterdir()):
        raise RunDirError(f"{root} is not empty and holds no {marker.name}: not a sweep folder; choose a new --run-dir")
    if overwrite and marker.is_file():
        for child in root.iterdir():
            if child == marker or RunLayout(child).marker.is_file() or child == layout.report:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    save_record(marker, record)
    return record


def sweep(
    cfg: PipelineConfig,
    sweep_dir: str | Path,
    executor: Executor | None = None,
    *,
    groupings: list[str],
    transfer: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Harvest every layer once, derive one run per G, train every grouping's SAEs at equal tokens
    per SAE (and the per-layer SAEs), evaluate them all on the same held-out tokens, and write the
    sweep's page. Each step resumes where it stopped. `transfer`: groupings also trained with
    fit.transfer = previous-group, for the FVU-against-tokens comparison."""
    executor = executor or InProcess()
    layout = SweepLayout(Path(sweep_dir))
    root = layout.root
    open_sweep(layout, cfg, groupings, overwrite)
    wanted = {t if t.startswith("G") or t in ("auto", PER_LAYER) else f"G{t}" for t in transfer or []}
    source_dir = layout.per_layer
    source_cfg = per_layer_config(cfg)
    pipeline.harvest(source_cfg, source_dir, executor, plan_only=True, progress=progress)
    needed = all_layers_bytes(Run.open(source_dir).plan)
    limit = cfg.compare.max_source_bytes or free_bytes(root)
    runs: dict[str, Path] = {}
    if needed > limit:
        if PER_LAYER in groupings:
            raise ConfigError(
                f"the per-layer baseline needs an all-layers store of {human(needed)} ({needed:,} bytes), over the "
                f"{'compare.max_source_bytes' if cfg.compare.max_source_bytes else 'free disk'} ({human(limit)}); "
                "drop per-layer from --groups, harvest fewer tokens, or free space"
            )
        say(
            f"an all-layers store would take {human(needed)} ({needed:,} bytes), over {human(limit)}: harvesting "
            "each grouping directly instead (one model pass per G)"
        )
        shutil.rmtree(source_dir)
        for name, g in _resolved(groupings, None, cfg).items():
            runs[name] = layout.grouping(name)
            say(summary_line(pipeline.harvest(grouping_config(cfg, g), runs[name], executor, progress=progress)))
    else:
        say(summary_line(pipeline.harvest(source_cfg, source_dir, executor, progress=progress)))
        source = Run.open(source_dir)
        for name, g in _resolved(groupings, source, cfg).items():
            runs[name] = layout.grouping(name)
            derive_run(source_dir, grouping_config(cfg, g), runs[name], progress=progress)
            say(f"derived {name} from {source_dir} (no model)")
        if PER_LAYER in groupings:
            runs[PER_LAYER] = source_dir
    auto = _auto_name(groupings, runs, cfg)
    if "auto" in wanted and auto is not None:
        wanted.add(auto)
    for name, path in list(runs.items()):
        g_cfg = source_cfg if name == PER_LAYER else grouping_config(cfg, len(Run.open(path).plan.groups))
        for line in summary_lines(pipeline.fit(g_cfg, path, executor, progress=progress)):
            say(f"{name} {line}")
        if name in wanted:
            linked = layout.grouping(f"{name}-transfer")
            link_run(path, linked)
            for line in summary_lines(pipeline.fit(transfer_config(g_cfg), linked, executor, progress=progress)):
                say(f"{name}-transfer {line}")
            runs[f"{name}-transfer"] = linked
    from ghsae.analysis.sweep import gather_sweep, write_sweep

    lm = Run.open(next(iter(runs.values()))).model(cfg.report.device, cfg.model.dtype)
    data = gather_sweep(cfg, runs, lm, auto=auto, source=source_dir if source_dir.is_dir() else None, progress=progress)
    return write_sweep(data, layout)


def _resolved(groupings: list[str], source: Run | None, cfg: PipelineConfig) -> dict[str, int]:
    """Run name -> number of groups, for every grouping but per-layer (auto resolved on the probe)."""
    out: dict[str, int] = {}
    for g in groupings:
        if g == PER_LAYER:
            continue
        if g == "auto":
            if source is None:
                raise ConfigError("--groups auto needs the all-layers probe; name the G instead")
            n = auto_groups(source, cfg)
        else:
            n = int(g)
        out.setdefault(f"G{n}", n)
    return out


def _auto_name(groupings: list[str], runs: dict[str, Path], cfg: PipelineConfig) -> str | None:
    """The run of the G the AMAD rule picks (marked on the page), when the sweep has it."""
    source = runs.get(PER_LAYER)
    probe = Run.open(source) if source is not None else None
    if probe is None:
        return None
    name = f"G{auto_groups(probe, cfg)}"
    return name if name in runs else None


def link_run(source: Path, target: Path) -> None:
    """A copy of a run folder's plan, store and records made of hard links (no bytes copied), without
    its SAEs or report: a second set of SAEs on the same store."""
    if (target / "ghsae-run.json").is_file():
        return
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    ignore = shutil.ignore_patterns(SAES_DIR, REPORT_DIR, LOCKS_DIR)
    shutil.copytree(source, staging, copy_function=_link_or_copy, ignore=ignore)
    os.replace(staging, target)
    RunLayout(target).locks.mkdir(exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
