"""The report's circuit section: generate the tasks, measure them (circuits.py), write
circuits.parquet, draw the curves and render the HTML.

Each task gets one figure per measure: a panel per dictionary kind with one thin line per layer
and the unweighted mean over layers in bold, and the zero- and random-SAE controls on every
panel; a table of the per-group means (unweighted over the group's layers) follows.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghsae.analysis import plots
from ghsae.analysis.circuits import MEASURES, CircuitTarget, Curve, TaskCircuits, curve_rows, run_task
from ghsae.analysis.html import img, table
from ghsae.analysis.tasks import TaskPrompts, make_task, parse_tasks
from ghsae.atomic import write_parquet_atomic
from ghsae.layers import span
from ghsae.layout import CIRCUITS
from ghsae.lm import LoadedModel

log = logging.getLogger(__name__)
TITLES = {
    "faithfulness": "faithfulness (top N + error kept)",
    "faithfulness_no_error": "faithfulness, error mean-ablated too",
    "completeness": "completeness (top N ablated; 0 = complete)",
}


@dataclass(frozen=True)
class CircuitReport:
    results: tuple[TaskCircuits, ...]
    groups: tuple[tuple[int, ...], ...]  # the run's layer groups, for the per-group means
    prompts: int
    seconds: float


def make_tasks(names: list[str], tokenizer, n: int, seed: int) -> list[TaskPrompts]:
    """The report's tasks, generated before any slow eval so a tokenizer that cannot express one fails early."""
    return [make_task(name, tokenizer, n, seed) for name in parse_tasks(names)]


def measure(
    lm: LoadedModel,
    tasks: list[TaskPrompts],
    targets: list[CircuitTarget],
    groups: list[list[int]],
    rc,
    seed: int,
    out_dir: Path,
    hookpoint: str = "resid_post",
) -> CircuitReport:
    results = []
    for task in tasks:
        results.append(
            run_task(
                lm,
                task,
                targets,
                rc.task_layers or None,
                rc.task_kept or None,
                rc.task_min_accuracy,
                rc.task_batch,
                seed,
                log.info,
                hookpoint,
            )
        )
    report = CircuitReport(
        tuple(results), tuple(tuple(g) for g in groups), rc.task_prompts, sum(r.seconds for r in results)
    )
    write_parquet_atomic(out_dir / CIRCUITS, curve_rows(results))
    return report


def mean_curve(curves: list[Curve], layers: set[int] | None = None) -> tuple[list[int], list[float]]:
    """Unweighted mean over layers at each N that every layer has."""
    chosen = [c for c in curves if layers is None or c.layer in layers]
    if not chosen:
        return [], []
    common = sorted(set.intersection(*(set(c.n) for c in chosen)))
    vals = [float(np.mean([c.value[c.n.index(n)] for c in chosen])) for n in common]
    return common, vals


