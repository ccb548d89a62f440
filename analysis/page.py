"""Render a ReportData as one self-contained HTML page (PNG figures inlined) and as Markdown.

One function per section, in SECTIONS order; each takes the ReportData and returns its HTML.
"""

from __future__ import annotations

import html

import numpy as np

from ghsae.analysis import metric_table, plots, seeds
from ghsae.analysis.circuit_report import render_section as circuit_section
from ghsae.analysis.dashboards import report_block
from ghsae.analysis.html import CSS, figures, fmt, img, pm, table
from ghsae.analysis.metric_table import TABLE, WITH_SE
from ghsae.analysis.rate import ratings_section
from ghsae.analysis.report import ReportData, SAEKind
from ghsae.analysis.seeds import Estimate
from ghsae.analysis.stamp import stamp
from ghsae.layers import span, spans

SECTIONS = [
    ("summary", "Summary"),
    ("evals", "Evals per layer"),
    ("baseline", "Against per-layer SAEs"),
    ("circuits", "Circuits: faithfulness and completeness"),
    ("ratings", "Blind interpretability ratings"),
    ("outliers", "Massive activations"),
    ("latents-density", "Latent density and dead latents"),
    ("clustering", "Layer clustering"),
    ("compute", "Compute and storage"),
    ("training", "Training curves"),
    ("latents", "Looking at latents"),
]








def _mean(by_layer: dict[int, dict], layers: list[int], key: str) -> float:
    vals = [by_layer[x][key] for x in layers if x in by_layer and key in by_layer[x]]
    return float(np.mean(vals)) if vals else float("nan")


def _spans_of(data: ReportData) -> list[tuple[str, list[int]]]:
    """The spans every headline is given over: all layers and 0..L-2 (as the paper reports), and,
    with per-layer spot checks, the spot layers (the only ones a comparison can use)."""
    layers = list(data.plan.layers)
    out = [("all layers", layers), (f"layers {layers[0]}..{layers[-2]}", layers[:-1] or layers)]
    if data.spot_checks:
        out.append((f"spot layers {', '.join(map(str, data.compared_layers))}", data.compared_layers))
    return out


def _compared_spans(data: ReportData) -> list[tuple[str, list[int]]]:
    """The spans over which both kinds have an SAE at every layer."""
    return [(label, ls) for label, ls in _spans_of(data) if set(ls) <= set(data.compared_layers)]


def headline(data: ReportData) -> list[dict]:
    """Mean of each metric over all layers and over layers 0..L-2 (as the paper reports), per kind,
    with the standard error over eval contexts of the metrics in WITH_SE (key `<metric>_se`)."""
    result = data.result
    out = []
    for kind in SAEKind:
        by = data.rows(kind)
        if not by:
            continue
        spans_here = _spans_of(data) if kind is SAEKind.GROUP else _compared_spans(data)
        for label, ls in spans_here:
            row = {"saes": kind.label, "over": label, **{m.key: _mean(by, ls, m.key) for m in TABLE}}
            keys = [(by[x]["sae"], x) for x in ls if x in by]
            for k in WITH_SE:
                row[f"{k}_se"] = result.mean_with_se(keys, k)[1]
            out.append(row)
    ours, theirs = data.rows(SAEKind.GROUP), data.rows(SAEKind.BASELINE)
    if ours and theirs:  # paired over the same eval contexts, so the error is that of the difference
        for label, ls in _compared_spans(data):
            both = [x for x in ls if x in ours and x in theirs]
            row = {"saes": "group − per-layer", "over": label}
            for k in WITH_SE:
                a = [(ours[x]["sae"], x) for x in both]
                b = [(theirs[x]["sae"], x) for x in both]
                row[k], row[f"{k}_se"] = result.difference_with_se(a, b, k)
            out.append(row)
    return out


def _cells(r: dict) -> list[str]:
    return [pm(r.get(m.key), r.get(f"{m.key}_se"), m.fmt) if m.key in r else "–" for m in TABLE]


