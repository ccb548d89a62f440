"""The sweep's page: the paper's figure for this model, quality against G and against compute
(A + G·T), per layer and averaged, the per-layer SAEs as the reference, the AMAD-chosen G marked,
the speed-up and storage at each G; and, when the sweep trained transfer variants, FVU against
training tokens with and without transfer."""

from __future__ import annotations

import html

import numpy as np

from ghsae.analysis import metric_table, plots, seeds
from ghsae.analysis.html import CSS, fmt, img, table
from ghsae.analysis.stamp import stamp
from ghsae.analysis.sweep import PAPER, Grouping, SweepData
from ghsae.layers import spans
from ghsae.layout import PER_LAYER_DIR as PER_LAYER
from ghsae.layout import TRANSFER_SUFFIX

BUDGET_FIGURE = "gap_budget"  # the relative gap against budget, beside the metrics' figures


def present_metrics(data: SweepData) -> list[tuple[str, str, str]]:
    """(key, sweep heading, format) of the sweep page's metrics (metric_table.SWEEP) the evaluation
    has: no CE / KL when the sweep spliced no context (report.ce_tokens = 0)."""
    have = {k for r in data.result.rows for k in r}
    return [(m.key, m.sweep, m.fmt) for m in metric_table.SWEEP if m.key in have]


def _span_layers(data: SweepData) -> list[int]:
    """Every harvested layer but the last, as the paper averages over layers 0..L-2."""
    return data.layers[:-1] or data.layers


def summary_rows(data: SweepData) -> list[dict]:
    """One row per grouping: means over layers 0..L-2 and over seeds, with standard errors over eval
    contexts and across seeds (seeds.Estimate), the difference from the per-layer SAEs (paired by
    context and by seed), cost and storage."""
    layers = _span_layers(data)
    rows = []
    for g in data.groupings:
        base = data.arm_at(PER_LAYER, g.budget)  # speed-up and storage against the per-layer SAEs at its budget
        per_layer_total = data.total_seconds(base) if base else None
        keys = data.keys_by_seed(g, layers)
        row: dict = {"grouping": g, "total": data.total_seconds(g)}
        ref = reference(data, g)
        for k, _, _ in present_metrics(data):
            row[k] = seeds.arm(data.result, keys, k)
            if ref is not None and g is not ref:
                row[f"{k}_diff"] = seeds.gap(data.result, keys, data.keys_by_seed(ref, layers), k)
        row["speedup"] = per_layer_total / row["total"] if per_layer_total and row["total"] else None
        row["storage_ratio"] = base.store_bytes / g.store_bytes if base and g.store_bytes else None
        rows.append(row)
    return rows


def reference(data: SweepData, g: Grouping) -> Grouping | None:
    """What a grouping is measured against at its budget: the per-layer SAEs, trained with transfer
    when it was (equal total compute on both sides), else from scratch."""
    if g.transfer:
        return data.arm_at(PER_LAYER + TRANSFER_SUFFIX, g.budget) or data.arm_at(PER_LAYER, g.budget)
    return data.arm_at(PER_LAYER, g.budget)


def relative_gap(data: SweepData, g: Grouping, key: str) -> seeds.Estimate | None:
    """(grouping − its reference) / reference over layers 0..L-2, both errors scaled alike."""
    ref = reference(data, g)
    if ref is None or ref is g:
        return None
    layers = _span_layers(data)
    d = seeds.gap(data.result, data.keys_by_seed(g, layers), data.keys_by_seed(ref, layers), key)
    r = abs(seeds.arm(data.result, data.keys_by_seed(ref, layers), key).mean) or float("nan")
    return seeds.Estimate(d.mean / r, d.context_se / r, d.seed_se / r, d.n_seeds)


def budget_metrics(data: SweepData) -> list[tuple[str, str, str]]:
    """The budget figure's metrics: typical-token FVU, and ΔCE where the sweep spliced."""
    return [m for m in present_metrics(data) if m[0] in ("fvu_typical", "delta_ce_pct_typical")]


