"""Latent dashboards: for chosen latents of an SAE at chosen layers, the contexts where each fires
hardest, a histogram of its activations, and the tokens it promotes and suppresses most through the
unembedding.

The logit effect is the latent's decoder row in the layer's raw units (what adding one unit of the
latent adds to that layer's residual) times W_U, as in Bricken et al. 2023. A group SAE's decoder
row differs between the layers it serves by the positive per-layer factor only, so the token order
is the same at every layer and the values scale; the values shown are those at the layer named.
The final norm before W_U is left out (it is not linear), so the values are a direction's read-out,
not a change in the model's logits.

One forward pass per batch of eval contexts, stopped after the deepest layer needed, serves every
(SAE, layer, latent) asked for; both the report and the rating kit use it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import torch

from ghsae.analysis.evals import TopExamples
from ghsae.hooks import capture_layers
from ghsae.lm import LoadedModel
from ghsae.sae import SparseAutoencoder

HIST_BINS = 24


@dataclass
class LatentView:
    """Everything a dashboard shows of one latent at one layer."""

    latent: int
    layer: int
    contexts: list[tuple[float, int, int]]  # (activation, context row, position), strongest first
    histogram: tuple[list[int], float]  # counts over HIST_BINS equal bins on [0, max], and max
    fired: int  # eval tokens where it fired at this layer
    tokens_seen: int
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@dataclass
class _Collector:
    examples: TopExamples
    values: list[list[np.ndarray]] = field(default_factory=list)


def logit_tokens(
    sae: SparseAutoencoder, layer: int, latents: list[int], W_U: torch.Tensor, tokenizer, k: int = 8
) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per latent: (the k tokens with the largest, and the k with the smallest, decoder-row-times-W_U)."""
    w = sae.W_dec.detach()[latents].float()
    # the decoder row in raw units: reconstruct's linear part at this layer (the bias cancels)
    rows = sae.denormalise(w, layer) - sae.denormalise(torch.zeros_like(w[:1]), layer)
    logits = rows.to(W_U.device) @ W_U.float().T  # [S, V]
    top, bottom = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
    out = []
    for i in range(len(latents)):
        out.append(
            (
                [(_tok(tokenizer, int(t)), float(v)) for v, t in zip(top.values[i], top.indices[i])],
                [(_tok(tokenizer, int(t)), -float(v)) for v, t in zip(bottom.values[i], bottom.indices[i])],
            )
        )
    return out


def _tok(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def collect(
    lm: LoadedModel,
    contexts: np.ndarray,
    special_ids: list[int],
    wanted: dict[str, tuple[SparseAutoencoder, dict[int, list[int]]]],
    per_latent: int = 5,
    batch_contexts: int = 4,
    hookpoint: str = "resid_post",
) -> dict[tuple[str, int], list[LatentView]]:
    """For wanted[name] = (sae, {layer: latents}): the views of those latents, by (name, layer), read
    at `hookpoint` (the run's plan.hookpoint: the activation the SAEs were trained on)."""
    device = lm.device
    special = torch.tensor(sorted(special_ids) or [-1], dtype=torch.long, device=device)
    cols: dict[tuple[str, int], _Collector] = {}
    for name, (sae, by_layer) in wanted.items():
        sae.to(device).eval()
        for layer, latents in by_layer.items():
            col = _Collector(TopExamples(torch.tensor(latents, dtype=torch.long), per_latent))
            col.values = [[] for _ in latents]
            cols[(name, layer)] = col
    layers = sorted({layer for _, layer in cols})
    if not layers:  # no latent fired on the eval tokens (every one dead): nothing to show, no pass to make
        return {}
    seen = 0
    for start in range(0, contexts.shape[0], batch_contexts):
        ids = torch.from_numpy(np.array(contexts[start : start + batch_contexts])).long().to(device)
        keep = ~torch.isin(ids, special)
        coords = keep.nonzero().cpu() + torch.tensor([start, 0])
        seen += int(keep.sum())
        resid: dict[int, torch.Tensor] = {}

        def keep_rows(layer: int, r: torch.Tensor, keep=keep, resid=resid) -> None:
            resid[layer] = r[keep].float()

        capture_layers(lm.model, lm.blocks, ids, layers, keep_rows, hookpoint)
        with torch.inference_mode():
            for (name, layer), col in cols.items():
                z = wanted[name][0].encode(resid[layer], layer)
                col.examples.add(z, coords, layer)
                sel = z[:, col.examples.latents.to(device)].cpu().numpy()
                for j in range(sel.shape[1]):
                    col.values[j].append(sel[sel[:, j] > 0, j])
    W_U = lm.model.get_output_embeddings().weight.detach()
    views: dict[tuple[str, int], list[LatentView]] = {}
    for (name, layer), col in cols.items():
        latents = col.examples.latents.tolist()
        tokens = logit_tokens(wanted[name][0], layer, latents, W_U, lm.tokenizer)
        out = []
        for j, latent in enumerate(latents):
            vals = np.concatenate(col.values[j]) if col.values[j] else np.zeros(0)
            top = max(float(vals.max()) if vals.size else 0.0, 1e-9)
            counts = np.histogram(vals, bins=HIST_BINS, range=(0.0, top))[0].tolist()
            ex = [
                (float(v), int(w[0]), int(w[1]))
                for v, w in zip(col.examples.values[j].tolist(), col.examples.where[j])
                if v > 0
            ]
            out.append(LatentView(latent, layer, ex, (counts, top), int(vals.size), seen, *tokens[j]))
        views[(name, layer)] = out
    return views


def histogram_svg(view: LatentView, width: int = 220, height: int = 60) -> str:
    """An inline SVG bar chart of the latent's non-zero activations (no image file, no script)."""
    counts, top = view.histogram
    peak = max(max(counts), 1)
    bw = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 12 - (height - 14) * c / peak:.1f}" width="{bw - 1:.1f}" '
        f'height="{(height - 14) * c / peak:.1f}" fill="#1f77b4"/>'
        for i, c in enumerate(counts)
    )
    rate = 100.0 * view.fired / max(view.tokens_seen, 1)
    return (
        f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="activation histogram">{bars}'
        f'<text x="0" y="{height - 1}" font-size="9">0</text>'
        f'<text x="{width}" y="{height - 1}" font-size="9" text-anchor="end">{top:.2f}</text></svg>'
        f"<div class='small'>fires on {view.fired:,} of {view.tokens_seen:,} eval tokens ({rate:.2f}%)</div>"
    )