def summary_section(data: ReportData) -> str:
    run, base, result, plan = data.side.run, data.base, data.result, data.plan
    heads = ["SAEs", "over"] + [m.heading for m in TABLE]
    parts = [
        table(heads, [[r["saes"], r["over"]] + _cells(r) for r in headline(data)], "wide"),
        f"<p>Run <code>{html.escape(str(run.root))}</code>: model <b>{html.escape(plan.model.source)}</b>, "
        f"{len(plan.layers)} layers in <b>{len(plan.groups)} groups</b> ({spans(plan.groups)}). "
        f"Evals on {result.eval_tokens:,} held-out tokens in {result.eval_contexts:,} contexts (harvest never stored "
        f"them); spliced CE and KL on the first {result.ce_tokens:,} predictions ({result.ce_contexts:,} contexts), "
        "so every ΔCE, CE score and KL below rests on that many predictions per layer. Clean CE "
        f"{result.clean_ce:.4f} nats/token. ± is one standard error over eval contexts (the independent units; "
        "a mean over layers shares its contexts, and its error accounts for that)."
        + (
            f" Baseline: <code>{html.escape(str(base.run.root))}</code> (per-layer SAEs)."
            if base
            else " No baseline given (<code>--baseline RUN</code> adds per-layer SAEs)."
        )
        + "</p>"
    ]
    if base:
        parts.insert(1, gap_paragraph(data))  # the answer the page exists for, right under the headline table
    missing = [g for g in plan.group_names if g not in data.side.names]
    if missing:
        parts.append(f'<p class="warn">Partial report: no SAE for {", ".join(missing)}.</p>')
    return "".join(parts)


GAP_VIEWS = ((metric_table.TYPICAL, "typical tokens"), ("", "all tokens"))


def gap_figures(data: ReportData) -> list[tuple[str, str, list[tuple[str, Estimate, Estimate, Estimate]]]]:
    """Per metric (key, label, format): per view (typical, all tokens), the group SAEs, the per-layer
    SAEs and their difference at the compared layers, each averaged over the seeds both arms have
    (paired by index) with its standard errors over eval contexts and across seeds."""
    layers = data.compared_layers

    def keys(kind: SAEKind) -> list[list[tuple[str, int]]]:
        return [[(by[x]["sae"], x) for x in layers if x in by] for by in data.rows_by_seed(kind)]

    a, b, result = keys(SAEKind.GROUP), keys(SAEKind.BASELINE), data.result
    n = min(len(a), len(b))  # the seeds the gap pairs (a --baseline run has one): both arms over those
    a, b = a[:n], b[:n]
    out = []
    for m in metric_table.GAP:
        views = []
        for suffix, view in GAP_VIEWS:
            key = m.key + suffix
            views.append((view, seeds.arm(result, a, key), seeds.arm(result, b, key), seeds.gap(result, a, b, key)))
        out.append((m.gap, m.fmt, views))
    return out


def _gap_view(view: str, g: Estimate, p: Estimate, d: Estimate, spec: str) -> str:
    rel = f", {100 * d.mean / p.mean:+.0f} % relative" if p.mean else ""
    return f"{seeds.show(g, spec)} against {seeds.show(p, spec)} (difference {seeds.show(d, spec)}{rel}) over {view}"