def render_section(report: CircuitReport | None) -> str:
    """The HTML of the circuit section (a pointer to the option when no task was asked for)."""
    if report is None:
        return (
            "<p>No circuit tasks measured. Ask for them with <code>ghsae report --tasks ioi,greater-than,sva</code> "
            "or <code>[report] tasks</code>.</p>"
        )
    parts = [
        "<p>Per layer, one layer at a time: the layer's residual is split into the SAE's latents and an error term "
        "(a group SAE is applied with each served layer's normalisation), latents are ranked by attribution "
        "patching (gradient × activation, the estimated effect of mean-ablating each), and the task metric is "
        "measured with the top N latents kept and the rest mean-ablated (faithfulness), with the error term "
        "mean-ablated as well, and with the top N ablated (completeness). 1 = the clean model, 0 = the layer "
        "mean-ablated whole. The zero SAE (reconstructs nothing, so its error term is the residual) and a random "
        "SAE of the same shape are on every panel: with the error kept, the zero SAE scores 1 at every N. "
        "Means are unweighted over layers and are drawn over the per-layer curves (thin lines).</p>",
        f"<p class='small'>{report.prompts} prompts per task; {report.seconds:,.0f} s for every task.</p>",
    ]
    rows = [
        [
            html.escape(r.check.task),
            f"{r.check.mean_metric:.3f}",
            f"{100 * r.check.accuracy:.0f}%",
            "solved" if r.check.solved else "<span class='warn'>not solved: circuits not measured</span>",
            html.escape(r.check.adaptation),
            f"{r.seconds:,.0f}",
        ]
        for r in report.results
    ]
    parts.append(table(["task", "clean metric", "prompts right", "check", "metric", "seconds"], rows))
    for r in report.results:
        if not r.curves:
            continue
        parts.append(f"<h3>{html.escape(r.check.task)}</h3>")
        parts.append(
            "<p class='small'>m(clean) − m(layer mean-ablated) per layer, the denominator of every normalised value "
            f"(clean metric {r.check.mean_metric:.3f}); in red where it is under a tenth of the clean metric: "
            "mean-ablating that layer barely moves the task, so its normalised curves swing widely and say little: "
            + ", ".join(_gap(layer, gap, r.check.mean_metric) for layer, gap in r.gaps)
            + "</p>"
        )
        for measure in MEASURES:
            by_kind: dict[str, list[Curve]] = {}
            for c in r.curves:
                if c.measure == measure:
                    by_kind.setdefault(c.kind, []).append(c)
            png = curves_figure(
                {k: [(c.layer, list(c.n), list(c.value)) for c in cs] for k, cs in by_kind.items()},
                {k: mean_curve(cs) for k, cs in by_kind.items()},
                f"{r.check.task}: {TITLES[measure]}",
            )
            parts.append(img(png, f"{r.check.task} {measure}"))
        parts.append(_group_table(r, report.groups))
    return "".join(parts)


def curves_figure(per_layer: dict, means: dict, title: str) -> bytes:
    """One panel per measured kind (group, baseline): thin per-layer lines, the bold mean, and the controls."""
    import matplotlib.pyplot as plt

    panels = [k for k in ("group", "baseline") if k in per_layer]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.2), squeeze=False, sharey=True)
    colour = {"group": plots.GROUP_COLOUR, "baseline": plots.BASE_COLOUR}
    for ax, kind in zip(axes[0], panels):
        for _, n, v in per_layer[kind]:
            ax.plot(n, v, color=colour[kind], alpha=0.18, lw=0.8)
        n, v = means[kind]
        label = "group SAEs" if kind == "group" else "per-layer SAEs"
        ax.plot(n, v, "o-", color=colour[kind], ms=3, lw=2, label=f"{label} (mean over layers)")
        if "random" in means:
            n, v = means["random"]
            ax.plot(n, v, "s--", color="0.45", ms=3, label="random SAE (mean)")
        if "zero" in means:
            _, v = means["zero"]
            ax.axhline(float(np.mean(v)), color="k", ls=":", label="zero SAE")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(max(n) for _, n, _ in per_layer[kind]) * 1.2)
        ax.set_xlabel("latents kept / ablated (N)")
        ax.axhline(0, color="0.8", lw=0.6)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("normalised metric")
    fig.suptitle(title, fontsize=10)
    return plots._png(fig)


def _gap(layer: int, gap: float, clean: float) -> str:
    text = f"layer {layer}: {gap:.3f}"
    return f"<span class='warn'>{text}</span>" if gap < 0.1 * abs(clean) else text


def _group_table(r: TaskCircuits, groups) -> str:
    """Per group and measure, the unweighted mean over the group's layers at each N (group SAEs)."""
    ours = [c for c in r.curves if c.kind == "group"]
    if not ours:
        return ""
    grid = sorted({n for c in ours for n in c.n})
    rows = []
    for g in groups:
        for measure in MEASURES:
            n, vals = mean_curve([c for c in ours if c.measure == measure], set(g))
            if not n:
                continue
            at = dict(zip(n, vals))
            rows.append([span(g, "–"), measure] + [f"{at[x]:.3f}" if x in at else "–" for x in grid])
    return "<p>Group SAEs, mean over each group's measured layers:</p>" + table(
        ["layers", "measure"] + [f"N={x}" for x in grid], rows, "wide"
    )
