"""`ghsae sweep`: the quality-versus-compute trade-off over G, against per-layer SAEs.

    SWEEP/ghsae-sweep.json   the sweep's record: its groupings and settings (what resumes it)
    SWEEP/per-layer/         every layer harvested once (the one model pass), its per-layer SAEs
    SWEEP/G<n>/              a run of n groups, its store derived from per-layer/ (no model)
    SWEEP/G<n>-transfer/     the same store (hard links), SAEs each started from the previous group's
    SWEEP/<name>-seed<s>/    seed s >= 1 of each grouping (--seeds N): G<n>-seed<s> derived with the seed's
                             layer draw, per-layer-seed<s> hard links to per-layer's store; SAEs with fit.seed + s
    SWEEP/<name>-t<tokens>[-seed<s>]/  with --budgets: each grouping's SAEs at each budget of tokens per SAE,
                             on hard links to the grouping's store (every budget from the one harvest)
    SWEEP/lr-grid/, lr-choice.json  with --lr-grid: each arm at each learning rate (smallest budget, seed 0),
                             and each arm's pick on the validation split (held-out contexts the evaluation never sees)
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
from ghsae.compare import (
    held_out_split,
    link_run,
    link_trained_saes,
    n_groups,
    per_layer_config,
    plan_all_layers,
    seed_config,
)
from ghsae.config import GroupsSpec, PipelineConfig
from ghsae.errors import ConfigError, RunDirError
from ghsae.executors import Executor, InProcess
from ghsae.harvest.derive import derive_run
from ghsae.harvest.plan import check_groups_fit
from ghsae.harvest.rundir import refuse_rebuilt_user_files, remove_owned, warn_kept
from ghsae.harvest.steps import summary_line
from ghsae.layout import (
    LOCKS_DIR,
    LR_DIR,
    MARKER_FILE,
    PER_LAYER_DIR,
    RUN_TREE,
    SWEEP_REPORT_TREE,
    TRANSFER_SUFFIX,
    RunLayout,
    SweepLayout,
    budget_name,
)
from ghsae.records import LrChoiceRecord, SweepRecord, load_record, save_record
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


def parse_budgets(text: str) -> list[int]:
    """--budgets 2048,8192: training tokens per SAE, ascending, each once."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if not (p.isdigit() and int(p) >= 1)]
    if bad or not parts:
        raise ConfigError(f"--budgets names {', '.join(bad) or 'nothing'}; expected tokens per SAE, e.g. 131072,524288")
    return sorted({int(p) for p in parts})


def parse_lrs(text: str) -> list[float]:
    """--lr-grid 1e-3,3e-3,1e-2: learning rates, ascending, each once."""
    try:
        lrs = sorted({float(p) for p in text.split(",") if p.strip()})
    except ValueError:
        lrs = []
    if not lrs or lrs[0] <= 0:
        raise ConfigError(f"--lr-grid is {text!r}; expected positive learning rates, e.g. 1e-3,3e-3,1e-2")
    return lrs


def fit_hash(cfg: PipelineConfig) -> str:
    """The fit settings every grouping of the sweep trains with (those that decide an SAE's weights).
    With budgets, fit.tokens is each budget's and fit.lr each arm's pick: neither is the sweep's."""
    fc = cfg.fit
    if cfg.compare.budgets:
        fc = dataclasses.replace(fc, tokens=0)
    if cfg.compare.lr_grid:
        fc = dataclasses.replace(fc, lr=0.0)
    settings = run_fit_settings(fit_settings(dataclasses.replace(cfg, fit=fc)))
    blob = json.dumps([settings, cfg.compare.lr_grid or None], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def harvest_config(cfg: PipelineConfig, marker: Path) -> PipelineConfig:
    """With budgets, the one harvest holds the largest budget's tokens per layer; a sweep resumed with a
    larger budget keeps the harvest it has (its record says how large), so nothing is harvested again."""
    if not cfg.compare.budgets:
        return cfg
    tokens = max(cfg.compare.budgets)
    if marker.is_file():
        tokens = load_record(SweepRecord, marker).harvest_tokens or tokens
    return dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, tokens=tokens))


