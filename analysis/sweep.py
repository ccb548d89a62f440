"""The sweep's measurements: every grouping's SAEs and the per-layer SAEs evaluated together on the
same held-out tokens (so differences are paired), with each grouping's measured cost and storage.

    SWEEP/report/sweep.html      the paper's figure for this model: quality against G and against compute
    SWEEP/report/metrics.parquet one row per (grouping, seed, SAE, layer)
    SWEEP/report/summary.md      the table as Markdown
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ghsae.analysis.evals import EvalResult, EvalTarget, evaluate, outlier_thresholds
from ghsae.analysis.metric_table import WITH_SE
from ghsae.analysis.seeds import add_seed_columns
from ghsae.atomic import write_bytes_atomic, write_parquet_atomic, write_text_atomic
from ghsae.config import PipelineConfig, ReportConfig
from ghsae.errors import StoreError
from ghsae.layout import (
    PER_LAYER_DIR,
    SWEEP_METRICS,
    SWEEP_PAGE,
    SWEEP_SUMMARY,
    TRANSFER_SUFFIX,
    SweepLayout,
    sae_training_metrics,
    sae_weights,
    seed_name,
)
from ghsae.lm import LoadedModel
from ghsae.records import LrChoiceRecord
from ghsae.run import Run

log = logging.getLogger(__name__)

PER_LAYER = PER_LAYER_DIR  # the per-layer grouping is the sweep's all-layers run
# The paper's Pythia-160M figures (Ghilardi et al. 2025; mean over layers 0..L-2), far longer training.
PAPER = {"model": "Pythia-160M", "per-layer": (0.097, 5.33), "G": 6, "grouped": (0.108, 6.01)}


@dataclass
class Grouping:
    """One grouping of the sweep: its run and SAEs of each seed, and what they cost."""

    name: str  # G<n>, per-layer, or G<n>-transfer
    runs: list[Run]  # one per seed, seed 0 first
    targets_by_seed: list[list[EvalTarget]]
    fit_seconds: float  # T: mean measured training seconds per SAE (over every seed's)
    tokens_per_sae: int
    store_bytes: int  # its activation store on disk (measured)
    bytes_per_token: float | None
    own_harvest_seconds: float | None  # its own store's harvest (a derived run's: the derivation)
    auto: bool = False  # the G the AMAD rule picks
    arm: str = ""  # G<n>, per-layer or G<n>-transfer without the budget ("": the name itself)
    budget: int | None = None  # tokens per SAE asked of this grouping (compare.budgets), None without budgets

    @property
    def base(self) -> str:
        """The arm this grouping is, whatever its budget."""
        return self.arm or self.name

    @property
    def tokens(self) -> int:
        """Tokens per SAE: the budget, or what the SAEs' records say without budgets."""
        return self.budget if self.budget is not None else self.tokens_per_sae

    @property
    def tokens_per_layer(self) -> float:
        """Tokens each layer sees: tokens per SAE over the layers per group."""
        return self.tokens * self.n_groups / len(self.run.plan.layers)

    @property
    def run(self) -> Run:
        """Seed 0's run (its plan, store and size stand for every seed's: the same grouping and tokens)."""
        return self.runs[0]

    @property
    def targets(self) -> list[EvalTarget]:
        """Seed 0's SAEs."""
        return self.targets_by_seed[0]

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def n_groups(self) -> int:
        return len(self.run.plan.groups)

    @property
    def transfer(self) -> bool:
        return self.base.endswith(TRANSFER_SUFFIX)

    @property
    def amad(self) -> float:
        return float(self.run.plan.grouping.chosen_amad)


