"""The sweep's measurements: every grouping's SAEs and the per-layer SAEs evaluated together on the
same held-out tokens (so differences are paired), with each grouping's measured cost and storage.

    SWEEP/report/sweep.html      the paper's figure for this model: quality against G and against compute
    SWEEP/report/metrics.parquet one row per (grouping, SAE, layer)
    SWEEP/report/summary.md      the table as Markdown
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ghsae.analysis.evals import EvalResult, EvalTarget, evaluate
from ghsae.atomic import write_bytes_atomic, write_parquet_atomic, write_text_atomic
from ghsae.config import PipelineConfig, ReportConfig
from ghsae.errors import StoreError
from ghsae.layout import SWEEP_METRICS, SWEEP_PAGE, SWEEP_SUMMARY, SweepLayout, sae_training_metrics
from ghsae.lm import LoadedModel
from ghsae.run import Run

PER_LAYER = "per-layer"
TRANSFER_SUFFIX = "-transfer"
# The paper's Pythia-160M figures (Ghilardi et al. 2025; mean over layers 0..L-2), far longer training.
PAPER = {"model": "Pythia-160M", "per-layer": (0.097, 5.33), "G": 6, "grouped": (0.108, 6.01)}


@dataclass
class Grouping:
    """One grouping of the sweep: its run, SAEs and what they cost."""

    name: str  # G<n>, per-layer, or G<n>-transfer
    run: Run
    targets: list[EvalTarget]
    fit_seconds: float  # T: mean measured training seconds per SAE
    tokens_per_sae: int
    store_bytes: int  # its activation store on disk (measured)
    bytes_per_token: float | None
    auto: bool = False  # the G the AMAD rule picks

    @property
    def n_groups(self) -> int:
        return len(self.run.plan.groups)

    @property
    def transfer(self) -> bool:
        return self.name.endswith(TRANSFER_SUFFIX)

    @property
    def amad(self) -> float:
        return float(self.run.plan.grouping.chosen_amad)


@dataclass
class SweepData:
    groupings: list[Grouping]
    result: EvalResult
    layers: list[int]
    harvest_seconds: float | None  # A: the one model pass (the all-layers harvest), measured
    settings: ReportConfig
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """grouping -> SAE name -> (training tokens, batch FVU): the transfer comparison's curves."""

    def by_name(self, name: str) -> Grouping | None:
        return next((g for g in self.groupings if g.name == name), None)

    @property
    def per_layer(self) -> Grouping | None:
        return self.by_name(PER_LAYER)

    def keys(self, g: Grouping, layers: list[int]) -> list[tuple[str, int]]:
        """(SAE name, layer) of every layer in `layers` that the grouping's SAEs serve."""
        serving = {layer: t.name for t in g.targets for layer in t.sae.cfg.layers}
        return [(serving[x], x) for x in layers if x in serving]

    def total_seconds(self, g: Grouping) -> float:
        """A + G·T with the measured A (the one harvest) and this grouping's measured T."""
        return (self.harvest_seconds or 0.0) + g.n_groups * g.fit_seconds


def load_grouping(name: str, run: Run, auto: bool) -> Grouping:
    missing = [g for g in run.plan.group_names if not run.sae_trained(g)]
    if missing:
        raise StoreError(f"{run.root} has no trained SAE for {', '.join(missing)}; re-run `ghsae sweep` to finish it")
    targets, seconds, tokens = [], [], []
    for g in run.plan.group_names:
        record = run.sae_record(g)
        # a transfer variant is there for its FVU against training tokens: no CE passes for it
        targets.append(EvalTarget(f"{name}/{g}", name, run.sae(g), spliced=not name.endswith(TRANSFER_SUFFIX)))
        seconds.append(record.seconds if record.seconds is not None else float("nan"))
        tokens.append(record.tokens)
    info = run.info()
    return Grouping(name, run, targets, float(np.mean(seconds)), int(np.mean(tokens)), info.bytes_on_disk, info.bytes_per_token, auto)


def gather_sweep(
    cfg: PipelineConfig,
    runs: dict[str, Path],
    lm: LoadedModel,
    *,
    auto: str | None,
    source: Path | None,
    progress: bool = True,
) -> SweepData:
    """Evaluate every grouping's SAEs in one pass over the held-out tokens of the sweep's token stream."""
    groupings = [load_grouping(name, Run.open(path), name == auto) for name, path in runs.items()]
    # G ascending, each transfer variant after its grouping, per-layer (the reference) last
    groupings.sort(key=lambda g: (g.name == PER_LAYER, g.n_groups, g.transfer))
    first = groupings[0].run
    for g in groupings[1:]:  # derived runs share the source's tokens: the same eval contexts
        if g.run.plan.eval_contexts != first.plan.eval_contexts or g.run.plan.dataset != first.plan.dataset:
            raise StoreError(f"{g.run.root} was not harvested from the same token stream as {first.root}")
    lm.check_matches(first.plan.model)
    contexts = first.eval_contexts()
    rc = cfg.report
    result = evaluate(
        lm,
        contexts,
        [t for g in groupings for t in g.targets],
        list(first.plan.tokenizer.special_ids),
        ce_contexts=-(-rc.ce_tokens // contexts.shape[1]),
        batch_contexts=rc.batch_contexts,
        latents_sampled=1,  # the sweep shows no latents; the report of each run does
        examples_per_latent=1,
        seed=cfg.fit.seed,
        progress=progress,
        zero_ablation=False,  # the sweep shows no CE-loss score: a pass per layer saved
    )
    A = Run.open(source).harvest_seconds() if source is not None else first.harvest_seconds()
    curves = {
        g.name: {t.name: _curve(g.run, t.name.split("/")[-1]) for t in g.targets}
        for g in groupings
        if g.transfer or any(h.name == g.name + TRANSFER_SUFFIX for h in groupings)
    }
    return SweepData(groupings, result, list(first.plan.layers), A, rc, curves)


def _curve(run: Run, group: str) -> tuple[np.ndarray, np.ndarray]:
    path = sae_training_metrics(run.layout.sae_dir(group))
    table = pq.read_table(path, columns=["tokens", "fvu"])
    return table["tokens"].to_numpy(), table["fvu"].to_numpy()


def metric_rows(data: SweepData) -> list[dict]:
    """metrics.parquet: every (grouping, SAE, layer) row, with the grouping's size and cost."""
    meta = {g.name: g for g in data.groupings}
    out = []
    for r in data.result.rows:
        g = meta[r["kind"]]
        out.append(
            {
                "grouping": g.name,
                "n_groups": g.n_groups,
                "transfer": g.transfer,
                "auto": g.auto,
                "group": r["sae"].split("/")[-1],
                "tokens_per_sae": g.tokens_per_sae,
                "fit_seconds_per_sae": g.fit_seconds,
                "total_seconds": data.total_seconds(g),
                **{k: v for k, v in r.items() if k != "kind"},
            }
        )
    return out


def write_sweep(data: SweepData, layout: SweepLayout) -> Path:
    """report/: the page, its table as Markdown, every row as parquet, and each metric's figure as a PNG."""
    from ghsae.analysis.sweep_page import METRICS, metric_figure, render_sweep_page, render_sweep_summary

    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(out / SWEEP_METRICS, metric_rows(data))
    write_text_atomic(out / SWEEP_PAGE, render_sweep_page(data))
    write_text_atomic(out / SWEEP_SUMMARY, render_sweep_summary(data))
    for key, label, _ in METRICS:
        write_bytes_atomic(layout.figure(key), metric_figure(data, key, label))
    return out
