"""`ghsae report`: evaluate a fitted run (and optionally a per-layer baseline) and write RUN/report/.

    report.html      one self-contained page: evals, baseline comparison, clustering, compute, latents
    metrics.parquet  one row per (seed, SAE, layer)
    summary.md       the headline tables as Markdown
    settings.json    the [report] settings, fit seed and model settings the report was made with

`gather` measures everything into one ReportData; page.py renders it, one function per section.
The evals run on the run's held-out contexts (tokens.npy after the harvested ones); with a baseline,
baseline.py checks from both runs' shard records that neither run harvested them.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ghsae.analysis.baseline import BaselineCheck, check_baseline_data, check_baseline_tokens
from ghsae.analysis.circuit_report import CircuitReport, make_tasks
from ghsae.analysis.circuit_report import measure as measure_circuits
from ghsae.analysis.circuits import CircuitTarget
from ghsae.analysis.dashboards import LatentView, ViewCollector, report_views
from ghsae.analysis.evals import EvalResult, EvalTarget, evaluate, outlier_thresholds
from ghsae.analysis.metric_table import WITH_SE
from ghsae.analysis.metrics import mmcs
from ghsae.analysis.rate import Score, load_scores
from ghsae.analysis.seeds import add_seed_columns
from ghsae.atomic import write_parquet_atomic, write_text_atomic
from ghsae.config import PipelineConfig, ReportConfig
from ghsae.errors import ConfigError, StoreError
from ghsae.harvest import DISTANCES, amad, canonical_distance, complete_linkage, distance_matrix, solve
from ghsae.layout import (
    CIRCUITS,
    REPORT_METRICS,
    REPORT_PAGE,
    REPORT_SETTINGS,
    REPORT_SUMMARY,
    RunLayout,
    sae_training_metrics,
)
from ghsae.lm import LoadedModel
from ghsae.records import DerivedFrom, ReportSettings, load_record, save_record
from ghsae.run import Run
from ghsae.train import settings_mismatch

log = logging.getLogger(__name__)

REPORT_MODEL_FIX = "The report evaluates with the run's own model: restore it, or harvest a new run with this one"

class SAEKind(enum.StrEnum):
    """Which side of the comparison an SAE is on (the `kind` column of metrics.parquet)."""

    GROUP = "group"  # this run's group SAEs
    BASELINE = "baseline"  # a per-layer baseline run's SAEs

    @property
    def label(self) -> str:
        return "group SAEs" if self is SAEKind.GROUP else "per-layer SAEs"


@dataclass
class ReportSide:
    """One run's SAEs and bookkeeping, as the report needs them."""

    run: Run
    kind: SAEKind
    targets: list[EvalTarget]
    fit_seconds: dict[str, float]  # per target name: training wall time (the report's T)
    fit_tokens: dict[str, int]
    folders: dict[str, Path]  # each target's SAE folder, by target name

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.targets}


def load_side(run: Run, kind: SAEKind, allow_partial: bool, prefix: str = "") -> ReportSide:
    """The run's trained SAEs (all of them unless allow_partial), refused when one was trained with
    fit settings other than the run's (saes/fit.json). prefix: before each SAE's name (another seed's)."""
    have = run.trained_groups()
    missing = [g for g in run.plan.group_names if g not in have]
    what = "run" if kind is SAEKind.GROUP else "baseline run"
    if not have:
        raise StoreError(f"the {what} {run.root} has no trained SAE; run `ghsae fit --run-dir {run.root}` first")
    if missing and not allow_partial:
        raise StoreError(
            f"the {what} {run.root} has no trained SAE for {', '.join(missing)}; run `ghsae fit --run-dir {run.root}` "
            "for them, or pass --allow-partial to report on the SAEs that exist"
        )
    targets, seconds, tokens, folders = [], {}, {}, {}
    for g in have:
        record = run.sae_record(g)
        diffs = settings_mismatch(run, g)
        if diffs:
            raise StoreError(
                f"the {what}'s SAE {g} was trained with other fit settings than the run's {run.layout.fit_settings} "
                f"({'; '.join(diffs[:4])}); train it with the run's settings: "
                f"`ghsae fit --run-dir {run.root} --group {g} --overwrite`"
            )
        name = prefix + (g if kind is SAEKind.GROUP else f"per-layer {g}")
        targets.append(EvalTarget(name, kind.value, run.sae(g)))
        folders[name] = run.layout.sae_dir(g)
        seconds[name] = float(record.seconds) if record.seconds is not None else float("nan")
        tokens[name] = record.tokens
    return ReportSide(run, kind, targets, seconds, tokens, folders)