def open_sweep(layout: SweepLayout, cfg: PipelineConfig, groupings: list[str], overwrite: bool) -> bool:
    """Claim the sweep folder (its record first), or resume one of the same harvest. Groupings and
    budgets may change between runs (each has its own folders). Returns whether the fits must start
    over: other fit settings than the record's are refused unless `overwrite`, which trains them again
    and keeps the harvest; another harvest config is refused unless `overwrite`, which starts the sweep over."""
    root, marker = layout.root, layout.marker
    budgets = tuple(cfg.compare.budgets)
    record = SweepRecord(
        SWEEP_FORMAT, SWEEP_FORMAT_VERSION, tuple(groupings), cfg.identity_hash(), time.time(), fit_hash(cfg), budgets,
        cfg.harvest.tokens,
    )  # fmt: skip
    refit = False
    if marker.is_file():
        old = load_record(SweepRecord, marker, fix=f"delete {marker} only if {root} is not a sweep")
        record = dataclasses.replace(record, budgets=tuple(sorted({*old.budgets, *budgets})))
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
    lr_dir = root / LR_DIR
    children = [*sorted(root.iterdir()), *(sorted(lr_dir.iterdir()) if lr_dir.is_dir() else [])]
    runs = [c for c in children if c.is_dir() and not c.is_symlink() and RunLayout(c).marker.is_file()]
    for run in runs:  # before removing anything: a file the next harvest would delete is refused
        refuse_rebuilt_user_files(run, _GROUPING_TREE, "sweep --overwrite")
    log.warning("--overwrite: starting the sweep %s over (its harvest config differs)", root)
    ours = {*runs, layout.report, layout.marker, layout.lr_choice, lr_dir, root / LOCKS_DIR}
    kept = [c for c in children if c not in ours and c.parent == root]
    for run in runs:
        kept += clear_run(run)
    layout.lr_choice.unlink(missing_ok=True)
    if lr_dir.is_dir() and not any(lr_dir.iterdir()):
        lr_dir.rmdir()
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
    per-layer) also trained with fit.transfer = previous-group, for the FVU-against-tokens comparison;
    the per-layer SAEs then get a transfer variant too (each layer's from the previous layer's), so the
    two sides compare at equal total compute. compare.budgets: every grouping at each budget of
    tokens per SAE; compare.lr_grid: each arm at its own learning rate, picked on the validation split."""
    executor = executor or InProcess()
    layout = SweepLayout(Path(sweep_dir))
    cfg = harvest_config(cfg, layout.marker)
    refit = open_sweep(layout, cfg, groupings, overwrite)
    stores, resolved, auto, one_harvest = _harvest(cfg, layout, groupings, executor, progress, say)
    wanted = _transfers(transfer or [], resolved, groupings, auto)
    if wanted and PER_LAYER in groupings:
        wanted.add(PER_LAYER)
    arms = Arms(cfg, resolved)
    lr_choice = None
    if cfg.compare.lr_grid:
        source = layout.per_layer if one_harvest else None
        lr_choice = choose_lrs(arms, stores, layout, executor, source=source, refit=refit, progress=progress, say=say)
        arms.lrs = dict(lr_choice.chosen)
        arms.lr_runs = {name: layout.lr_run(name, lr_choice.budget, lr) for name, lr in lr_choice.chosen.items()}
    runs, labels = train_arms(arms, stores, layout, wanted, executor, refit=refit, progress=progress, say=say)
    from ghsae.analysis.sweep import gather_sweep, write_sweep

    lm = Run.open(next(iter(runs.values()))[0]).model(cfg.report.device, cfg.model.dtype)
    source = layout.per_layer if one_harvest else None
    data = gather_sweep(
        cfg, runs, lm, auto=auto, source=source, cache=layout.eval_cache, progress=progress, arms=labels,
        lr_choice=lr_choice,
    )  # fmt: skip
    return write_sweep(data, layout)


def _harvest(
    cfg: PipelineConfig, layout: SweepLayout, groupings: list[str], executor: Executor, progress: bool, say: Callable[[str], None]
) -> tuple[dict[str, list[Path]], dict[str, int], str, bool]:
    """Every grouping's store of every seed: derived from the one all-layers harvest, or each harvested
    directly when those would not fit. Returns the stores, G of each grouping, the AMAD rule's grouping
    and whether there was one harvest."""
    source_cfg = per_layer_config(cfg)
    seeds = range(most_seeds(cfg))
    specs: list[GroupsSpec] = [g if g == "auto" else int(g) for g in groupings if g != PER_LAYER]
    size = plan_all_layers(cfg, layout.per_layer, executor, derived=specs * len(seeds), progress=progress)
    probe = Run.open(layout.per_layer)  # planned: its probe resolves auto and checks every G
    resolved = _resolved(groupings, probe, cfg)
    auto = f"G{n_groups(probe, cfg, 'auto')}"
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
        return runs, resolved, auto, True
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
    return runs, resolved, auto, False


@dataclasses.dataclass
class Arms:
    """The fit config of each arm (a grouping, or per-layer) at a seed, a budget and its learning rate."""

    cfg: PipelineConfig
    resolved: dict[str, int]  # G<n> -> n
    lrs: dict[str, float] = dataclasses.field(default_factory=dict)  # arm -> its chosen rate
    lr_runs: dict[str, Path] = dataclasses.field(default_factory=dict)  # arm -> the grid's run at that rate

    def config(self, name: str, seed: int, budget: int | None, lr: float | None = None) -> PipelineConfig:
        base = per_layer_config(self.cfg) if name == PER_LAYER else grouping_config(self.cfg, self.resolved[name])
        out = seed_config(base, seed, layer_draw=name != PER_LAYER)
        fit = out.fit
        if budget is not None:
            fit = dataclasses.replace(fit, tokens=budget)
        lr = lr if lr is not None else self.lrs.get(name)
        if lr is not None:
            fit = dataclasses.replace(fit, lr=lr)
        return dataclasses.replace(out, fit=fit)

    @property
    def budgets(self) -> list[int | None]:
        return list(self.cfg.compare.budgets) or [None]

    def smallest_budget(self) -> int | None:
        return min(self.cfg.compare.budgets) if self.cfg.compare.budgets else None  # listed in any order

    def grid_run(self, name: str, seed: int, budget: int | None) -> Path | None:
        """The lr grid's run that is this arm's SAEs already (seed 0 at the smallest budget, trained at
        the chosen rate with the same config on the same store); None elsewhere."""
        if seed != 0 or budget != self.smallest_budget():
            return None
        return self.lr_runs.get(name)

    def seeds_at(self, budget: int | None) -> int:
        """Seeds trained at a budget: compare.seeds_at_smallest at the smallest (when set), else compare.seeds."""
        c = self.cfg.compare
        return c.seeds_at_smallest if c.seeds_at_smallest and budget == self.smallest_budget() else c.seeds


def most_seeds(cfg: PipelineConfig) -> int:
    """Seeds any budget trains: each grouping's store is derived for every one of them."""
    return max(cfg.compare.seeds, cfg.compare.seeds_at_smallest)