def budget_figure(data: SweepData) -> bytes:
    """The relative gap against tokens per SAE and per layer, one line per grouping."""
    panels = []
    for key, label, _ in budget_metrics(data):
        lines: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {}
        for g in data.groupings:
            e = relative_gap(data, g, key)
            if e is None:
                continue
            x, xl, y, err = lines.setdefault(g.base, ([], [], [], []))
            x.append(g.tokens)
            xl.append(g.tokens_per_layer)
            y.append(100 * e.mean)
            err.append(100 * float(np.hypot(np.nan_to_num(e.context_se), np.nan_to_num(e.seed_se))))
        panels.append((f"{label}: gap to per-layer (%)", lines))
    return plots.budget_gap(panels)


def budget_section(data: SweepData, figures: dict[str, bytes]) -> str:
    if not data.budgets:
        return "<p>One budget (<code>ghsae sweep --budgets 131072,524288,2097152</code> trains every grouping at each).</p>"
    metrics = budget_metrics(data)
    heads = ["grouping", "tokens / SAE", "tokens / layer", "seeds", "learning rate"]
    heads += [f"{label}: relative gap" for _, label, _ in metrics]
    body = []
    for g in data.groupings:
        cells = [html.escape(g.base), f"{g.tokens:,}", f"{g.tokens_per_layer:,.0f}", str(g.n_seeds), fmt(data.lr_of(g), "{:g}")]
        for key, _, _ in metrics:
            e = relative_gap(data, g, key)
            cells.append("reference" if e is None else seeds.show(seeds.Estimate(100 * e.mean, 100 * e.context_se, 100 * e.seed_se, e.n_seeds), "{:+.1f} %"))
        body.append(cells)
    note = (
        "<p>Every grouping trained at each budget of tokens per SAE from the one harvest; the relative gap is "
        "(grouping − per-layer) / per-layer over layers 0..L-2, paired by context and seed (error bars: both errors "
        "added in quadrature). Transfer variants are measured against per-layer SAEs trained with transfer too: at "
        "equal total compute. Tokens per layer = tokens per SAE × G / L.</p>"
    )
    figure = img(figures[BUDGET_FIGURE], "relative gap against tokens") if BUDGET_FIGURE in figures else ""
    return note + figure + table(heads, body, "wide budgets")


def lr_section(data: SweepData) -> str:
    c = data.lr_choice
    if c is None:
        return "<p>Every arm at fit.lr (<code>ghsae sweep --lr-grid 1e-3,3e-3,1e-2</code> picks each arm's own).</p>"
    heads = ["arm", *(f"{lr:g}" for lr in c.grid), "chosen"]
    body = [[html.escape(arm), *(f"{v:.4f}" for v in c.scores[arm]), f"{c.chosen[arm]:g}"] for arm in c.scores]
    note = (
        f"<p>Each arm trained (seed 0) at every rate of the grid at {c.budget:,} tokens per SAE, scored by mean "
        f"{c.metric} on validation contexts {c.validation_contexts[0]}..{c.validation_contexts[1] - 1} of the held-out "
        f"tokens, disjoint from the evaluation's ({c.eval_contexts[0]}..{c.eval_contexts[1] - 1}); each arm then trains "
        "at its own choice at every budget.</p>"
    )
    return note + table(heads, body)


def _seeds_text(data: SweepData) -> str:
    by_budget = {g.budget: g.n_seeds for g in data.groupings}
    if len(set(by_budget.values())) > 1:  # compare.seeds_at_smallest
        smallest = min(b for b in by_budget if b is not None)
        return (
            f"{by_budget[smallest]} seeds per grouping at {smallest:,} tokens per SAE and {data.n_seeds} at the other "
            "budgets"
        )
    n = data.n_seeds
    return f"{n} seeds per grouping" if n >= 2 else "one seed per grouping"