def gap_paragraph(data: ReportData) -> str:
    """The answer the page exists for: how much worse than per-layer SAEs, and how much cheaper."""
    layers, c = data.compared_layers, data.compute
    figures = gap_figures(data)
    parts = []
    for label, spec, views in figures:
        shown = [_gap_view(*v, spec) for v in views]
        parts.append(f"{label} <b>{shown[0]}</b>; {shown[1]}")
    n_seeds = figures[0][2][0][3].n_seeds if figures else 1
    same = []
    if data.fairness is not None and data.fairness.matched:
        same.append("the same tokens per SAE")
    if data.own_baseline:
        same.append("the same harvest")
    trained = f", where per-layer SAEs were trained with {' and '.join(same)}" if same else ""
    where = (
        f"At the {len(layers)} spot-check layers ({', '.join(map(str, layers))}){trained} (spot checks, not a full "
        "baseline: the other layers have none)"
        if data.spot_checks
        else f"Over all {len(layers)} layers, against a per-layer SAE at each{trained}"
    )
    storage = (
        f"; the store is {c.per_layer_bytes_on_disk / c.bytes_on_disk:.1f}× smaller than the all-layers one (measured)"
        if c.per_layer_bytes_on_disk and c.bytes_on_disk
        else ""
    )
    over_seeds = f", averaged over {n_seeds} seeds per arm" if n_seeds >= 2 else ""
    return (
        f'<p class="gap"><b>How much worse, how much cheaper.</b> {where}{over_seeds}, the group SAEs reach '
        + "; ".join(parts)
        + f". They cost A + G·T = {fmt(c.grouped_total_seconds, '{:,.1f}')} s against A + L·T = "
        f"{fmt(c.per_layer_total_seconds, '{:,.1f}')} s for per-layer SAEs at every layer ({c.per_layer_source}): "
        + (f"<b>{c.speedup:.2f}× cheaper</b>" if c.speedup is not None else "speed-up unknown (a harvest time is missing)")
        + f"{storage}. The first ± is one standard error over eval contexts, the difference paired; "
        + seeds.errors_note(n_seeds)
        + (". The tables below are seed 0's (this run's own SAEs)" if n_seeds >= 2 else "")
        + ".</p>"
    )


def gap_summary(data: ReportData) -> list[str]:
    """The gap paragraph's figures as Markdown lines (summary.md)."""
    figures = gap_figures(data)
    n_seeds = figures[0][2][0][3].n_seeds if figures else 1
    layers = ", ".join(map(str, data.compared_layers))
    lines = [f"Group SAEs against per-layer SAEs at layers {layers}:", ""]
    for label, spec, views in figures:
        lines += [f"- {label}: {_gap_view(*v, spec)}" for v in views]
    lines += ["", f"The first ± is over eval contexts (the difference paired); {seeds.errors_note(n_seeds)}.", ""]
    return lines


def evals_section(data: ReportData) -> str:
    layers, groups = list(data.plan.layers), [list(g) for g in data.plan.groups]
    ours, theirs = data.rows(SAEKind.GROUP), data.rows(SAEKind.BASELINE)
    parts = [
        "<p>Each layer's rows are reconstructed by the SAE of its group (normalised by that layer's factor, "
        "reconstructed in raw units). ΔCE: CE with the reconstruction spliced in at that layer alone, minus clean CE; "
        "CE score: 1 − ΔCE / (CE with the layer zeroed − clean CE); KL: from the clean next-token distribution. "
        "Special tokens (BOS/EOS) are neither evaluated nor replaced, as harvest never stores them.</p>"
    ]
    rows = [[str(layer), ours[layer]["sae"]] + _cells(ours[layer]) for layer in layers if layer in ours]
    parts.append(table(["layer", "SAE"] + [m.heading for m in TABLE], rows, "wide"))
    images, notes = [], []
    for key in (m.key for m in metric_table.PLOTTED):
        if not any(key in r for r in ours.values()):
            continue
        title = metric_table.heading(key)
        mine = [ours.get(x, {}).get(key, np.nan) for x in layers]
        base = [theirs.get(x, {}).get(key, np.nan) for x in layers] if theirs else None
        note = _unplotted(data, key, mine + (base or []))
        if note:
            notes.append(note)
            continue
        png = plots.per_layer_metric(layers, mine, groups, title, base)
        images.append(img(png, f"{title} per layer"))
    parts.append(figures(images))
    if notes:
        parts.append(f"<p class='small'>Not plotted: {'; '.join(notes)}.</p>")
    return "".join(parts)


def _topk_k(data: ReportData) -> int | None:
    """k when every SAE on the page is a TopK SAE with the same k (at most k active latents per token)."""
    cfgs = [t.sae.cfg for side in data.sides for t in side.targets]
    ks = {c.k for c in cfgs if c.architecture == "topk"}
    return ks.pop() if cfgs and len(ks) == 1 and all(c.architecture == "topk" for c in cfgs) else None