# --- compute and clustering ----------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeAccount:
    """A + G·T against A + L·T, with the measured A and T; storage against every layer's."""

    layers: int
    groups: int
    harvest_seconds: float | None  # A, measured
    fit_seconds_per_sae: float  # T, measured
    fit_tokens_per_sae: int
    bytes_on_disk: int
    bytes_per_token: float | None
    per_layer_bytes_per_token: int
    storage_ratio: float | None
    per_layer_source: str  # "measured on the baseline run" or "estimated: ..."
    per_layer_harvest_seconds: float | None
    per_layer_fit_seconds_per_sae: float
    per_layer_bytes_on_disk: int | None
    derivation_seconds: float | None = None  # a derived run: gathering its rows from the all-layers run

    @property
    def grouped_total_seconds(self) -> float | None:
        if self.harvest_seconds is None:
            return None  # not measured: unknown, not zero
        return self.harvest_seconds + self.groups * self.fit_seconds_per_sae

    @property
    def per_layer_total_seconds(self) -> float | None:
        if self.per_layer_harvest_seconds is None:
            return None
        return self.per_layer_harvest_seconds + self.layers * self.per_layer_fit_seconds_per_sae

    @property
    def speedup(self) -> float | None:
        a, b = self.grouped_total_seconds, self.per_layer_total_seconds
        return b / max(a, 1e-9) if a is not None and b is not None else None


def harvest_cost(run: Run) -> tuple[float | None, float | None]:
    """(A, derivation seconds): the measured model pass behind a run's store. A derived run ran no
    model: its A is the harvest of every layer it was derived from (a direct harvest of the grouping
    runs the same forward pass), and its own plan and shard seconds are the derivation's. A is None
    when the source is gone (the page then says unknown, never 0)."""
    if not run.layout.derived_from.is_file():
        return run.harvest_seconds(), None
    source = load_record(DerivedFrom, run.layout.derived_from).source_path(run.root)
    A = Run.open(source).harvest_seconds() if RunLayout(source).plan.is_file() else None
    return A, run.harvest_seconds()


def compute_account(side: ReportSide, base: ReportSide | None) -> ComputeAccount:
    info = side.run.info()
    A, derive_s = harvest_cost(side.run)
    T = float(np.mean(list(side.fit_seconds.values())))
    L = len(side.run.plan.layers)
    if base is not None:
        A_base, T_base = base.run.harvest_seconds(), float(np.mean(list(base.fit_seconds.values())))
        n = len(base.targets)
        source = (
            "measured on the baseline run"
            if n == L
            else f"A measured; T measured on the {n} per-layer spot-check SAEs, times L = {L}"
        )
        base_bytes: int | None = base.run.info().bytes_on_disk
    else:
        source, A_base, T_base, base_bytes = "estimated: same A, L SAEs at this run's measured T", A, T, None
    return ComputeAccount(
        layers=len(side.run.plan.layers),
        groups=len(side.run.plan.groups),
        harvest_seconds=A,
        fit_seconds_per_sae=T,
        fit_tokens_per_sae=int(np.mean(list(side.fit_tokens.values()))),
        bytes_on_disk=info.bytes_on_disk,
        bytes_per_token=info.bytes_per_token,
        per_layer_bytes_per_token=info.per_layer_bytes_per_token,
        storage_ratio=info.storage_ratio,
        per_layer_source=source,
        per_layer_harvest_seconds=A_base,
        per_layer_fit_seconds_per_sae=T_base,
        per_layer_bytes_on_disk=base_bytes,
        derivation_seconds=derive_s,
    )


@dataclass(frozen=True)
class PartitionAtG:
    method: str
    partition: list[list[int]]
    amad: float


@dataclass(frozen=True)
class AutoChoice:
    """The G that `groups = auto` picks for one distance and method, and its partition."""

    distance: str
    method: str
    groups: int
    amad: float
    partition: list[list[int]]


@dataclass(frozen=True)
class Clustering:
    """Both grouping methods' AMAD curves and partitions, and the G `auto` picks for each method and
    distance, from the run's stored probe; the run's own choice read from its plan."""

    layers: list[int]
    matrices: dict[str, np.ndarray]  # raw / layer-centred distance matrices
    distance: str  # this run's
    method: str  # this run's, as a label
    threshold: float
    curves: dict[str, np.ndarray]  # method label -> AMAD at G = 1..L (this run's distance)
    at_g: list[PartitionAtG]
    auto: list[AutoChoice]
    chosen_groups: list[list[int]]
    chosen_amad: float
    probe_tokens: int
    g: int  # this run's G: groups of the layers partitioned (0..L-2 when the last has its own SAE)
    summary: str  # "G = 6 groups of layers 0..28, plus layer 29 on its own"


