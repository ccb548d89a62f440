"""The orchestration layer: each stage is one function over a run folder and an Executor.

    harvest(cfg, run_dir, executor)    check, plan (one task), shards (tasks), then the statistics
    fit(cfg, run_dir, executor)        check, record the fit settings, one task per group
    report(cfg, run_dir, executor)     check the records, then one task that writes RUN/report/
    run_all(cfg, run_dir, executor)    the three, the model loaded once per process

The CLI and the dask path are the same code: an InProcess executor runs the tasks here, a
DaskCluster on workers. Every check before work and every ending after it lives here, once. The
tasks are module-level functions (dask pickles them by name) that rebuild the config from a dict.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ghsae import compare
from ghsae.cache.stats import NormStats
from ghsae.config import PipelineConfig, config_from_dict, load_config
from ghsae.device import pick_device
from ghsae.errors import ConfigError, DamagedFileError
from ghsae.executors import Executor, InProcess, worker_index
from ghsae.harvest.derive import derive_run
from ghsae.harvest.rundir import claim_run_dir, prepare_run_dir
from ghsae.harvest.steps import (
    HarvestSummary,
    ShardSlice,
    Written,
    plan_run,
    recheck_done_shards,
    summary_line,
    write_shards,
)
from ghsae.layers import span
from ghsae.layout import RunLayout
from ghsae.lm import LoadedModel, cached_model
from ghsae.locks import hold_run
from ghsae.run import Run
from ghsae.train.fit import FitResult, check_fit_settings, fit_group, selected_groups, shards_to_fit, summary_lines

log = logging.getLogger(__name__)

HARVEST_SECTIONS = ("model", "data", "harvest", "grouping", "storage", "fit", "report")
DEVICE_SECTIONS = ("model", "fit", "report")


# --- settings ---------------------------------------------------------------------------------


def settings_for(
    run_dir: str | Path | None,
    config_path: str | None,
    overrides: dict[str, Any],
    sections: tuple[str, ...] = HARVEST_SECTIONS,
) -> PipelineConfig:
    """The settings a command runs with: the run's own (config.json, with saes/fit.json's [fit]) when
    the run exists, else the --config file (or the embedded default); a --config given for an
    existing run replaces `sections` only; flags (`overrides`) last."""
    base = _run_settings(RunLayout(Path(run_dir)), sections) if run_dir is not None else None
    if base is not None:
        # The device belongs to the machine, not the run: a run made on a GPU resumes on a CPU
        # with the file's (or the default) device. Dtype and batch sizes stay the run's.
        machine = load_config(config_path, base={}, sections=sections)  # only the sections this command reads
        for section in DEVICE_SECTIONS:
            base[section]["device"] = getattr(machine, section).device
    return load_config(config_path, overrides, base=base, sections=sections)


def _run_settings(layout: RunLayout, sections: tuple[str, ...]) -> dict | None:
    """A planned run's own settings (None where no plan). A missing or damaged config.json is refused
    unless the command harvests: harvest rewrites it from its own config when the plan's hash matches,
    so it starts from the file or the default, and says so."""
    if not layout.plan.is_file():
        return None
    try:
        return Run.open(layout.root).settings().to_dict()
    except DamagedFileError:
        if "harvest" not in sections:
            raise
        log.warning(
            "%s is missing or damaged; starting from the --config file (or the embedded default): the harvest "
            "rewrites it when the plan's hash matches that config",
            layout.config,
        )
        return None


def _model(cfg: PipelineConfig, lm: LoadedModel | None) -> LoadedModel:
    return lm if lm is not None else cached_model(cfg.model.path, cfg.model.device, cfg.model.dtype)


# --- harvest ----------------------------------------------------------------------------------


def harvest(
    cfg: PipelineConfig,
    run_dir: str | Path,
    executor: Executor | None = None,
    *,
    shards: ShardSlice | None = None,
    overwrite: bool = False,
    plan_only: bool = False,
    progress: bool = True,
    lm: LoadedModel | None = None,
    shard_task: Callable | None = None,
) -> HarvestSummary:
    """Plan the run once (one task), then write this job's missing shards (tasks), then, once every
    shard of the run is done, its statistics. `lm`: a model already loaded (this process only);
    `shard_task`: the shard task to submit (tests inject faults with it)."""
    executor = executor or InProcess()
    layout = RunLayout(Path(run_dir))
    run = plan_run(cfg, run_dir, executor, overwrite=overwrite, progress=progress, lm=lm)
    here = lm if executor.in_process else None
    progress_in_tasks = executor.task_progress(progress)
    selected = (shards or ShardSlice()).select(run.plan.n_shards)
    recheck_done_shards(run, selected)
    if plan_only:
        return HarvestSummary(str(layout.root), 0, 0, 0.0, run.info())
    todo = [s for s in selected if not run.shard_done(s)]
    t0 = time.perf_counter()
    results: list[Written] = executor.map(
        shard_task or shards_task,
        executor.split(todo),
        cfg.to_dict(),
        str(run_dir),
        progress_in_tasks,
        here,
        desc="harvest",
        unit="shard",
    )
    seconds = time.perf_counter() - t0
    written = [s for r in results for s in r.shards]
    after = Run.open(layout.root)  # the tasks wrote records this Run has not read
    after.finish(wrote=bool(written))
    return HarvestSummary(str(layout.root), len(written), sum(r.tokens for r in results), seconds, after.info())


def shards_task(
    shards: list[int], cfg_dict: dict, run_dir: str, progress: bool, lm: LoadedModel | None = None
) -> Written:
    """Write the listed shards (those not done yet) of a planned run."""
    cfg = config_from_dict(cfg_dict)
    return write_shards(Run.open(run_dir), cfg, _model(cfg, lm), shards, progress)


# --- fit --------------------------------------------------------------------------------------


def fit(
    cfg: PipelineConfig,
    run_dir: str | Path,
    executor: Executor | None = None,
    *,
    groups: list[str] | None = None,
    allow_partial: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[FitResult]:
    """Train (or resume, or skip) each group's SAE, one task per group; results in group order.

    The run's fit settings (saes/fit.json) are written before any task; other settings are refused
    with the differing keys unless `overwrite`, which also starts over the SAEs trained otherwise."""
    executor = executor or InProcess()
    run = Run.open(run_dir)
    shards = shards_to_fit(run, allow_partial)  # an incomplete store is refused before any work
    names = selected_groups(run, groups)
    check_passes(run, cfg, names, shards)
    if executor.in_process:  # a cluster's workers may have devices this client lacks; each task checks its own
        pick_device(cfg.fit.device, option="fit.device (--device)")  # a bad device fails before any work
    if check_fit_settings(run, cfg, overwrite) or run.fit_settings() is None:
        run.save_fit_settings(cfg)  # checked against the run's SAEs first, so never a refused fit's settings
    with hold_run(run.layout):  # no --overwrite between the statistics and the fits that use them
        # In one process every group's SAE takes its layers' rows of the same statistics: read them once
        # (the harvest's statistics file; added up from the records and sums with --allow-partial), not
        # once per group. A cluster's tasks read their own.
        shared = (shards, run.norm_stats(shards)) if executor.in_process else None
        args = (cfg.to_dict(), str(run_dir), allow_partial, overwrite, executor.task_progress(progress), shared)
        if cfg.fit.transfer != "none":  # each group starts from the previous one's SAE: one after another
            return [r for name in names for r in executor.map(fit_task, [name], *args, desc="fit", unit="SAE")]
        return executor.map(fit_task, names, *args, desc="fit", unit="SAE")


MAX_PASSES = 100  # over a group's stored rows; more is a typo or a store far too small for the --tokens


def check_passes(run: Run, cfg: PipelineConfig, names: list[str], shards: list[int]) -> None:
    """Refuse fit.tokens of more than MAX_PASSES over a group's stored rows, before any training."""
    if not cfg.fit.tokens:
        return
    for name in names:
        rows = sum(run.shard_record(s).groups[name].rows for s in shards)
        if rows and cfg.fit.tokens > MAX_PASSES * rows:
            raise ConfigError(
                f"fit.tokens (--tokens) is {cfg.fit.tokens:,}: {cfg.fit.tokens / rows:,.0f} passes over the {rows:,} "
                f"rows stored for {name}, over the {MAX_PASSES} accepted; lower --tokens (0 is one pass), or "
                "harvest more tokens into a new run"
            )