def _unplotted(data: ReportData, key: str, values: list[float]) -> str:
    """Why a per-layer metric gets a sentence instead of a plot ("" when it is plotted): a TopK SAE's
    L0 is k by construction, and a line flat to 0.1 % carries nothing a number does not."""
    finite = [v for v in values if np.isfinite(v)]
    lo, hi = (fmt(min(finite), metric_table.spec(key)), fmt(max(finite), metric_table.spec(key))) if finite else ("–", "–")
    shown = lo if lo == hi else f"{lo}–{hi}"
    k = _topk_k(data) if key == "l0" else None
    if k is not None:
        return f"L0 = k = {k} for every token (TopK keeps at most k latents; measured {shown})"
    if plots.is_flat(values):
        return f"{metric_table.heading(key)} is {shown} at every layer"
    return ""


def baseline_section(data: ReportData) -> str:
    layers, groups = list(data.plan.layers), [list(g) for g in data.plan.groups]
    parts = []
    if data.spot_checks:
        layers_text = ", ".join(map(str, data.compared_layers))
        if data.own_baseline and data.base is not None:
            derived = data.side.run.layout.derived_from.is_file()
            origin = (
                "this run's grouped store was derived from that harvest, byte for byte what a direct harvest stores"
                if derived
                else "this run was harvested directly before, so that harvest was a second model pass"
            )
            parts.append(
                f"<p><b>Spot checks.</b> Per-layer SAEs at layers {layers_text} (one per multi-layer group, taken in turn at "
                "its first, middle and last layer, unless <code>compare.spot_layers</code> says otherwise), from every layer harvested once into "
                f"<code>{html.escape(str(data.base.run.root))}</code>; {origin}. The other layers have no per-layer "
                "SAE: <code>compare.per_layer = \"all\"</code> (or <code>ghsae sweep</code>) trains every one.</p>"
            )
        else:
            parts.append(
                f"<p><b>Partial baseline.</b> The baseline has per-layer SAEs at layers {layers_text} only; the "
                "comparison is at those layers.</p>"
            )
    fair = data.fairness
    if fair is not None:
        a, b = fair.eval_contexts
        parts.append(
            f"<p>Checked from both runs' records: the same token stream and eval split (contexts {a}–{b - 1}), and no "
            "shard of either run harvested one of those contexts. Training tokens per SAE: group "
            f"{fair.run_tokens_per_sae:,.0f}, per-layer {fair.base_tokens_per_sae:,.0f} "
            f"(ratio per-layer / group {fair.tokens_ratio:.3f}).</p>"
        )
        if not fair.matched:
            parts.append(
                f'<p class="warn">Unequal training tokens per SAE (ratio {fair.tokens_ratio:.3f}), compared because '
                "<code>--allow-unmatched</code> was given: differences below mix grouping with training length.</p>"
            )
    ours, theirs = data.rows(SAEKind.GROUP), data.rows(SAEKind.BASELINE)
    if not theirs:
        parts.append(
            "<p>No per-layer SAEs to compare with. <code>ghsae run</code> trains spot checks by default "
            "(<code>compare.per_layer</code>); or harvest the same model with <code>--groups per-layer</code>, fit it "
            "with the same <code>fit.tokens</code>, and pass it as <code>ghsae report --baseline BASE_RUN</code>.</p>"
        )
        return "".join(parts)
    cmp_keys = [m.key for m in metric_table.COMPARED]
    mm = data.mmcs
    heads = ["layer"] + [f"{metric_table.heading(k)} {side}" for k in cmp_keys for side in ("group", "per-layer")] + ["MMCS"]
    rows = []
    for layer in layers:
        a, b = ours.get(layer, {}), theirs.get(layer, {})
        row = [str(layer)]
        for k in cmp_keys:
            row += [pm(a.get(k), a.get(f"{k}_se"), metric_table.spec(k)), pm(b.get(k), b.get(f"{k}_se"), metric_table.spec(k))]
        rows.append(row + [fmt(mm.get(layer))])
    parts.append(table(heads, rows, "wide"))
    if mm:
        png = plots.per_layer_metric(
            layers, [mm.get(x, np.nan) for x in layers], groups, "MMCS: group decoder vs per-layer decoder"
        )
        parts.append(img(png, "MMCS per layer"))
    parts.append(
        "<p>MMCS: for each latent of the group SAE, the best cosine similarity with a decoder row of that "
        "layer's per-layer SAE, averaged.</p>"
    )
    return "".join(parts)