METHOD_LABELS = {
    "agglomerative": "agglomerative (complete linkage, adjacent)",
    "reference": "reference (complete linkage of the matrix's rows)",
}


def method_label(method: str, objective: str) -> str:
    return METHOD_LABELS.get(method, f"dp ({objective})")


def clustering(run: Run) -> Clustering:
    sim = np.load(run.layout.similarity)
    layers = sim["layers"].tolist()
    gr = run.plan.grouping
    distance = canonical_distance(gr.distance)
    objective = gr.objective if gr.method == "dp" else "layer-mean"
    G = gr.chosen_groups
    n = len(layers) - 1 if gr.own_last_layer else len(layers)  # the layers the partition covers

    def named(part: list[list[int]]) -> list[list[int]]:
        return [[layers[i] for i in g] for g in part]

    matrices = {d: distance_matrix(sim, d) for d in DISTANCES}
    solutions = {
        d: {m: solve(matrices[d][:n, :n], m, objective) for m in ("dp", "agglomerative", "reference")}
        for d in DISTANCES
    }
    mine = solutions[distance]
    unconstrained = complete_linkage(matrices[distance][:n, :n], G)
    auto = []
    for d, by_method in solutions.items():
        for m, sol in by_method.items():
            g = sol.auto_groups(float(gr.threshold))
            auto.append(AutoChoice(d, method_label(m, objective), g, float(sol.amad[g - 1]), named(sol.partitions[g - 1])))
    at_g = [PartitionAtG(method_label(m, objective), named(sol.partitions[G - 1]), float(sol.amad[G - 1])) for m, sol in mine.items()]
    at_g.append(
        PartitionAtG(
            "complete linkage, unconstrained (not forced contiguous)",
            named(unconstrained),
            amad(matrices[distance][:n, :n], unconstrained),
        )
    )
    return Clustering(
        layers=layers,
        matrices=matrices,
        distance=distance,
        method=method_label(gr.method, objective),
        threshold=float(gr.threshold),
        curves={method_label(m, objective): sol.amad for m, sol in mine.items()},
        at_g=at_g,
        auto=auto,
        chosen_groups=[list(g) for g in run.plan.groups],
        chosen_amad=float(gr.chosen_amad),  # recorded by the plan step, not recomputed
        probe_tokens=run.plan.probe_tokens,
        g=G,
        summary=gr.describe(layers),
    )


def mmcs_by_layer(side: ReportSide, base: ReportSide) -> dict[int, float]:
    """For each layer: MMCS between the group SAE's decoder and that layer's per-layer SAE decoder."""
    base_by_layer = {t.sae.cfg.layers[0]: t for t in base.targets}
    out = {}
    for t in side.targets:
        for layer in t.sae.cfg.layers:
            b = base_by_layer.get(layer)
            if b is not None:
                out[layer] = mmcs(t.sae.W_dec.detach(), b.sae.W_dec.detach())
    return out


def training_curves(side: ReportSide) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves = {}
    for t in side.targets:
        path = sae_training_metrics(side.folders[t.name])
        if path.is_file():
            table = pq.read_table(path, columns=["tokens", "fvu"])
            curves[t.name] = (table["tokens"].to_numpy(), table["fvu"].to_numpy())
    return curves


def token_strings(lm: LoadedModel, contexts: np.ndarray) -> dict[int, str]:
    """Readable text of every token id in the eval contexts (byte-level markers turned into spaces)."""
    ids = np.unique(contexts).tolist()
    tok = lm.tokenizer
    return {i: tok.decode([i], clean_up_tokenization_spaces=False) for i in ids}


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSides:
    """One extra seed of a comparison: its group SAEs and, with spot checks, its per-layer SAEs."""

    seed: int
    side: ReportSide
    base: ReportSide | None

    @property
    def targets(self) -> list[EvalTarget]:
        return self.side.targets + (self.base.targets if self.base else [])


def load_seed_sides(run: Run, own_baseline: bool, allow_partial: bool) -> list[SeedSides]:
    """RUN/seed1, RUN/seed2, ... (compare.seeds): each seed's group SAEs, and its per-layer spot checks
    (RUN/seed<s>/per-layer) when the comparison is the run's own."""
    out = []
    for seed, path in enumerate(run.layout.seed_runs(), start=1):
        srun, prefix = Run.open(path), f"seed{seed} "
        side = load_side(srun, SAEKind.GROUP, allow_partial, prefix)
        base = None
        if own_baseline and RunLayout(srun.layout.per_layer).plan.is_file():
            baseline = Run.open(srun.layout.per_layer)
            check_baseline_data(srun, baseline)
            base = load_side(baseline, SAEKind.BASELINE, True, prefix)  # spot checks: some layers only
        out.append(SeedSides(seed, side, base))
    return out