def fit_task(
    group: str,
    cfg_dict: dict,
    run_dir: str,
    allow_partial: bool,
    restart: bool,
    progress: bool,
    shared: tuple[list[int], NormStats] | None = None,
) -> FitResult:
    """Train one group's SAE (resuming from its checkpoint); on a host with several GPUs, one per worker.
    shared: the shards to fit and their statistics, when the caller added them up for every group."""
    import torch

    cfg = config_from_dict(cfg_dict)
    if cfg.fit.device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        cfg.fit.device = f"cuda:{worker_index() % torch.cuda.device_count()}"
    run = Run.open(run_dir)
    shards, stats = shared if shared is not None else (shards_to_fit(run, allow_partial), None)
    return fit_group(run, cfg, group, shards, stats=stats, progress=progress, restart=restart)


# --- report -----------------------------------------------------------------------------------


def check_report_inputs(run: Run) -> None:
    """What `report` reads, checked before the model load: config.json, tokens.npy and the shard
    records (Run.check_records); the SAEs are checked as they load. The report reads no activation,
    so it neither needs nor hashes the store (`ghsae verify` and fit do)."""
    run.check_records()


def report(
    cfg: PipelineConfig,
    run_dir: str | Path,
    executor: Executor | None = None,
    *,
    baseline: str | Path | None = None,
    allow_partial: bool = False,
    allow_unmatched: bool = False,
    progress: bool = True,
    lm: LoadedModel | None = None,
) -> Path:
    """Evaluate the run's SAEs (and a baseline's) and write RUN/report/; returns that folder."""
    executor = executor or InProcess()
    check_report_inputs(Run.open(run_dir))
    own = own_per_layer_run(run_dir)
    if baseline is None:
        baseline = own  # the per-layer SAEs of `ghsae run`'s comparison, when it made them
    spot_checks = baseline is not None and own is not None and Path(baseline).resolve() == own.resolve()
    if baseline is not None:
        from ghsae.analysis.baseline import check_not_itself

        check_not_itself(Path(run_dir), Path(baseline))
        Run.open(baseline)  # a baseline that is not a run fails here, before the model load
    here = lm if executor.in_process else None
    out = executor.call(
        report_task,
        cfg.to_dict(),
        str(run_dir),
        str(baseline) if baseline is not None else None,
        allow_partial,
        allow_unmatched,
        spot_checks,
        executor.task_progress(progress),
        here,
    )
    return Path(out)