def circuits_section(data: ReportData) -> str:
    return circuit_section(data.circuits)


def ratings_page_section(data: ReportData) -> str:
    return ratings_section(data.ratings)


def outliers_section(data: ReportData) -> str:
    """Which tokens the typical view leaves out, per layer, in the harvest and in the held-out rows."""
    stats = data.side.run.run_stats()
    factor = data.settings.outlier_factor
    first = {r["layer"]: r for r in data.result.rows}  # every SAE of a layer sees the same held-out rows
    parts = [
        f"<p>A token is an <b>outlier</b> at a layer when its residual norm exceeds {factor:g}× the layer's median "
        "norm (<code>report.outlier_factor</code>): the massive activations of Sun et al. (2024), attention sinks such "
        "as the first token after BOS, whose norms reach tens of times the median. A squared error summed over "
        "tokens is dominated by them, so every FVU, ΔCE and KL is shown twice: <b>typical</b> leaves outliers out of "
        "FVU and keeps them clean, as BOS is, when a reconstruction is spliced in; <b>all tokens</b> includes them. "
        "SAELens leaves out special tokens only; dictionary_learning can mask high-norm tokens out of its buffer.</p>"
    ]
    if stats is None or not any(ls.norms for ls in stats.layers.values()):
        parts.append(
            '<p class="warn">This run was harvested before norm distributions were recorded: no outliers are '
            "marked, and the typical figures equal the all-token ones. Re-harvest to measure them.</p>"
        )
        return "".join(parts)
    rows = []
    for layer, ls in sorted(stats.layers.items()):
        n = ls.norms
        if n is None:
            continue
        ev = first.get(layer, {})
        rows.append(
            [
                str(layer),
                fmt(n.median_norm, "{:.4g}"),
                fmt(n.q999_norm, "{:.4g}"),
                fmt(n.max_norm, "{:.4g}"),
                f"{n.max_norm / n.median_norm:.0f}×" if n.median_norm else "–",
                f"{int(n.outliers):,} of {ls.count:,}",
                f"{ev['outliers']:,} of {ev['rows']:,}" if "outliers" in ev else "–",
            ]
        )
    parts.append(
        table(
            [
                "layer",
                "median norm",
                "99.9 % quantile",
                "largest",
                "largest / median",
                f"outliers in the harvest (at {stats.outlier_factor:g}×)",
                f"outliers in the held-out rows (at {factor:g}×)",
            ],
            rows,
        )
    )
    return "".join(parts)


def density_section(data: ReportData) -> str:
    dens = data.result.densities
    images = []
    for side in data.sides:
        side_d = {t.name: dens[t.name] for t in side.targets}
        images.append(img(plots.density_histogram(side_d, side.kind.label), f"latent density, {side.kind.label}"))
    parts = [figures(images)]
    drows = [
        [
            html.escape(t.name),
            str(t.sae.cfg.n_latents),
            fmt(100.0 * float((dens[t.name] == 0).mean()), "{:.1f}"),
            fmt(100.0 * float((dens[t.name] > 0.1).mean()), "{:.1f}"),
        ]
        for side in data.sides
        for t in side.targets
    ]
    parts.append(table(["SAE", "latents", "dead % (never active on eval)", "dense % (> 10% of tokens)"], drows))
    return "".join(parts)