def _errors_note(data: SweepData) -> str:
    return seeds.errors_note(data.n_seeds, counts_differ=len({g.n_seeds for g in data.groupings}) > 1)


def _name(g: Grouping) -> str:
    return g.name + (" ★ (AMAD rule)" if g.auto else "")


def table_section(data: SweepData) -> str:
    rows = summary_rows(data)
    base = data.per_layer
    heads = ["grouping", "G", "groups", "AMAD"]
    metrics = present_metrics(data)
    for _, label, _ in metrics:
        heads += [label, f"{label} − per-layer"]
    heads += ["T per SAE (s)", "A + G·T (s)", "speed-up", "store", "B / token", "store ×"]
    body = []
    for r in rows:
        g = r["grouping"]
        cells = [html.escape(_name(g)), str(g.n_groups), spans(g.run.plan.groups), fmt(g.amad)]
        for k, _, spec in metrics:
            cells.append(seeds.show(r[k], spec))
            if f"{k}_diff" in r:
                cells.append(_gap(r, k))
            else:
                cells.append("reference" if g is base else "–")
        cells += [
            fmt(g.fit_seconds, "{:.1f}"),
            fmt(r["total"], "{:,.0f}"),
            fmt(r["speedup"], "{:.2f}×"),
            fmt(g.store_bytes / 2**20, "{:,.0f} MiB"),
            fmt(g.bytes_per_token, "{:,.0f}"),
            fmt(r["storage_ratio"], "{:.1f}×"),
        ]
        body.append(cells)
    return table(heads, body, "wide sweep")


def _gap(row: dict, key: str) -> str:
    """The difference from the per-layer SAEs, and relative to their figure."""
    d = row[f"{key}_diff"]
    ref = row[key].mean - d.mean
    rel = f" ({100 * d.mean / ref:+.0f} %)" if np.isfinite(d.mean) and ref else ""
    return seeds.show(d, metric_table.BY_KEY[key].diff_spec) + rel


def metric_figure(data: SweepData, key: str, label: str) -> bytes:
    """One metric against G and against compute, the per-layer SAEs as the reference line."""
    rows = [r for r in summary_rows(data) if not r["grouping"].transfer]
    base = next((r for r in rows if r["grouping"] is data.per_layer), None)
    grouped = sorted((r for r in rows if r is not base), key=lambda r: r["grouping"].n_groups)
    return plots.sweep_metric(
        label,
        [r["grouping"].n_groups for r in grouped],
        [_or_nan(r["total"]) for r in grouped],
        [r[key].mean for r in grouped],
        [r[key].context_se for r in grouped],
        auto=[r["grouping"].auto for r in grouped],
        reference=(base[key].mean, base[key].context_se, _or_nan(base["total"]), len(data.layers)) if base else None,
    )


def metric_figures(data: SweepData) -> dict[str, bytes]:
    """Every metric's figure (PNG bytes), rendered once for the page and the PNG files beside it: at
    the largest budget, and the relative gap against the budget when there are several."""
    view = data.at_budget(data.budgets[-1]) if data.budgets else data
    out = {key: metric_figure(view, key, label) for key, label, _ in present_metrics(view)}
    if data.budgets and budget_metrics(data):
        out[BUDGET_FIGURE] = budget_figure(data)
    return out


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def figures_section(data: SweepData, figures: dict[str, bytes]) -> str:
    metrics = present_metrics(data)
    parts = [img(figures[k], f"{label} against G and compute") for k, label, _ in metrics]
    for k, label, _ in metrics:
        lines = {}
        for g in data.groupings:
            if g.transfer:
                continue
            lines[g.base] = [data.layer_mean(g, x, k) for x in data.layers]  # over seeds
        parts.append(img(plots.sweep_per_layer(label, data.layers, lines), f"{label} per layer"))
    return "".join(parts)