@dataclass
class SweepData:
    groupings: list[Grouping]
    result: EvalResult
    layers: list[int]
    harvest_seconds: float | None  # A: the one model pass (the all-layers harvest), None when each grouping had its own
    settings: ReportConfig
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """grouping -> SAE name -> (training tokens, batch FVU): the transfer comparison's curves."""
    lr_choice: LrChoiceRecord | None = None  # each arm's learning rate, when the sweep chose them

    def by_name(self, name: str) -> Grouping | None:
        return next((g for g in self.groupings if g.name == name), None)

    def arm_at(self, arm: str, budget: int | None) -> Grouping | None:
        return next((g for g in self.groupings if g.base == arm and g.budget == budget), None)

    def scratch_of(self, g: Grouping) -> Grouping | None:
        """The from-scratch grouping a transfer variant was trained beside."""
        return self.arm_at(g.base.removesuffix(TRANSFER_SUFFIX), g.budget)

    @property
    def per_layer(self) -> Grouping | None:
        """The per-layer SAEs (of the first budget present: a view at one budget has one)."""
        return next((g for g in self.groupings if g.base == PER_LAYER), None)

    @property
    def budgets(self) -> list[int]:
        return sorted({g.budget for g in self.groupings if g.budget is not None})

    def at_budget(self, budget: int | None) -> SweepData:
        """The sweep at one budget: what the page's G and compute figures show."""
        return replace(self, groupings=[g for g in self.groupings if g.budget == budget])

    def lr_of(self, g: Grouping) -> float | None:
        """The learning rate the grouping's arm was chosen to train with (None: fit.lr, not chosen)."""
        if self.lr_choice is None:
            return None
        return self.lr_choice.chosen.get(g.base.removesuffix(TRANSFER_SUFFIX))

    def keys(self, g: Grouping, layers: list[int], seed: int = 0) -> list[tuple[str, int]]:
        """(SAE name, layer) of every layer in `layers` that the grouping's SAEs of `seed` serve."""
        serving = {layer: t.name for t in g.targets_by_seed[seed] for layer in t.sae.cfg.layers}
        return [(serving[x], x) for x in layers if x in serving]

    def keys_by_seed(self, g: Grouping, layers: list[int]) -> list[list[tuple[str, int]]]:
        return [self.keys(g, layers, seed) for seed in range(g.n_seeds)]

    @property
    def n_seeds(self) -> int:
        """Seeds per arm (the fewest any grouping has: a gap pairs seeds by index)."""
        return min(g.n_seeds for g in self.groupings)

    def layer_mean(self, g: Grouping, layer: int, metric: str) -> float:
        """`metric` at one layer, averaged over the grouping's seeds."""
        vals = [r[metric] for r in self.result.rows if r["kind"] == g.name and r["layer"] == layer and metric in r]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def one_harvest(self) -> bool:
        """Every grouping's store came from the one all-layers harvest (else each had its own)."""
        return self.harvest_seconds is not None

    def harvest_of(self, g: Grouping) -> float | None:
        """A for grouping g: the one harvest's, or its own when the sweep harvested each directly."""
        return self.harvest_seconds if self.one_harvest else g.own_harvest_seconds

    def total_seconds(self, g: Grouping) -> float | None:
        """A + G·T with the measured A and this grouping's measured T (None when A is not recorded)."""
        A = self.harvest_of(g)
        return A + g.n_groups * g.fit_seconds if A is not None else None


def load_grouping(name: str, runs: list[Run], auto: bool, arm: str = "", budget: int | None = None) -> Grouping:
    """A grouping's SAEs of every seed, named `<folder>/<group>` (seed 0's as before seeds existed) and
    all of kind `name`, so that the evaluation's rows of every seed carry their grouping."""
    targets_by_seed, seconds, tokens = [], [], []
    for seed, run in enumerate(runs):
        missing = [g for g in run.plan.group_names if not run.sae_trained(g)]
        if missing:
            raise StoreError(f"{run.root} has no trained SAE for {', '.join(missing)}; re-run `ghsae sweep` to finish it")
        targets = []
        for g in run.plan.group_names:
            record = run.sae_record(g)
            # a transfer variant is there for its FVU against training tokens: no CE passes for it
            spliced = not name.endswith(TRANSFER_SUFFIX)
            targets.append(EvalTarget(f"{seed_name(name, seed)}/{g}", name, run.sae(g), spliced=spliced))
            seconds.append(record.seconds if record.seconds is not None else float("nan"))
            tokens.append(record.tokens)
        targets_by_seed.append(targets)
    run = runs[0]
    info = run.info()
    return Grouping(
        name,
        runs,
        targets_by_seed,
        float(np.mean(seconds)),
        int(np.mean(tokens)),
        info.bytes_on_disk,
        info.bytes_per_token,
        run.harvest_seconds(),
        auto,
        arm,
        budget,
    )