def choose_ce_layers(rc: ReportConfig, sides: list[SeedSides], spot_checks: bool, layers: list[int]) -> None:
    """Set each SAE's spliced layers from report.ce_layers: every spliced (SAE, layer) costs a pass of
    the later blocks, and the gap needs the group SAEs' CE only where a per-layer SAE has one."""
    choice = rc.ce_layers
    if choice == "auto":
        choice = "spot" if spot_checks else "all"
    if choice == "all":
        return
    if isinstance(choice, list):
        unknown = sorted(set(choice) - set(layers))
        if unknown:
            raise ConfigError(
                f"report.ce_layers names layers {unknown}, which the run does not have (layers {layers[0]}..{layers[-1]}); "
                "list some of those in [report] ce_layers, or set it to \"all\""
            )
        for t in (t for s in sides for t in s.targets):
            t.ce_layers = frozenset(choice)
        return
    spot = frozenset(x for s in sides if s.base for t in s.base.targets for x in t.sae.cfg.layers)
    if not spot:
        raise ConfigError(
            'report.ce_layers is "spot", but the report has no per-layer SAEs to pair with; set ce_layers = "all" '
            "in [report], or report with per-layer SAEs (`ghsae report --baseline BASE_RUN`)"
        )
    for t in (t for s in sides for t in s.side.targets):
        t.ce_layers = spot


def tag_seeds(result: EvalResult, sides: list[SeedSides]) -> None:
    """Each row's seed, and each metric's standard error across the seeds of its kind at its layer."""
    seed_of = {t.name: s.seed for s in sides for t in s.targets}
    for r in result.rows:
        r["seed"] = seed_of[r["sae"]]
    add_seed_columns(result.rows, lambda r: r["kind"], WITH_SE)


@dataclass
class ReportData:
    """Everything the page and the summary show, measured once."""

    side: ReportSide
    base: ReportSide | None
    fairness: BaselineCheck | None
    result: EvalResult
    clustering: Clustering
    compute: ComputeAccount
    mmcs: dict[int, float]  # layer -> MMCS against the baseline's SAE of that layer
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # SAE name -> (tokens, training FVU)
    contexts: np.ndarray
    token_text: dict[int, str]
    settings: ReportConfig
    circuits: CircuitReport | None = None
    dashboards: dict[tuple[str, int], list[LatentView]] = field(default_factory=dict)
    ratings: list[Score] | None = None
    own_baseline: bool = False  # the baseline is this run's own all-layers harvest (RUN/per-layer)
    seed_sides: list[SeedSides] = field(default_factory=list)
    """Seeds 1.. of the comparison (RUN/seed<s>/): their SAEs, evaluated with seed 0's on the same
    contexts. Every section but the gap shows seed 0 (this run); the gap averages every seed."""

    @property
    def n_seeds(self) -> int:
        return 1 + len(self.seed_sides)

    def rows_by_seed(self, kind: SAEKind) -> list[dict[int, dict]]:
        """rows(kind) of each seed, seed 0 first (a seed without SAEs of that kind ends the list)."""
        out = []
        for seed in range(self.n_seeds):
            by = {r["layer"]: r for r in self.result.rows if r["kind"] == kind.value and r.get("seed", 0) == seed}
            if not by:
                break
            out.append(by)
        return out

    @property
    def plan(self):
        return self.side.run.plan

    @property
    def compared_layers(self) -> list[int]:
        """The layers with both a group SAE and a per-layer SAE (all of them, or the spot checks)."""
        theirs = self.rows(SAEKind.BASELINE)
        return [x for x in self.plan.layers if x in theirs and x in self.rows(SAEKind.GROUP)]

    @property
    def spot_checks(self) -> bool:
        """The per-layer SAEs cover some layers only: the comparison is at those layers."""
        return self.base is not None and len(self.compared_layers) < len(self.plan.layers)

    @property
    def sides(self) -> list[ReportSide]:
        return [self.side] + ([self.base] if self.base else [])

    def rows(self, kind: SAEKind) -> dict[int, dict]:
        """metrics.parquet's rows of one kind, by layer: seed 0's (this run's own SAEs)."""
        return {r["layer"]: r for r in self.result.rows if r["kind"] == kind.value and r.get("seed", 0) == 0}