def transfer_section(data: SweepData) -> str:
    pairs = [(g, data.scratch_of(g)) for g in data.groupings if g.transfer]
    if not pairs:
        return (
            "<p>No transfer variant in this sweep (<code>ghsae sweep --transfer G5,...</code> trains each named "
            "grouping's SAEs once more, each started from the previous group's).</p>"
        )
    parts = [
        "<p>Transfer (Ghilardi et al., BlackboxNLP 2024): the same store and settings, each group's SAE started from "
        "the previous group's trained SAE instead of at random (the first group's from scratch). Curves: training-batch "
        "FVU against tokens, thin per group, bold the mean over groups after the first. Tokens to match: the first "
        "logged point where the transfer run's FVU (a running mean over 5 logged points) is at or below the "
        "from-scratch run's final FVU (the mean of its last 5).</p>"
    ]
    if data.arm_at(PER_LAYER + TRANSFER_SUFFIX, pairs[0][0].budget) is not None:
        parts.append(
            "<p>The per-layer SAEs are trained with transfer too (each layer's from the previous layer's), and each "
            "transfer variant's gap is taken against them: the comparison is <b>at equal total compute</b>, not at "
            "equal tokens.</p>"
        )
    rows = []
    for tr, scratch in pairs:
        if scratch is None:
            continue
        parts.append(
            img(plots.transfer_curves(data.curves[scratch.name], data.curves[tr.name]), f"transfer {scratch.name}")
        )
        for t in tr.targets[1:]:
            group = t.name.split("/")[-1]
            s_tok, s_fvu = data.curves[scratch.name][f"{scratch.name}/{group}"]
            t_tok, t_fvu = data.curves[tr.name][t.name]
            target = float(np.mean(s_fvu[-5:]))
            w = min(5, len(t_fvu))  # a running mean over the last w logged points
            smooth = np.convolve(t_fvu, np.ones(w) / w, mode="valid")
            hit = np.flatnonzero(smooth <= target)
            at = int(t_tok[hit[0] + w - 1]) if hit.size else None
            a = seeds.arm(data.result, data.keys_by_seed(scratch, list(t.sae.cfg.layers)), "fvu")
            b = seeds.arm(data.result, data.keys_by_seed(tr, list(t.sae.cfg.layers)), "fvu")
            rows.append(
                [
                    html.escape(f"{scratch.name} {group}"),
                    f"{target:.3f}",
                    f"{at:,} of {int(s_tok[-1]):,}" if at is not None else f"not within {int(t_tok[-1]):,}",
                    seeds.show(a, "{:.3f}"),
                    seeds.show(b, "{:.3f}"),
                ]
            )
    parts.append(
        table(
            [
                "SAE",
                "final training FVU, from scratch",
                "tokens for transfer to match it",
                "eval FVU, scratch",
                "eval FVU, transfer",
            ],
            rows,
        )
    )
    return "".join(parts)


