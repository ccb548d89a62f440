"""Latent dashboards: for chosen latents of an SAE at chosen layers, the contexts where each fires
hardest, a histogram of its activations, and the tokens it promotes and suppresses most through the
unembedding.

The logit effect is the latent's decoder row in the layer's raw units (what adding one unit of the
latent adds to that layer's residual) times W_U, as in Bricken et al. 2023. A group SAE's decoder
row differs between the layers it serves by the positive per-layer factor only, so the token order
is the same at every layer and the values scale; the values shown are those at the layer named.
The final norm before W_U is left out (it is not linear), so the values are a direction's read-out,
not a change in the model's logits.

A ViewCollector tallies what the dashboards show from the latents of each batch's rows. The report
feeds it from the evaluation's own pass (every (SAE, layer) is encoded there anyway); `collect`, for
the rating kit, makes one forward pass per batch of eval contexts, stopped after the deepest layer
needed, for every (SAE, layer, latent) asked for.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import torch

from ghsae.analysis.evals import TopExamples
from ghsae.hooks import capture_layers
from ghsae.lm import LoadedModel
from ghsae.sae import Latents, SparseAutoencoder

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


class ViewCollector:
    """The tallies a dashboard is built from (top contexts, non-zero activations, tokens seen) of some
    latents of some SAEs, fed the latents of each batch's rows at each layer.

    `collect` feeds it from a forward pass of its own; the report feeds it from the evaluation's pass
    (evaluate's `observe`), which encodes every (SAE, layer) on the same rows anyway: no second pass."""

    def __init__(self, saes: dict[str, SparseAutoencoder], per_latent: int, latents: dict[tuple[str, int], list[int]] | None = None):
        """saes: name -> SAE of the latents wanted; latents: (name, layer) -> latent ids, or None to
        take, at each (name, layer) fed, the latents the feeder passes with its first batch."""
        self.saes, self.per_latent = saes, per_latent
        self.examples: dict[tuple[str, int], TopExamples] = {}
        self.values: dict[tuple[str, int], list[list[np.ndarray]]] = {}
        self.seen: dict[tuple[str, int], int] = {}
        for key, ids in (latents or {}).items():
            self._column(key, torch.tensor(ids, dtype=torch.long))

    def _column(self, key: tuple[str, int], latents: torch.Tensor) -> None:
        self.examples[key] = TopExamples(latents.cpu(), self.per_latent)
        self.values[key] = [[] for _ in range(latents.numel())]
        self.seen[key] = 0

    @property
    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.examples})

    def add(self, name: str, layer: int, z: Latents, coords: torch.Tensor, latents: torch.Tensor | None = None) -> None:
        """z: the SAE's latents of N rows of `layer` at coords [N, 2] (context, position)."""
        key = (name, layer)
        if key not in self.examples:
            if name not in self.saes or latents is None:
                return
            self._column(key, latents)
        ex = self.examples[key]
        ex.add(z, coords, layer)
        self.seen[key] += z.n_rows
        sel = z.columns(ex.latents).float().cpu().numpy()
        for j in range(sel.shape[1]):
            self.values[key][j].append(sel[sel[:, j] > 0, j])

    def views(self, lm: LoadedModel, shown: dict[str, list[int]] | None = None) -> dict[tuple[str, int], list[LatentView]]:
        """The LatentViews of every (SAE, layer) fed, of its latents in shown[name] (None: all of them)."""
        W_U = lm.model.get_output_embeddings().weight.detach()
        out: dict[tuple[str, int], list[LatentView]] = {}
        for (name, layer), ex in self.examples.items():
            ids = ex.latents.tolist()
            wanted = [j for j, lat in enumerate(ids) if shown is None or lat in shown.get(name, ())]
            if not wanted:
                continue
            tokens = logit_tokens(self.saes[name], layer, [ids[j] for j in wanted], W_U, lm.tokenizer)
            out[(name, layer)] = [self._view(name, layer, j, tok) for j, tok in zip(wanted, tokens)]
        return out

    def _view(self, name: str, layer: int, j: int, tokens) -> LatentView:
        ex, parts = self.examples[(name, layer)], self.values[(name, layer)][j]
        vals = np.concatenate(parts) if parts else np.zeros(0)
        top = max(float(vals.max()) if vals.size else 0.0, 1e-9)
        counts = np.histogram(vals, bins=HIST_BINS, range=(0.0, top))[0].tolist()
        contexts = [(float(v), int(w[0]), int(w[1])) for v, w in zip(ex.values[j].tolist(), ex.where[j]) if v > 0]
        return LatentView(int(ex.latents[j]), layer, contexts, (counts, top), int(vals.size), self.seen[(name, layer)], *tokens)


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
    for sae, _ in wanted.values():
        sae.to(device).eval()
    col = ViewCollector(
        {name: sae for name, (sae, _) in wanted.items()},
        per_latent,
        {(name, layer): list(lats) for name, (_, by_layer) in wanted.items() for layer, lats in by_layer.items()},
    )
    layers = col.layers
    if not layers:  # no latent fired on the eval tokens (every one dead): nothing to show, no pass to make
        return {}
    for start in range(0, contexts.shape[0], batch_contexts):
        ids = torch.from_numpy(np.array(contexts[start : start + batch_contexts])).long().to(device)
        keep = ~torch.isin(ids, special)
        coords = keep.nonzero().cpu() + torch.tensor([start, 0])
        resid: dict[int, torch.Tensor] = {}

        def keep_rows(layer: int, r: torch.Tensor, keep=keep, resid=resid) -> None:
            resid[layer] = r[keep].float()

        capture_layers(lm.model, lm.blocks, ids, layers, keep_rows, hookpoint)
        with torch.inference_mode():
            for name, layer in col.examples:
                col.add(name, layer, wanted[name][0].encode_latents(resid[layer], layer), coords)
    return col.views(lm)


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


def report_views(lm: LoadedModel, collector: ViewCollector, examples: dict[str, TopExamples], names: list[str], shown: int) -> dict:
    """Histogram and logit tokens of the latents the report shows (of each SAE in `names`, the first
    `shown` of its sampled latents that fired), at each layer their SAE serves, from the tallies the
    evaluation's pass fed `collector`."""
    wanted = {}
    for name in names:
        ex = examples[name]
        fired = [int(lat) for i, lat in enumerate(ex.latents.tolist()) if float(ex.values[i].max()) > 0]
        if fired[:shown]:
            wanted[name] = fired[:shown]
    out: dict[tuple[str, int], list[LatentView]] = {}
    for (name, _layer), vs in collector.views(lm, wanted).items():
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