def gather_sweep(
    cfg: PipelineConfig,
    runs: dict[str, list[Path]],
    lm: LoadedModel,
    *,
    auto: str | None,
    source: Path | None,
    cache: Path | None = None,
    progress: bool = True,
    arms: dict[str, tuple[str, int | None]] | None = None,
    lr_choice: LrChoiceRecord | None = None,
) -> SweepData:
    """Evaluate every grouping's SAEs in one pass over the held-out tokens of the sweep's token stream
    (read back from `cache` when it holds the evaluation of exactly these SAEs and settings).

    source: the all-layers run every store was derived from (its harvest is A), or None when each
    grouping was harvested directly (each has its own A). runs: each grouping's run of every seed, seed 0
    first. arms: each name's (arm, budget) when the sweep has budgets. lr_choice: the learning rates
    chosen on the validation split, whose contexts the evaluation leaves out."""
    arms = arms or {}
    groupings = []
    for name, paths in runs.items():
        arm, budget = arms.get(name, (name, None))
        groupings.append(load_grouping(name, [Run.open(p) for p in paths], arm == auto, arm, budget))
    # budget ascending; G ascending, each transfer variant after its grouping, per-layer (the reference) last
    groupings.sort(key=lambda g: (g.budget or 0, g.base.startswith(PER_LAYER), g.n_groups, g.transfer))
    first = groupings[0].run
    for run in (r for g in groupings for r in g.runs):  # derived runs share the source's tokens: the same eval contexts
        if run.plan.eval_contexts != first.plan.eval_contexts or run.plan.dataset != first.plan.dataset:
            raise StoreError(f"{run.root} was not harvested from the same token stream as {first.root}")
    lm.check_matches(first.plan.model)
    contexts = first.eval_contexts()
    if lr_choice is not None:  # the validation split's contexts are left out: the rates were picked on them
        start, stop = lr_choice.eval_contexts
        contexts = np.array(first.tokens()[start:stop])
    rc = cfg.report
    targets = [t for g in groupings for seed_targets in g.targets_by_seed for t in seed_targets]
    ce_contexts = -(-rc.ce_tokens // contexts.shape[1])
    key = _evaluation_key(groupings, first, ce_contexts, rc.batch_contexts, cfg.fit.seed, lr_choice)
    result = _read_cache(cache, key)
    if result is None:
        result = evaluate(
            lm,
            contexts,
            targets,
            list(first.plan.tokenizer.special_ids),
            ce_contexts=ce_contexts,
            batch_contexts=rc.batch_contexts,
            latents_sampled=1,  # the sweep shows no latents; the report of each run does
            examples_per_latent=1,
            seed=cfg.fit.seed,
            progress=progress,
            zero_ablation=False,  # the sweep shows no CE-loss score: a pass per layer saved
            # one threshold per layer for every grouping: the all-layers source's, which saw every token
            outlier_threshold=outlier_thresholds(Run.open(source) if source is not None else first, rc.outlier_factor),
            hookpoint=first.plan.hookpoint,
        )
        if cache is not None:
            _write_cache(cache, key, result)
    A = Run.open(source).harvest_seconds() if source is not None else None
    curves = {
        g.name: {t.name: _curve(g.run, t.name.split("/")[-1]) for t in g.targets}
        for g in groupings
        if g.transfer or any(h.base == g.base + TRANSFER_SUFFIX and h.budget == g.budget for h in groupings)
    }
    return SweepData(groupings, result, list(first.plan.layers), A, rc, curves, lr_choice)


def validation_scores(
    cfg: PipelineConfig, runs: dict[str, list[Path]], validation: tuple[int, int], *, source: Path | None, progress: bool
) -> tuple[str, dict[str, tuple[float, ...]]]:
    """Each arm's mean FVU (over its SAEs and layers) on the validation contexts, for each of its runs
    (one per learning rate): typical-token FVU, all tokens' where the run has no outlier threshold."""
    opened = {name: [Run.open(p) for p in paths] for name, paths in runs.items()}
    first = next(iter(opened.values()))[0]
    targets = [
        EvalTarget(f"{name}/{i}/{g}", f"{name}/{i}", run.sae(g), spliced=False)
        for name, rs in opened.items()
        for i, run in enumerate(rs)
        for g in run.plan.group_names
    ]
    start, stop = validation
    lm = first.model(cfg.report.device, cfg.model.dtype)
    result = evaluate(
        lm, np.array(first.tokens()[start:stop]), targets, list(first.plan.tokenizer.special_ids), ce_contexts=0,
        batch_contexts=cfg.report.batch_contexts, latents_sampled=1, examples_per_latent=1, seed=cfg.fit.seed,
        progress=progress, zero_ablation=False, outlier_threshold=outlier_thresholds(Run.open(source) if source else first, cfg.report.outlier_factor),
        hookpoint=first.plan.hookpoint,
    )  # fmt: skip
    metric = "fvu_typical" if all("fvu_typical" in r for r in result.rows) else "fvu"
    scores = {
        name: tuple(float(np.mean([r[metric] for r in result.rows if r["kind"] == f"{name}/{i}"])) for i in range(len(rs)))
        for name, rs in opened.items()
    }
    return metric, scores


def _evaluation_key(
    groupings: list[Grouping], first: Run, ce_contexts: int, batch: int, seed: int, lr_choice: LrChoiceRecord | None
) -> str:
    """What an evaluation depends on: every SAE's weights file (name, size, time written), the token
    stream and its eval split, and the eval settings."""
    saes = []
    for g in groupings:
        for run, targets in zip(g.runs, g.targets_by_seed):
            for t in targets:
                path = sae_weights(run.layout.sae_dir(t.name.split("/")[-1]))
                st = path.stat()
                saes.append([t.name, t.spliced, st.st_size, st.st_mtime_ns])
    return json.dumps(
        {
            "saes": saes,
            "tokens": first.plan.dataset.fingerprint,
            "eval": list(lr_choice.eval_contexts if lr_choice else first.plan.eval_contexts),
            "ce_contexts": ce_contexts,
            "batch": batch,
            "seed": seed,
        },
        sort_keys=True,
    )


def _write_cache(path: Path, key: str, result: EvalResult) -> None:
    """The evaluation's rows, per-context influences and totals, for a re-render without evaluating."""
    arrays = {f"influence/{name}/{layer}/{metric}": v for (name, layer), by in result.influence.items() for metric, v in by.items()}
    arrays.update({f"density/{name}": d for name, d in result.densities.items()})
    meta = {
        "key": key,
        "rows": result.rows,
        "totals": [result.clean_ce, result.ce_tokens, result.eval_tokens, result.ce_contexts, result.eval_contexts],
    }
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getbuffer())