def report_model_settings(run: Run, cfg: PipelineConfig) -> dict[str, str]:
    """The model a report evaluates with: the run's model as harvested, on the report's device, in the
    run's compute dtype (what report/settings.json records; Run.model loads it)."""
    return {"path": run.settings().model.path, "device": cfg.report.device, "dtype": cfg.model.dtype}


def gather(
    cfg: PipelineConfig,
    run: Run,
    lm: LoadedModel,
    baseline: Run | None = None,
    *,
    allow_partial: bool = False,
    allow_unmatched: bool = False,
    spot_checks: bool = False,
    progress: bool = True,
) -> ReportData:
    """Measure every section of the report (the slow part: evals, dashboards, circuits).

    spot_checks: the baseline is the run's own all-layers run (RUN/per-layer), with per-layer SAEs
    at some layers only; the report compares at exactly those layers."""
    side = load_side(run, SAEKind.GROUP, allow_partial)
    base, fairness = None, None
    if baseline is not None:
        check_baseline_data(run, baseline)  # before loading any of its SAEs
        base = load_side(baseline, SAEKind.BASELINE, allow_partial or spot_checks)
        fairness = check_baseline_tokens(run, side.fit_tokens, baseline, base.fit_tokens, allow_unmatched)
    lm.check_matches(run.plan.model, fix=REPORT_MODEL_FIX)
    contexts = run.eval_contexts()
    rc, seed = cfg.report, cfg.fit.seed
    targets = side.targets + (base.targets if base else [])
    seeds = [SeedSides(0, side, base), *load_seed_sides(run, base is not None and spot_checks, allow_partial)]
    tasks = make_tasks(rc.tasks, lm.tokenizer, rc.task_prompts, seed)  # before the slow evals: fails early
    special = list(run.plan.tokenizer.special_ids)
    choose_ce_layers(rc, seeds, spot_checks, list(run.plan.layers))
    views = ViewCollector({t.name: t.sae for t in targets}, per_latent=1)  # the dashboards, fed by the eval's pass
    result = evaluate(
        lm,
        contexts,
        [t for s in seeds for t in s.targets],  # every seed on the same contexts: paired
        special,
        ce_contexts=-(-rc.ce_tokens // contexts.shape[1]),
        batch_contexts=rc.batch_contexts,
        latents_sampled=4 * rc.latents_shown,
        examples_per_latent=rc.examples_per_latent,
        seed=seed,
        progress=progress,
        outlier_threshold=outlier_thresholds(run, rc.outlier_factor),
        hookpoint=run.plan.hookpoint,
        observe=views.add,
    )
    tag_seeds(result, seeds)
    run.layout.report.mkdir(exist_ok=True)
    circuits = None
    if tasks:
        circuit_targets = [CircuitTarget(t.name, t.kind, t.sae) for t in targets]
        circuits = measure_circuits(
            lm, tasks, circuit_targets, [list(g) for g in run.plan.groups], rc, seed, run.layout.report,
            run.plan.hookpoint,
        )
    return ReportData(
        side=side,
        base=base,
        fairness=fairness,
        result=result,
        clustering=clustering(run),
        compute=compute_account(side, base),
        mmcs=mmcs_by_layer(side, base) if base else {},
        curves={**training_curves(side), **(training_curves(base) if base else {})},
        contexts=contexts,
        token_text=token_strings(lm, contexts),
        settings=rc,
        circuits=circuits,
        dashboards=report_views(lm, views, result.examples, [t.name for t in targets], rc.latents_shown),
        ratings=load_scores(run.layout),
        own_baseline=spot_checks,
        seed_sides=seeds[1:],
    )


def write_report(data: ReportData, cfg: PipelineConfig) -> Path:
    """metrics.parquet, report.html, summary.md and settings.json, each written atomically."""
    from ghsae.analysis.page import render_page, render_summary

    layout = data.side.run.layout
    out = layout.report
    out.mkdir(exist_ok=True)
    write_parquet_atomic(layout.report_file(REPORT_METRICS), data.result.rows)
    if data.circuits is None:  # circuit results of an earlier report (other --tasks) would pass for this one's
        layout.report_file(CIRCUITS).unlink(missing_ok=True)
    write_text_atomic(layout.report_file(REPORT_PAGE), render_page(data))
    write_text_atomic(layout.report_file(REPORT_SUMMARY), render_summary(data))
    save_record(
        layout.report_file(REPORT_SETTINGS),
        ReportSettings(
            report=cfg.to_dict()["report"],
            seed=cfg.fit.seed,
            model=report_model_settings(data.side.run, cfg),
            baseline=str(data.base.run.root) if data.base else None,
        ),
    )
    return out