def own_per_layer_run(run_dir: str | Path) -> Path | None:
    """RUN/per-layer when it holds trained per-layer SAEs (the comparison `ghsae run` makes)."""
    path = RunLayout(Path(run_dir)).per_layer
    if RunLayout(path).plan.is_file() and Run.open(path).trained_groups():
        return path
    return None


def report_model(cfg: PipelineConfig, run: Run, lm: LoadedModel | None = None) -> LoadedModel:
    """The model a report loads: the one the run was harvested with, on the report's device, in the
    run's compute dtype (cfg starts from the run's settings)."""
    pick_device(cfg.report.device, option="report.device (--device)")  # named as the report's, not the model's
    return lm if lm is not None else run.model(cfg.report.device, cfg.model.dtype)


def report_task(
    cfg_dict: dict,
    run_dir: str,
    baseline: str | None,
    allow_partial: bool,
    allow_unmatched: bool,
    spot_checks: bool,
    progress: bool,
    lm: LoadedModel | None = None,
) -> str:
    from ghsae.analysis.report import gather, write_report

    cfg = config_from_dict(cfg_dict)
    run = Run.open(run_dir)
    data = gather(
        cfg,
        run,
        report_model(cfg, run, lm),
        Run.open(baseline) if baseline is not None else None,
        allow_partial=allow_partial,
        allow_unmatched=allow_unmatched,
        spot_checks=spot_checks,
        progress=progress,
    )
    return str(write_report(data, cfg))


