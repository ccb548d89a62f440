"""`ghsae sweep`: the quality-versus-compute trade-off over G, against per-layer SAEs (issue 13).

    SWEEP/ghsae-sweep.json   the sweep's record: its groupings and settings (what resumes it)
    SWEEP/per-layer/         every layer harvested once (the one model pass), its per-layer SAEs
    SWEEP/G<n>/              a run of n groups, its store derived from per-layer/ (no model)
    SWEEP/G<n>-transfer/     the same store (hard links), SAEs each started from the previous group's
    SWEEP/<name>-seed<s>/    seed s >= 1 of each grouping (--seeds N): G<n>-seed<s> derived with the seed's
                             layer draw, per-layer-seed<s> hard links to per-layer's store; SAEs with fit.seed + s
    SWEEP/report/            sweep.html, metrics.parquet (one row per grouping, seed, SAE and layer), summary.md,
                             one PNG per metric, and the evaluation's cache (a re-run re-renders for free)

Every grouping trains its SAEs with the same [fit] settings, so tokens per SAE are equal (each
layer of a group sees about 1/|g| of them); the page checks that from the SAEs' records. When
the stores would not fit (the free disk, or compare.max_source_bytes), the sweep says so with the
bytes they would take and harvests each grouping directly instead (one model pass per G; no
per-layer SAEs then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ghsae import pipeline
from ghsae.compare import link_run, n_groups, per_layer_config, plan_all_layers, seed_config
from ghsae.config import GroupsSpec, PipelineConfig
from ghsae.errors import ConfigError, RunDirError
from ghsae.executors import Executor, InProcess
from ghsae.harvest.derive import derive_run
from ghsae.harvest.plan import check_groups_fit
from ghsae.harvest.rundir import refuse_rebuilt_user_files, remove_owned, warn_kept
from ghsae.harvest.steps import summary_line
from ghsae.layout import (
    LOCKS_DIR,
    MARKER_FILE,
    PER_LAYER_DIR,
    RUN_TREE,
    SWEEP_REPORT_TREE,
    TRANSFER_SUFFIX,
    RunLayout,
    SweepLayout,
)
from ghsae.records import SweepRecord, load_record, save_record
from ghsae.run import Run
from ghsae.train.fit import summary_lines
from ghsae.train.provenance import fit_settings, run_fit_settings

log = logging.getLogger(__name__)

SWEEP_FORMAT = "ghsae-sweep"
SWEEP_FORMAT_VERSION = 1
PER_LAYER = PER_LAYER_DIR  # the per-layer grouping is the all-layers run itself
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


def fit_hash(cfg: PipelineConfig) -> str:
    """The fit settings every grouping of the sweep trains with (those that decide an SAE's weights)."""
    blob = json.dumps(run_fit_settings(fit_settings(cfg)), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_sweep(layout: SweepLayout, cfg: PipelineConfig, groupings: list[str], overwrite: bool) -> bool:
    """Claim the sweep folder (its record first), or resume one of the same harvest. Groupings may
    change between runs (each has its own folder). Returns whether the fits must start over: other
    fit settings than the record's are refused unless `overwrite`, which trains them again and keeps
    the harvest; another harvest config is refused unless `overwrite`, which starts the sweep over."""
    root, marker = layout.root, layout.marker
    record = SweepRecord(SWEEP_FORMAT, SWEEP_FORMAT_VERSION, tuple(groupings), cfg.identity_hash(), time.time(), fit_hash(cfg))
    refit = False
    if marker.is_file():
        old = load_record(SweepRecord, marker, fix=f"delete {marker} only if {root} is not a sweep")
        if old.config_hash != record.config_hash:
            if not overwrite:
                raise RunDirError(
                    f"{root} holds a sweep of another harvest config ({old.config_hash}, this one is {record.config_hash}); "
                    "use another --run-dir, or --overwrite to start it over"
                )
            start_over(layout)
        elif old.fit_hash and old.fit_hash != record.fit_hash:
            if not overwrite:
                raise RunDirError(
                    f"{root} holds a sweep whose SAEs train with other fit settings; pass --overwrite to train every "
                    "grouping's SAEs again with these (the harvest is kept), or use another --run-dir"
                )
            refit = True
        record = dataclasses.replace(record, created=old.created)
    elif root.is_dir() and any(root.iterdir()):
        raise RunDirError(f"{root} is not empty and holds no {marker.name}: not a sweep folder; choose a new --run-dir")
    root.mkdir(parents=True, exist_ok=True)
    save_record(marker, record)
    return refit


# a grouping's run without its marker: a grouping left holding the user's files stays a run, so the
# sweep derives into it again instead of refusing a folder that is "not a ghsae run"
_GROUPING_TREE = {k: v for k, v in RUN_TREE.items() if k != MARKER_FILE}


def start_over(layout: SweepLayout) -> None:
    """--overwrite after another harvest config: remove what ghsae wrote in every grouping's run (the
    per-layer one included) and the sweep's report, and nothing else, saying which files it kept."""
    root = layout.root
    runs = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.is_symlink() and RunLayout(c).marker.is_file()]
    for run in runs:  # before removing anything: a file the next harvest would delete is refused
        refuse_rebuilt_user_files(run, _GROUPING_TREE, "sweep --overwrite")
    log.warning("--overwrite: starting the sweep %s over (its harvest config differs)", root)
    ours = {*runs, layout.report, layout.marker, root / LOCKS_DIR}
    kept = [c for c in sorted(root.iterdir()) if c not in ours]
    for run in runs:
        kept += clear_run(run)
    if layout.report.is_dir() and not layout.report.is_symlink():
        kept += remove_owned(layout.report, SWEEP_REPORT_TREE)
        if not any(layout.report.iterdir()):
            layout.report.rmdir()
    warn_kept(root, kept)


def clear_run(run: Path) -> list[Path]:
    """Remove what ghsae wrote in a run of the sweep; the folder goes too unless the user's files are
    left in it (then it keeps its marker). Returns the user's entries kept."""
    kept = [p for p in remove_owned(run, _GROUPING_TREE) if p != RunLayout(run).marker]
    if not kept:
        shutil.rmtree(run)
    return kept


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
    sweep's page. Each step resumes where it stopped. `transfer`: groupings (G<n>, n, auto or
    per-layer) also trained with fit.transfer = previous-group, for the FVU-against-tokens comparison."""
    executor = executor or InProcess()
    layout = SweepLayout(Path(sweep_dir))
    refit = open_sweep(layout, cfg, groupings, overwrite)
    source_cfg = per_layer_config(cfg)
    seeds = range(cfg.compare.seeds)
    specs: list[GroupsSpec] = [g if g == "auto" else int(g) for g in groupings if g != PER_LAYER]
    size = plan_all_layers(cfg, layout.per_layer, executor, derived=specs * len(seeds), progress=progress)
    probe = Run.open(layout.per_layer)  # planned: its probe resolves auto and checks every G
    resolved = _resolved(groupings, probe, cfg)
    auto = f"G{n_groups(probe, cfg, 'auto')}"
    wanted = _transfers(transfer or [], resolved, groupings, auto)
    runs: dict[str, list[Path]] = {}  # grouping -> its run of each seed, seed 0 first
    if size.fits:
        say(summary_line(pipeline.harvest(source_cfg, layout.per_layer, executor, progress=progress)))
        for name, g in resolved.items():
            for seed in seeds:
                path = layout.grouping(name, seed)
                derive_run(layout.per_layer, seed_config(grouping_config(cfg, g), seed), path, progress=progress)
                say(f"derived {path.name} from {layout.per_layer} (no model)")
                runs.setdefault(name, []).append(path)
        if PER_LAYER in groupings:  # one store; the other seeds' SAEs train on hard links to it
            for seed in seeds[1:]:
                link_run(layout.per_layer, layout.grouping(PER_LAYER, seed))
            runs[PER_LAYER] = [layout.grouping(PER_LAYER, seed) for seed in seeds]
    else:
        if PER_LAYER in groupings:
            raise ConfigError(
                f"{size.refusal()}; the per-layer baseline needs it: drop per-layer from --groups, harvest fewer "
                "tokens, or free space"
            )
        say(f"{size.refusal()}: harvesting each grouping directly instead (one model pass per G and seed)")
        warn_kept(layout.root, clear_run(layout.per_layer), f"removing {layout.per_layer}")
        for name, g in resolved.items():
            for seed in seeds:
                path = layout.grouping(name, seed)
                s_cfg = seed_config(grouping_config(cfg, g), seed)
                say(summary_line(pipeline.harvest(s_cfg, path, executor, progress=progress)))
                runs.setdefault(name, []).append(path)
    for name, paths in list(runs.items()):
        for seed, path in enumerate(paths):
            arm = source_cfg if name == PER_LAYER else grouping_config(cfg, resolved[name])
            g_cfg = seed_config(arm, seed, layer_draw=name != PER_LAYER)
            for line in summary_lines(pipeline.fit(g_cfg, path, executor, overwrite=refit, progress=progress)):
                say(f"{path.name} {line}")
            if name in wanted:
                linked = layout.grouping(name + TRANSFER_SUFFIX, seed)
                link_run(path, linked)
                for line in summary_lines(pipeline.fit(transfer_config(g_cfg), linked, executor, overwrite=refit, progress=progress)):
                    say(f"{linked.name} {line}")
                runs.setdefault(name + TRANSFER_SUFFIX, []).append(linked)
    from ghsae.analysis.sweep import gather_sweep, write_sweep

    lm = Run.open(next(iter(runs.values()))[0]).model(cfg.report.device, cfg.model.dtype)
    source = layout.per_layer if size.fits else None
    data = gather_sweep(cfg, runs, lm, auto=auto, source=source, cache=layout.eval_cache, progress=progress)
    return write_sweep(data, layout)


def _resolved(groupings: list[str], probe: Run, cfg: PipelineConfig) -> dict[str, int]:
    """Run name -> number of groups for every grouping but per-layer (auto resolved on the probe),
    each checked against the harvested layers before any shard is written."""
    out: dict[str, int] = {}
    for g in groupings:
        if g == PER_LAYER:
            continue
        n = n_groups(probe, cfg, g if g == "auto" else int(g))
        check_groups_fit(n, list(probe.plan.layers), cfg.grouping.last_layer)
        out.setdefault(f"G{n}", n)
    return out


def _transfers(names: list[str], resolved: dict[str, int], groupings: list[str], auto: str) -> set[str]:
    """--transfer's names as run names, each checked against the sweep's groupings."""
    known = set(resolved) | ({PER_LAYER} if PER_LAYER in groupings else set())
    out = set()
    for t in names:
        name = auto if t == "auto" else t if t.startswith("G") or t == PER_LAYER else f"G{t}"
        if name not in known:
            raise ConfigError(f"--transfer names {t!r}, which is not in this sweep; it has {', '.join(sorted(known))}")
        out.add(name)
    return out