def tokens_html(view: LatentView, show_layer: bool = True) -> str:
    def fmt(items):
        return " ".join(
            f"<code>{html.escape(t).replace(' ', '␣').replace(chr(10), '↵')}</code>&nbsp;{v:+.2f}" for t, v in items
        )

    return (
        f"<div class='small'>promotes ({f'layer {view.layer}, ' if show_layer else ''}decoder row × W_U): "
        f"{fmt(view.promoted)}</div>"
        f"<div class='small'>suppresses: {fmt(view.suppressed)}</div>"
    )


def contexts_html(view: LatentView, contexts: np.ndarray, text: dict[int, str], window: int) -> str:
    lines = []
    for act, ctx, pos in view.contexts:
        lo, hi = max(0, pos - window), min(contexts.shape[1], pos + window // 4 + 1)
        toks = []
        for p in range(lo, hi):
            s = html.escape(text.get(int(contexts[ctx, p]), "?")).replace("\n", "↵")
            toks.append(f"<mark>{s}</mark>" if p == pos else s)
        lines.append(f"<li><span class='act'>{act:.2f}</span> <span class='ctx'>{''.join(toks)}</span></li>")
    return f"<ul class='examples'>{''.join(lines)}</ul>" if lines else "<p class='small'>never fired here</p>"


def report_views(
    lm: LoadedModel, contexts: np.ndarray, special_ids, targets, examples, rc, hookpoint: str = "resid_post"
) -> dict:
    """Histogram and logit tokens of the latents the report shows, at each layer their SAE serves."""
    wanted = {}
    for t in targets:
        ex = examples[t.name]
        shown = [int(lat) for i, lat in enumerate(ex.latents.tolist()) if float(ex.values[i].max()) > 0]
        shown = shown[: rc.latents_shown]
        if shown:
            wanted[t.name] = (t.sae, {layer: shown for layer in t.sae.cfg.layers})
    views = collect(lm, contexts, list(special_ids), wanted, 1, rc.batch_contexts, hookpoint)
    out: dict[tuple[str, int], list[LatentView]] = {}
    for (name, _layer), vs in views.items():
        for v in vs:
            out.setdefault((name, v.latent), []).append(v)
    return out


def report_block(views: list[LatentView]) -> str:
    """Under a latent's contexts in the report: its histogram per layer (pooled) and its logit tokens."""
    if not views:
        return ""
    first, last = views[0], views[-1]
    best = max(views, key=lambda v: v.fired)  # bins differ between layers: show the layer it fires most at
    parts = [histogram_svg(best) + f"<div class='small'>activations at layer {best.layer}</div>"]
    parts.append(tokens_html(first))
    if last is not first:
        scale = last.promoted[0][1] / first.promoted[0][1] if first.promoted and first.promoted[0][1] else float("nan")
        parts.append(
            f"<div class='small'>same tokens at layers {first.layer}–{last.layer}; values × {scale:.2f} at layer "
            f"{last.layer} (the per-layer normalisation)</div>"
        )
    return f"<div class='dash'>{''.join(parts)}</div>"