def render_sweep_page(full: SweepData, figures: dict[str, bytes]) -> str:
    data = full.at_budget(full.budgets[-1]) if full.budgets else full  # G and compute: at the largest budget
    base = data.per_layer
    tokens = {g.tokens_per_sae for g in data.groupings}
    first = data.groupings[0].run
    res = data.result
    intro = (
        f"<p>Model <b>{html.escape(first.plan.model.source)}</b>, {len(data.layers)} layers. Every grouping's SAEs "
        f"trained on <b>{', '.join(f'{t:,}' for t in sorted(tokens))}</b> tokens per SAE"
        + (" (equal across groupings, from the SAEs' records)" if len(tokens) == 1 else " (<b>not equal</b>)")
        + "; each layer of a group sees about 1/|g| of them. All evaluated together on the same "
        f"{res.eval_tokens:,} held-out tokens ({res.eval_contexts} contexts; spliced CE and KL on {res.ce_tokens:,} "
        f"predictions in {res.ce_contexts} contexts), so the differences from the per-layer SAEs are paired. Means over "
        f"layers {data.layers[0]}..{_span_layers(data)[-1]} (every harvested layer but the last, as the paper reports "
        f"over 0..L-2) and over {_seeds_text(data)}; the first ± is one standard error over eval contexts (paired for "
        f"differences), {_errors_note(data)}. "
        + (
            f"A = {fmt(data.harvest_seconds, '{:,.0f}')} s is the one measured model pass (every layer "
            "harvested once, every grouping's store derived from it);"
            if data.one_harvest
            else "A is each grouping's own measured harvest (the stores of every layer would not fit, so "
            "each grouping was harvested directly);"
        )
        + " T is the measured training seconds per SAE of each grouping; speed-up = (A + L·T<sub>per-layer</sub>) / "
        "(A + G·T); storage measured on disk.</p>"
    )
    paper = (
        f"<p>The paper's {PAPER['model']} figures, from far longer training (hundreds of millions of tokens): per-layer "
        f"FVU {PAPER['per-layer'][0]} and ΔCE {PAPER['per-layer'][1]} %, against {PAPER['grouped'][0]} and "
        f"{PAPER['grouped'][1]} % at its chosen G = {PAPER['G']}.</p>"
    )
    if base is None:
        intro += "<p class='warn'>No per-layer SAEs in this sweep: differences and speed-ups need them.</p>"
    written = stamp()
    sections = [
        ("table", "Quality, compute and storage at each G", intro + paper + table_section(data)),
        ("figures", "Against G and against compute; per layer", figures_section(data, figures)),
        ("transfer", "Transfer between neighbouring groups", transfer_section(data)),
        ("budgets", "The gap against training budget", budget_section(full, figures)),
        ("lr", "Learning rate per arm", lr_section(full)),
    ]
    body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{content}</section>' for sid, t, content in sections)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ghsae sweep</title>"
        f"<style>{CSS}</style></head><body><h1>ghsae sweep: quality against compute</h1>"
        f"<p class='small'>written {html.escape(written)}</p>{body}</body></html>"
    )


def render_sweep_summary(data: SweepData) -> str:
    """The table as Markdown (what README and docs/results.md quote)."""
    lines = [
        f"# ghsae sweep: {data.groupings[0].run.plan.model.source}",
        "",
        f"Measured {stamp()}.",
        "",
        f"Means over layers {data.layers[0]}..{_span_layers(data)[-1]} and over {_seeds_text(data)}, ± one standard "
        f"error over eval contexts; {_errors_note(data)}. "
        + (
            f"A = {fmt(data.harvest_seconds, '{:,.0f}')} s (one model pass)."
            if data.one_harvest
            else "A: each grouping's own harvest."
        ),
        "",
    ]
    metrics = present_metrics(data)
    heads = ["grouping", "G", "tokens/SAE"]
    for _, label, _ in metrics:
        heads += [label, f"Δ {label} vs per-layer"]
    heads += ["T/SAE (s)", "A + G·T (s)", "speed-up", "B/token"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in summary_rows(data):
        g = r["grouping"]
        cells = [_name(g), str(g.n_groups), f"{g.tokens:,}"]
        for k, _, spec in metrics:
            cells += [seeds.show(r[k], spec), _gap(r, k) if f"{k}_diff" in r else "–"]
        cells += [
            f"{g.fit_seconds:.1f}",
            fmt(r["total"], "{:,.0f}"),
            fmt(r["speedup"], "{:.2f}×"),
            fmt(g.bytes_per_token, "{:,.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paper, {PAPER['model']}: per-layer FVU {PAPER['per-layer'][0]} / ΔCE {PAPER['per-layer'][1]} %; "
        f"G = {PAPER['G']}: {PAPER['grouped'][0]} / {PAPER['grouped'][1]} %.",
        "",
    ]
    return "\n".join(lines)