# --- the per-layer comparison and its seeds -----------------------------------------------------


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
    layout = RunLayout(Path(run_dir))
    prepare_run_dir(layout, cfg, overwrite)
    with claim_run_dir(layout, cfg, overwrite):
        pass  # the marker first (and --overwrite's clean-up), so that RUN/per-layer may live inside
    # harvested directly before (an older run, or one made with compare.per_layer = "none"): kept,
    # and its comparison takes a second model pass
    direct = layout.plan.is_file() and not layout.derived_from.is_file()
    derived = ([] if direct else [cfg.grouping.groups]) + [cfg.grouping.groups] * (cfg.compare.seeds - 1)
    size = compare.plan_all_layers(cfg, layout.per_layer, executor, derived=derived, progress=progress)
    if not size.fits:
        say(f"no per-layer comparison: {size.refusal()}; harvesting the grouped run alone")
        shutil.rmtree(layout.per_layer)
        say(summary_line(harvest(cfg, run_dir, executor, progress=progress)))
        return None
    say(summary_line(harvest(compare.per_layer_config(cfg), layout.per_layer, executor, progress=progress)))
    if direct:
        say(f"{run_dir} was harvested directly before: kept (the per-layer run above is a second model pass)")
        say(summary_line(harvest(cfg, run_dir, executor, progress=progress)))
        return Run.open(layout.per_layer)
    derived = derive_run(layout.per_layer, cfg, layout.root, progress=progress)
    groups = ", ".join(span(g) for g in derived.plan.groups)
    say(f"derived {run_dir} ({len(derived.plan.groups)} groups: {groups}) from {layout.per_layer}, without the model")
    return Run.open(layout.per_layer)


def train_seeds(
    cfg: PipelineConfig,
    run_dir: str | Path,
    source: Run | None,
    executor: Executor,
    *,
    overwrite: bool,
    progress: bool,
    say: Callable[[str], None],
) -> None:
    """Seeds 1..compare.seeds-1 of `ghsae run`'s comparison, each in RUN/seed<s>/: its grouped store
    derived from the all-layers run with the seed's layer draw (a direct harvest, a model pass each,
    when there is none), its group SAEs, and, with per-layer SAEs, the same spot checks trained with the
    seed on RUN/seed<s>/per-layer (hard links to the all-layers store: no layer draw to vary)."""
    layout = RunLayout(Path(run_dir))
    for seed in range(1, cfg.compare.seeds):
        s_cfg, path = compare.seed_config(cfg, seed), layout.seed_run(seed)
        if source is not None:
            derive_run(source.root, s_cfg, path, progress=progress)
        else:
            say(summary_line(harvest(s_cfg, path, executor, overwrite=overwrite, progress=progress)))
        for line in summary_lines(fit(s_cfg, path, executor, overwrite=overwrite, progress=progress)):
            say(f"seed {seed} {line}")
        if source is None:
            continue
        linked = RunLayout(path).per_layer
        compare.link_run(source.root, linked)
        groups = compare.per_layer_groups(source, Run.open(path), cfg)
        p_cfg = compare.seed_config(compare.per_layer_config(cfg), seed, layer_draw=False)
        for line in summary_lines(fit(p_cfg, linked, executor, groups=groups, overwrite=overwrite, progress=progress)):
            say(f"seed {seed} per-layer {line}")


# --- the whole pipeline -----------------------------------------------------------------------


def run_all(
    cfg: PipelineConfig,
    run_dir: str | Path,
    executor: Executor | None = None,
    *,
    baseline: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Harvest, fit every group's SAE, report; each stage resumes where it stopped. `say` gets one
    line per stage.

    With compare.per_layer (the default: spot-checks), every layer is harvested once into
    RUN/per-layer, RUN's grouped store is derived from it, per-layer SAEs are trained there at the
    spot layers (or all), and the report sets them beside the group SAEs (ghsae/compare.py). With
    compare.seeds = N, seeds 1..N-1 of both are trained in RUN/seed<s>/ and the report gives every
    gap a standard error across seeds."""
    executor = executor or InProcess()
    source = None
    if cfg.compare.per_layer != "none" and baseline is None:
        source = harvest_once(cfg, run_dir, executor, overwrite=overwrite, progress=progress, say=say)
    else:
        say(summary_line(harvest(cfg, run_dir, executor, overwrite=overwrite, progress=progress)))
    for line in summary_lines(fit(cfg, run_dir, executor, overwrite=overwrite, progress=progress)):
        say(line)
    if source is not None:
        groups = compare.per_layer_groups(source, Run.open(run_dir), cfg)
        source_cfg = compare.per_layer_config(cfg)
        for line in summary_lines(fit(source_cfg, source.root, executor, groups=groups, overwrite=overwrite, progress=progress)):
            say(f"per-layer {line}")
    if baseline is None:  # seeds of a given baseline are the user's to train
        train_seeds(cfg, run_dir, source, executor, overwrite=overwrite, progress=progress, say=say)
    return report(cfg, run_dir, executor, baseline=baseline, progress=progress)