def clustering_section(data: ReportData) -> str:
    cl = data.clustering
    groups = cl.chosen_groups
    parts = [
        f"<p>Angular distance arccos(cos)/π between layers' residual streams on {cl.probe_tokens:,} probe tokens: "
        "<b>layer-centred</b> (the reference's distance) subtracts each layer's mean over the probe tokens first "
        "(the reference subtracts a running mean, the same quantity estimated with a lag), <b>raw</b> takes the "
        "residuals as they are. This run's groups come from "
        f"<b>{html.escape(cl.distance)}</b> distances by <b>{html.escape(cl.method)}</b>, "
        f"with G the smallest whose AMAD is below {cl.threshold:g}: {html.escape(cl.summary)} (AMAD "
        f"{cl.chosen_amad:.3f}). White squares: the groups.</p>"
    ]
    images = [
        img(plots.distance_heatmap(matrix, cl.layers, groups, f"{d} angular distance"), f"{d} heatmap")
        for d, matrix in cl.matrices.items()
    ]
    parts.append(figures([*images, img(plots.amad_curve(cl.curves, cl.threshold, cl.g), "AMAD curves")]))
    parts.append(f"<p>Each method's partition at this run's G = {cl.g} ({html.escape(cl.distance)} distances):</p>")
    parts.append(
        table(
            ["method", "groups", "AMAD"],
            [[html.escape(r.method), spans(r.partition), fmt(r.amad)] for r in cl.at_g],
        )
    )
    parts.append("<p>The G that <code>groups = auto</code> picks for each distance and method:</p>")
    parts.append(
        table(
            ["distance", "method", "G", "AMAD", "groups"],
            [[r.distance, html.escape(r.method), str(r.groups), fmt(r.amad), spans(r.partition)] for r in cl.auto],
        )
    )
    return "".join(parts)


def compute_section(data: ReportData) -> str:
    c = data.compute
    mib = 2**20
    note = ""
    if c.derivation_seconds is not None:
        note = (
            "<p>This run's store was derived from a harvest of every layer, so no model ran for it: A is that "
            "harvest's measured model pass, which a direct harvest of this grouping runs too (it writes "
            f"1/|g| as much). Gathering its rows from the all-layers store took {c.derivation_seconds:,.1f} s.</p>"
        )
    return note + table(
        ["", "grouped (this run)", f"per-layer ({c.per_layer_source})"],
        [
            ["SAEs", str(c.groups), str(c.layers)],
            ["harvest A (s, measured)", fmt(c.harvest_seconds, "{:.1f}"), fmt(c.per_layer_harvest_seconds, "{:.1f}")],
            ["fit T per SAE (s)", fmt(c.fit_seconds_per_sae, "{:.1f}"), fmt(c.per_layer_fit_seconds_per_sae, "{:.1f}")],
            ["training tokens per SAE", f"{c.fit_tokens_per_sae:,}", ""],
            ["A + G·T vs A + L·T (s)", fmt(c.grouped_total_seconds, "{:.1f}"), fmt(c.per_layer_total_seconds, "{:.1f}")],
            ["speed-up", "", fmt(c.speedup, "{:.2f}×")],
            [
                "activation store on disk",
                fmt(c.bytes_on_disk / mib, "{:,.1f} MiB"),
                fmt(c.per_layer_bytes_on_disk / mib if c.per_layer_bytes_on_disk else None, "{:,.1f} MiB"),
            ],
            [
                "bytes per token",
                fmt(c.bytes_per_token, "{:,.0f}"),
                fmt(c.per_layer_bytes_per_token, "{:,.0f}") + " (every layer)",
            ],
        ],
    )


def training_section(data: ReportData) -> str:
    return img(plots.training_curves(data.curves), "training curves") if data.curves else ""


def latents_section(data: ReportData) -> str:
    rc = data.settings
    parts = [
        f"<p>For a random sample of each SAE's latents that fired on the eval tokens: the {rc.examples_per_latent} "
        "held-out contexts where each fires hardest, the firing token <mark>marked</mark>, and the layer the row "
        "came from.</p>"
    ]
    for side in data.sides:
        parts += [_latent_block(t.name, data) for t in side.targets]
    return "".join(parts)


SECTION_RENDERERS = {
    "summary": summary_section,
    "evals": evals_section,
    "baseline": baseline_section,
    "circuits": circuits_section,
    "ratings": ratings_page_section,
    "outliers": outliers_section,
    "latents-density": density_section,
    "clustering": clustering_section,
    "compute": compute_section,
    "training": training_section,
    "latents": latents_section,
}