def _read_cache(path: Path | None, key: str) -> EvalResult | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta["key"] != key:
                return None
            influence: dict[tuple[str, int], dict[str, np.ndarray]] = {}
            densities = {}
            for name in z.files:
                parts = name.split("/")
                if parts[0] == "influence":
                    influence.setdefault(("/".join(parts[1:-2]), int(parts[-2])), {})[parts[-1]] = z[name]
                elif parts[0] == "density":
                    densities["/".join(parts[1:])] = z[name]
    except (OSError, ValueError, KeyError) as e:  # a damaged cache is evaluated again, not trusted
        log.warning("%s cannot be read (%s); evaluating again", path, e)
        return None
    clean_ce, ce_tokens, eval_tokens, ce_ctx, eval_ctx = meta["totals"]
    log.info("evaluation read back from %s", path)
    return EvalResult(meta["rows"], densities, {}, clean_ce, ce_tokens, eval_tokens, ce_ctx, eval_ctx, influence)


def _curve(run: Run, group: str) -> tuple[np.ndarray, np.ndarray]:
    path = sae_training_metrics(run.layout.sae_dir(group))
    table = pq.read_table(path, columns=["tokens", "fvu"])
    return table["tokens"].to_numpy(), table["fvu"].to_numpy()


def metric_rows(data: SweepData) -> list[dict]:
    """metrics.parquet: every (grouping, seed, SAE, layer) row, with the grouping's size and cost, and
    each metric's standard error across the grouping's seeds at that layer (`<metric>_seed_se`)."""
    meta = {g.name: g for g in data.groupings}
    seed_of = {t.name: seed for g in data.groupings for seed, ts in enumerate(g.targets_by_seed) for t in ts}
    out = []
    for r in data.result.rows:
        g = meta[r["kind"]]
        out.append(
            {
                "grouping": g.name,
                "seed": seed_of[r["sae"]],
                "n_groups": g.n_groups,
                "transfer": g.transfer,
                "auto": g.auto,
                "group": r["sae"].split("/")[-1],
                "tokens_per_sae": g.tokens_per_sae,
                "tokens": g.tokens,
                "tokens_per_layer": g.tokens_per_layer,
                "arm": g.base,
                "lr": data.lr_of(g),
                "fit_seconds_per_sae": g.fit_seconds,
                "total_seconds": data.total_seconds(g),
                **{k: v for k, v in r.items() if k != "kind"},
            }
        )
    add_seed_columns(out, lambda row: row["grouping"], WITH_SE)
    return out


def write_sweep(data: SweepData, layout: SweepLayout) -> Path:
    """report/: the page, its table as Markdown, every row as parquet, and each metric's figure as a PNG."""
    from ghsae.analysis.sweep_page import metric_figures, render_sweep_page, render_sweep_summary

    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(out / SWEEP_METRICS, metric_rows(data))
    figures = metric_figures(data)
    write_text_atomic(out / SWEEP_PAGE, render_sweep_page(data, figures))
    write_text_atomic(out / SWEEP_SUMMARY, render_sweep_summary(data))
    for key, png in figures.items():
        write_bytes_atomic(layout.figure(key), png)
    return out
