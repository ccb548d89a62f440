"""Every metric the evaluation reports, declared once: its column, its headings, its format, whether it
carries a standard error, and where it is shown. evals.py, page.py and sweep_page.py read this table;
adding a metric is its computation (evals.py) and one row here (ARCHITECTURE.md, Extending).

Each figure that can be swayed by a few massive-activation tokens has a `_typical` twin (those tokens
left out of FVU, kept clean when spliced). The twin comes first here: it is the view the pages quote.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    """The column in every row of an evaluation (and in metrics.parquet)."""
    heading: str
    """Its heading on the report page and in summary.md."""
    fmt: str
    """How a value is printed (str.format)."""
    se: bool = False
    """Reported with a standard error over eval contexts (column `<key>_se`, from per-context
    influences; means over layers and paired differences are built from the same influences)."""
    in_table: bool = True
    """A column of the report's per-layer table and summary.md's headline table."""
    plotted: bool = False
    """A per-layer figure on the report page."""
    compared: bool = False
    """A column of the report's table against per-layer SAEs."""
    gap: str = ""
    """Its label in the report's gap paragraph ("": not there); both views, typical and all tokens."""
    sweep: str = ""
    """Its heading on the sweep page (table, figures, summary.md); "": not on the sweep page. Only a
    metric with a standard error can be there: the sweep's gaps are paired by context."""
    diff_fmt: str = ""
    """How a paired difference is printed on the sweep page ("": as the value)."""

    @property
    def diff_spec(self) -> str:
        return self.diff_fmt or self.fmt


TYPICAL = "_typical"  # the suffix of a metric's twin over typical tokens

METRICS: tuple[Metric, ...] = (
    Metric("l0", "L0", "{:.1f}", plotted=True, compared=True),
    Metric("mse", "MSE", "{:.4g}"),
    Metric(
        "fvu_typical", "FVU typical", "{:.3f}", se=True, plotted=True, sweep="FVU (typical tokens)", diff_fmt="{:.4f}"
    ),
    Metric(
        "fvu",
        "FVU",
        "{:.3f}",
        se=True,
        plotted=True,
        compared=True,
        gap="FVU",
        sweep="FVU (all tokens)",
        diff_fmt="{:.4f}",
    ),
    Metric("explained_variance", "expl. var.", "{:.3f}", plotted=True),
    Metric("cosine", "cosine", "{:.3f}", plotted=True),
    Metric("delta_ce_typical", "ΔCE typical (nats)", "{:.4f}", se=True, in_table=False),
    Metric("delta_ce", "ΔCE (nats)", "{:.4f}", se=True),
    Metric("delta_ce_pct_typical", "ΔCE % typical", "{:.2f}", se=True, plotted=True, sweep="ΔCE % (typical)"),
    Metric("delta_ce_pct", "ΔCE %", "{:.2f}", se=True, plotted=True, compared=True, gap="ΔCE %", sweep="ΔCE % (all)"),
    Metric("ce_score", "CE score", "{:.3f}", se=True, plotted=True, compared=True),
    Metric(
        "kl_typical",
        "KL typical (nats)",
        "{:.4f}",
        se=True,
        in_table=False,
        sweep="KL nats (typical)",
        diff_fmt="{:.4f}",
    ),
    Metric(
        "kl",
        "KL (nats)",
        "{:.4f}",
        se=True,
        plotted=True,
        compared=True,
        gap="KL",
        sweep="KL nats (all)",
        diff_fmt="{:.4f}",
    ),
    Metric("dead_pct", "dead % (this layer)", "{:.1f}", plotted=True, compared=True),
    Metric("outliers", "outliers", "{:.0f}"),
)
BY_KEY = {m.key: m for m in METRICS}

WITH_SE = tuple(m.key for m in METRICS if m.se)
"""The metrics reported with a standard error (column `<metric>_se`)."""
TABLE = tuple(m for m in METRICS if m.in_table)
PLOTTED = tuple(m for m in METRICS if m.plotted)
COMPARED = tuple(m for m in METRICS if m.compared)
GAP = tuple(m for m in METRICS if m.gap)
SWEEP = tuple(m for m in METRICS if m.sweep)


def heading(key: str) -> str:
    return BY_KEY[key].heading


def spec(key: str) -> str:
    return BY_KEY[key].fmt