def _fit(cfg: PipelineConfig, path: Path, executor: Executor, refit: bool, progress: bool, say: Callable[[str], None]) -> None:
    for line in summary_lines(pipeline.fit(cfg, path, executor, overwrite=refit, progress=progress)):
        say(f"{path.name} {line}")


def train_arms(
    arms: Arms,
    stores: dict[str, list[Path]],
    layout: SweepLayout,
    wanted: set[str],
    executor: Executor,
    *,
    refit: bool,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, list[Path]], dict[str, tuple[str, int | None]]]:
    """Every arm's SAEs at every budget and seed (a budget's on hard links to the arm's store, so a
    budget trained before is found trained and kept), and the transfer variants. Returns each
    grouping-at-a-budget's runs and its (arm, budget)."""
    runs: dict[str, list[Path]] = {}
    labels: dict[str, tuple[str, int | None]] = {}
    for name, paths in stores.items():
        for budget in arms.budgets:
            for seed, store in enumerate(paths[: arms.seeds_at(budget)]):
                path = layout.grouping(budget_name(name, budget), seed)
                if budget is not None:
                    link_run(store, path)
                g_cfg = arms.config(name, seed, budget)
                grid_run = arms.grid_run(name, seed, budget)
                if grid_run is not None and not refit and link_trained_saes(grid_run, path):
                    say(f"{path.name}: the SAEs of {grid_run.name} (the lr grid's run at this rate), linked")
                _fit(g_cfg, path, executor, refit, progress, say)
                runs.setdefault(budget_name(name, budget), []).append(path)
                labels[budget_name(name, budget)] = (name, budget)
                if name in wanted:
                    variant = name + TRANSFER_SUFFIX
                    linked = layout.grouping(budget_name(variant, budget), seed)
                    link_run(path, linked)
                    _fit(transfer_config(g_cfg), linked, executor, refit, progress, say)
                    runs.setdefault(budget_name(variant, budget), []).append(linked)
                    labels[budget_name(variant, budget)] = (variant, budget)
    return runs, labels


def choose_lrs(
    arms: Arms,
    stores: dict[str, list[Path]],
    layout: SweepLayout,
    executor: Executor,
    *,
    source: Path | None,
    refit: bool,
    progress: bool,
    say: Callable[[str], None],
) -> LrChoiceRecord:
    """Train each arm (seed 0) at each rate of compare.lr_grid at the smallest budget, and pick each
    arm's rate with the lowest FVU on the validation split; recorded in SWEEP/lr-choice.json. source:
    the all-layers run whose outlier thresholds every arm is scored with (None: the first arm's run)."""
    from ghsae.analysis.sweep import validation_scores

    cfg = arms.cfg
    budget = min(cfg.compare.budgets) if cfg.compare.budgets else cfg.fit.tokens
    grid = sorted(cfg.compare.lr_grid)
    runs: dict[str, list[Path]] = {}
    for name, paths in stores.items():
        for lr in grid:
            path = layout.lr_run(name, budget, lr)
            link_run(paths[0], path)
            _fit(arms.config(name, 0, budget or None, lr), path, executor, refit, progress, say)
            runs.setdefault(name, []).append(path)
    split = held_out_split(Run.open(stores[next(iter(stores))][0]).plan, cfg)
    metric, scores = validation_scores(cfg, runs, split.validation, source=source, progress=progress)
    chosen = {name: grid[int(min(range(len(grid)), key=lambda i: s[i]))] for name, s in scores.items()}
    for name, lr in chosen.items():
        say(f"learning rate for {name}: {lr:g} (validation {metric} {', '.join(f'{v:.4f}' for v in scores[name])})")
    record = LrChoiceRecord(tuple(grid), budget, split.validation, split.eval, metric, scores, chosen)
    save_record(layout.lr_choice, record)
    return record


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