def render_page(data: ReportData) -> str:
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{SECTION_RENDERERS[sid](data)}</section>'
        for sid, title in SECTIONS
    )
    toc = "".join(f'<li><a href="#{sid}">{html.escape(title)}</a></li>' for sid, title in SECTIONS)
    written = html.escape(stamp())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ghsae report</title>"
        f"<style>{CSS}</style></head><body><h1>ghsae report</h1><p class='small'>written {written}</p>"
        f"<nav><ol>{toc}</ol></nav>{body}</body></html>"
    )


def _latent_block(name: str, data: ReportData) -> str:
    ex, rc = data.result.examples[name], data.settings
    contexts, text = data.contexts, data.token_text
    shown = 0
    blocks = [f"<h3>{html.escape(name)}</h3>"]
    for i, latent in enumerate(ex.latents.tolist()):
        if shown >= rc.latents_shown:
            break
        vals = ex.values[i]
        live = [j for j in range(vals.numel()) if float(vals[j]) > 0]
        if not live:
            continue
        shown += 1
        lines = []
        for j in live:
            ctx, pos, layer = ex.where[i, j].tolist()
            lo, hi = max(0, pos - rc.window), min(contexts.shape[1], pos + rc.window // 4 + 1)
            toks = []
            for p in range(lo, hi):
                s = html.escape(text.get(int(contexts[ctx, p]), "?")).replace("\n", "↵")
                toks.append(f"<mark>{s}</mark>" if p == pos else s)
            lines.append(
                f"<li><span class='act'>{float(vals[j]):.2f}</span> <span class='small'>layer {layer}</span> "
                f"<span class='ctx'>{''.join(toks)}</span></li>"
            )
        blocks.append(f"<p>latent {latent}</p><ul class='examples'>{''.join(lines)}</ul>")
        blocks.append(report_block(data.dashboards.get((name, latent), [])))
    if shown == 0:
        blocks.append("<p>none of the sampled latents fired on the eval tokens.</p>")
    return "".join(blocks)


def render_summary(data: ReportData) -> str:
    plan, result, c = data.plan, data.result, data.compute
    lines = [
        f"# ghsae report: {plan.model.source}",
        "",
        f"Measured {stamp()}.",
        "",
        f"{len(plan.layers)} layers, {len(plan.groups)} groups: "
        + ", ".join(span(g) for g in plan.groups)
        + f". Eval: {result.eval_tokens:,} held-out tokens ({result.eval_contexts:,} contexts); spliced CE on "
        f"{result.ce_tokens:,} predictions ({result.ce_contexts:,} contexts); clean CE {result.clean_ce:.4f}. "
        "± is one standard error over eval contexts.",
        "",
        *(gap_summary(data) if data.base else []),
        "| SAEs | over | " + " | ".join(m.heading for m in TABLE) + " |",
        "|---|---|" + "---|" * len(TABLE),
    ]
    for r in headline(data):
        lines.append(f"| {r['saes']} | {r['over']} | " + " | ".join(_cells(r)) + " |")
    lines += [
        "",
        "| layer | SAE | FVU | ΔCE % | KL | L0 |",
        "|---|---|---|---|---|---|",
    ]
    for layer, r in sorted(data.rows(SAEKind.GROUP).items()):
        lines.append(
            f"| {layer} | {r['sae']} | {pm(r['fvu'], r.get('fvu_se'), '{:.3f}')} | "
            f"{pm(r.get('delta_ce_pct'), r.get('delta_ce_pct_se'), '{:.2f}')} | "
            f"{pm(r.get('kl'), r.get('kl_se'), '{:.4f}')} | {r['l0']:.1f} |"
        )
    lines += [
        "",
        f"Compute: A = {fmt(c.harvest_seconds, '{:.1f}')} s, T = {c.fit_seconds_per_sae:.1f} s per SAE; "
        f"A + G·T = {fmt(c.grouped_total_seconds, '{:.1f}')} s against A + L·T = "
        f"{fmt(c.per_layer_total_seconds, '{:.1f}')} s ({c.per_layer_source}): {fmt(c.speedup, '{:.2f}x')}. Storage {c.bytes_per_token or 0:,.0f} B/token against "
        f"{c.per_layer_bytes_per_token:,} for every layer.",
        "",
    ]
    return "\n".join(lines)
