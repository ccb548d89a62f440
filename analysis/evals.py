"""Evaluate SAEs on the run's held-out contexts: reconstruction, spliced-in CE and KL, dead latents,
and the contexts where a sample of latents fires hardest.

One clean forward pass per batch of contexts keeps every block's output; each (SAE, layer) is then
measured on the non-special positions of that layer (the rows harvest would have stored), and for
the first `ce_contexts` contexts its reconstruction is spliced into the forward pass at that layer
alone (see splice.py: only the blocks after the layer are run). Zero-ablating the same positions
gives the CE-loss score's floor.

Every figure also gets a standard error over eval contexts (the independent units: predictions
inside one context are correlated), from per-context sums by the delta method (metrics.py).
Each row records how many contexts and predictions its figures rest on, and EvalResult keeps the
per-context influences so that means over layers, and differences between SAEs evaluated on the
same contexts, get standard errors that account for the shared contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ghsae.analysis.metrics import (
    ReconstructionSums,
    ce_loss_score,
    ratio_influence,
    standard_error,
)
from ghsae.analysis.splice import Splicer
from ghsae.layers import span
from ghsae.lm import LoadedModel
from ghsae.sae import Latents, SparseAutoencoder


def outlier_thresholds(run, factor: float) -> dict[int, float]:
    """Per layer of `run` (a ghsae.run.Run), the norm above which a token is an outlier: factor x the
    layer's median norm over the harvested rows; empty for a run harvested before norms were counted."""
    norms = run.norm_distribution()
    if norms is None:
        return {}
    return {layer: float(t) for layer, t in zip(norms.layers, norms.threshold(factor))}


@dataclass
class EvalTarget:
    """One SAE to evaluate on each layer it serves. kind: "group" (this run) or "baseline"."""

    name: str
    kind: str
    sae: SparseAutoencoder
    spliced: bool = True  # also splice its reconstruction in for CE and KL (a pass of the later blocks per layer)
    ce_layers: frozenset[int] | None = None  # the layers it is spliced at (None: every layer it serves)

    def splices(self, layer: int) -> bool:
        return self.spliced and (self.ce_layers is None or layer in self.ce_layers)


@dataclass
class TopExamples:
    """The strongest activations seen so far of a sample of one SAE's latents."""

    latents: torch.Tensor  # [S] latent ids
    per_latent: int
    values: torch.Tensor = field(init=False)  # [S, E]
    where: torch.Tensor = field(init=False)  # [S, E, 3]: context, position, layer

    def __post_init__(self) -> None:
        s = self.latents.numel()
        self.values = torch.full((s, self.per_latent), -float("inf"))
        self.where = torch.zeros((s, self.per_latent, 3), dtype=torch.long)

    def add(self, z: Latents, coords: torch.Tensor, layer: int) -> None:
        """z: the latents of N rows at coords [N, 2] (context, position) drawn from `layer`.

        A token is evaluated at every layer its SAE serves; it is kept once, at its strongest layer.
        """
        vals = z.columns(self.latents).T.float().cpu()  # [S, N]
        e = min(self.per_latent, vals.shape[1])
        top, idx = vals.topk(e, dim=1)
        where = torch.cat([coords[idx], torch.full((*idx.shape, 1), layer, dtype=torch.long)], dim=-1)
        all_vals = torch.cat([self.values, top], dim=1)
        all_where = torch.cat([self.where, where], dim=1)
        order = all_vals.argsort(dim=1, descending=True)
        for s in range(all_vals.shape[0]):
            seen: set[tuple[int, int]] = set()
            kept = []
            for j in order[s].tolist():
                key = (int(all_where[s, j, 0]), int(all_where[s, j, 1]))
                if all_vals[s, j] == -float("inf") or key not in seen:
                    seen.add(key)
                    kept.append(j)
                if len(kept) == self.per_latent:
                    break
            self.values[s] = all_vals[s, kept]
            self.where[s] = all_where[s, kept]


def _add_at(out: np.ndarray, ctx: np.ndarray, values: torch.Tensor) -> None:
    """out[ctx[i]] += values[i] for every row i, in place: np.add.at's sums (its loop is slow on [N, d])."""
    torch.from_numpy(out).index_add_(0, torch.from_numpy(ctx).long(), values)


@dataclass
class _PerContext:
    """Sums per eval context for one layer (x statistics) or one (SAE, layer) (errors, CE, KL)."""

    n_contexts: int
    d_model: int = 0

    def __post_init__(self) -> None:
        c = self.n_contexts
        self.rows = np.zeros(c)
        self.x_sq = np.zeros(c)  # sum ||x||^2
        self.x_sum = np.zeros((c, self.d_model))  # sum x
        self.sq_err = np.zeros(c)  # sum ||x - r||^2
        self.ce = np.zeros(c)  # sum of CE over the context's predictions (spliced, zeroed or clean)
        self.kl = np.zeros(c)
        self.outliers = np.zeros(c)  # rows above the outlier threshold
        # the same sums over typical rows only: errors left out at outliers, outliers spliced clean
        self.x_sq_typ = np.zeros(c)
        self.x_sum_typ = np.zeros((c, self.d_model))
        self.rows_typ = np.zeros(c)
        self.sq_err_typ = np.zeros(c)
        self.ce_typ = np.zeros(c)
        self.kl_typ = np.zeros(c)

    def add_rows(self, ctx: np.ndarray, x: torch.Tensor, outlier: np.ndarray) -> None:
        xd = x.double().cpu()
        sq = (xd**2).sum(1)
        typ = ~outlier
        _add_at(self.rows, ctx, torch.ones(len(ctx), dtype=torch.float64))
        _add_at(self.x_sq, ctx, sq)
        _add_at(self.x_sum, ctx, xd)
        _add_at(self.outliers, ctx, torch.from_numpy(outlier.astype(np.float64)))
        _add_at(self.rows_typ, ctx[typ], torch.ones(int(typ.sum()), dtype=torch.float64))
        _add_at(self.x_sq_typ, ctx[typ], sq[typ])
        _add_at(self.x_sum_typ, ctx[typ], xd[typ])

    def store(self, view: str, ctx: np.ndarray, ce: np.ndarray, kl: np.ndarray) -> None:
        """One spliced view's per-context sums: "all" tokens, "typical" (outliers kept clean), or both."""
        if view in ("all", "both", "zero"):
            self.ce[ctx], self.kl[ctx] = ce, kl
        if view in ("typical", "both"):
            self.ce_typ[ctx], self.kl_typ[ctx] = ce, kl

    def add_errors(self, ctx: np.ndarray, x: torch.Tensor, recon: torch.Tensor, outlier: np.ndarray) -> None:
        err = (x.double() - recon.double()).pow(2).sum(1).cpu()
        _add_at(self.sq_err, ctx, err)
        _add_at(self.sq_err_typ, ctx[~outlier], err[~outlier])

    def total_var(self, typical: bool = False) -> np.ndarray:
        """Per context, sum ||x - m||^2 with m the mean over every context (m taken as known);
        `typical`: over typical rows only, about their own mean."""
        x_sq, x_sum, rows = (self.x_sq_typ, self.x_sum_typ, self.rows_typ) if typical else (self.x_sq, self.x_sum, self.rows)
        m = x_sum.sum(0) / max(rows.sum(), 1.0)
        return x_sq - 2.0 * x_sum @ m + rows * float(m @ m)


SPLICE_PREDICTIONS = {"cuda": 4096, "cpu": 1024}
"""Predictions per stacked spliced pass at most, by device type (others: the CPU's). On a GPU, stacking
a layer's edits into few passes fills the device, and 4,096 bounds the [predictions, vocabulary]
logits (800 MB in float32 at a 49K vocabulary). On a CPU the reductions over those logits are bound by
memory traffic, and a pass of one 4-context batch (1,020 predictions) ran 1.4x faster per edit than
stacks of four (bench/report.py: ratio 0.912 against 0.653, 2026-12-03), so stacking there only
gathers small passes (a few contexts) up to a batch's size."""


def _stack_limit(device: torch.device) -> int:
    return SPLICE_PREDICTIONS.get(device.type, SPLICE_PREDICTIONS["cpu"])


class _CleanBatch:
    """One batch's clean pass, and CE / KL sums of passes with one layer's kept positions replaced.

    CE and KL come from each spliced pass's log-sum-exp over the vocabulary and one product with the
    clean distribution (KL = sum p (clean - spliced logits) + lse - clean lse), not from its full
    log-softmax: the same figures with fewer passes over [predictions, vocabulary]."""

    # Every [contexts, positions, vocabulary] array here keeps the last position, which predicts
    # nothing: slicing it off first would copy the whole array (not contiguous), a seventh of the
    # CE reductions' time; the per-position figures are sliced instead.

    def __init__(self, splicer: Splicer, ids, resid: dict[int, torch.Tensor], logits, keep):
        self.splicer, self.ids, self.resid, self.keep = splicer, ids, resid, keep
        self._subsets: dict[tuple[int, ...], _CleanBatch] = {}
        self.n_predictions = ids[:, 1:].numel()
        self.next_token = torch.nn.functional.pad(ids[:, 1:], (0, 1))[..., None]  # [B, T, 1]; the last is a pad
        self.clean_logits = logits.float()
        self.clean_lse = torch.logsumexp(self.clean_logits, dim=-1)
        self.clean_probs = torch.exp(self.clean_logits - self.clean_lse[..., None])  # shared by every spliced pass
        # KL = sum p (clean - spliced) + lse - clean lse; sum p clean is the same for every spliced pass,
        # so a pass costs one product with p, not a [B, T, V] difference written and read again
        self.clean_expected = torch.linalg.vecdot(self.clean_probs, self.clean_logits) - self.clean_lse
        self.clean_ce = self._predicted(self.clean_lse - self.clean_logits.gather(-1, self.next_token)[..., 0])
        self.clean_ce_sum = float(self.clean_ce.sum())

    @staticmethod
    def _predicted(per_position: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T - 1]: the positions that predict a token."""
        return per_position[:, :-1]

    def clean_ce_per_context(self) -> np.ndarray:
        return self._per_context(self.clean_ce)

    def _per_context(self, per_prediction: torch.Tensor) -> np.ndarray:
        return per_prediction.sum(1).double().cpu().numpy()

    def _ce_and_kl(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = logits.float()
        lse = torch.logsumexp(out, dim=-1)
        ce = lse - out.gather(-1, self.next_token)[..., 0]
        kl = self.clean_expected - torch.linalg.vecdot(self.clean_probs, out) + lse
        return self._per_context(self._predicted(ce)), self._per_context(self._predicted(kl))

    def spliced(self, layer: int, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per context of the batch, (sum of CE, sum of KL) with `values` at layer's kept positions."""
        return self.spliced_many(layer, [values])[0]

    def spliced_edits(self, layer: int, edits: list[_Edit]) -> list[tuple[np.ndarray, np.ndarray]]:
        """spliced_many() of edits that may cover only some of the batch's contexts (edit.contexts):
        each set of contexts runs in passes of its own rows, so an edit costs only its contexts' share."""
        by_contexts: dict[tuple[int, ...] | None, list[int]] = {}
        for i, edit in enumerate(edits):
            by_contexts.setdefault(edit.contexts, []).append(i)
        results: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(edits)
        for contexts, which in by_contexts.items():
            batch = self if contexts is None else self._subset(contexts)
            for i, result in zip(which, batch.spliced_many(layer, [edits[i].values for i in which])):
                results[i] = result
        return results

    def _subset(self, contexts: tuple[int, ...]) -> _CleanBatch:
        """The same clean pass restricted to some of its contexts (kept for the batch's other layers)."""
        if contexts not in self._subsets:
            rows = list(contexts)
            self._subsets[contexts] = _CleanBatch(
                self.splicer, self.ids[rows], {k: v[rows] for k, v in self.resid.items()}, self.clean_logits[rows],
                self.keep[rows],
            )  # fmt: skip
        return self._subsets[contexts]

    def spliced_many(self, layer: int, edits: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """spliced() for each of several values at the same layer, stacked along the batch: one pass
        of the later blocks per SPLICE_PREDICTIONS[device] predictions, not one per edit."""
        per = max(1, _stack_limit(self.ids.device) // max(self.n_predictions, 1))
        b, out = self.ids.shape[0], []
        for s in range(0, len(edits), per):
            chunk = edits[s : s + per]
            k = len(chunk)
            new = self.resid[layer].repeat(k, 1, 1)
            new[self.keep.repeat(k, 1)] = torch.cat(chunk).to(new.dtype)
            logits = self.splicer.spliced(self.ids, layer, new, repeats=k)
            out += [self._ce_and_kl(logits[i * b : (i + 1) * b]) for i in range(k)]
        return out


class _Edit(NamedTuple):
    """One spliced pass's values at one layer, and where its per-context sums go."""

    values: torch.Tensor  # the kept rows of `contexts` (in order), replaced
    to: _PerContext
    view: str  # _PerContext.store's: both, typical or zero
    contexts: tuple[int, ...] | None = None  # in-batch contexts it covers; None: every CE context of the batch


def _edits(
    to: _PerContext, x: torch.Tensor, recon: torch.Tensor, outlier: torch.Tensor, row_context: torch.Tensor, n_contexts: int
) -> list[_Edit]:
    """The spliced views of one (SAE, layer) on the CE rows (x, recon, outlier per row; row_context: each
    row's in-batch context): the reconstruction everywhere, and, in the contexts holding an outlier, the
    reconstruction with the outliers kept clean (as BOS is). In a context without an outlier the two
    views are the same pass, so the second runs on the contexts that hold one only: massive activations
    sit in a few contexts (the default run: at most 3 of 128 at a layer)."""
    everywhere = _Edit(recon, to, "both")
    if not bool(outlier.any()):
        return [everywhere]
    held = tuple(sorted(set(row_context[outlier].tolist())))
    if len(held) == n_contexts:  # every context: the batch's own clean pass, not a copy of it
        return [everywhere, _Edit(torch.where(outlier[:, None], x, recon), to, "typical")]
    rows = torch.isin(row_context, torch.tensor(held, device=row_context.device))
    return [everywhere, _Edit(torch.where(outlier[:, None], x, recon)[rows], to, "typical", held)]  # after "both": overrides it


@dataclass
class EvalResult:
    rows: list[dict]  # one per (SAE, layer)
    densities: dict[str, np.ndarray]  # per SAE: each latent's firing rate over all its layers' rows
    examples: dict[str, TopExamples]
    clean_ce: float
    ce_tokens: int  # predictions the CE / KL figures rest on
    eval_tokens: int
    ce_contexts: int = 0  # contexts those predictions come from (the units of the CE standard errors)
    eval_contexts: int = 0  # contexts of the reconstruction metrics (the units of FVU's standard error)
    influence: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    """Per (SAE name, layer), per metric with a standard error (metric_table.WITH_SE): each context's influence (metrics.ratio_influence)."""

    def mean_with_se(self, keys: list[tuple[str, int]], metric: str) -> tuple[float, float]:
        """Mean of `metric` over the (SAE, layer) rows `keys`, and its standard error over contexts."""
        by = {(r["sae"], r["layer"]): r for r in self.rows}
        vals = [by[k][metric] for k in keys if k in by and metric in by[k]]
        infl = [self.influence[k][metric] for k in keys if k in self.influence and metric in self.influence[k]]
        if not vals:
            return float("nan"), float("nan")
        se = standard_error(np.mean(infl, axis=0)) if len(infl) == len(vals) else float("nan")
        return float(np.mean(vals)), se

    def difference_with_se(
        self, a: list[tuple[str, int]], b: list[tuple[str, int]], metric: str
    ) -> tuple[float, float]:
        """Mean of `metric` over rows `a` minus over rows `b` (same contexts), with its paired standard error."""
        ma, _ = self.mean_with_se(a, metric)
        mb, _ = self.mean_with_se(b, metric)
        try:
            ia = np.mean([self.influence[k][metric] for k in a], axis=0)
            ib = np.mean([self.influence[k][metric] for k in b], axis=0)
        except KeyError:
            return ma - mb, float("nan")
        return ma - mb, standard_error(ia - ib)


def evaluate(
    lm: LoadedModel,
    contexts: np.ndarray,
    targets: list[EvalTarget],
    special_ids: Iterable[int],
    ce_contexts: int,
    batch_contexts: int = 4,
    latents_sampled: int = 32,
    examples_per_latent: int = 5,
    seed: int = 0,
    progress: bool = True,
    zero_ablation: bool = True,
    outlier_threshold: dict[int, float] | None = None,
    hookpoint: str = "resid_post",
    observe: Callable[[str, int, Latents, torch.Tensor, torch.Tensor], None] | None = None,
) -> EvalResult:
    """observe(name, layer, z, coords, sampled latents): called with each (SAE, layer)'s latents of
    each batch's rows, so that a caller tallies more of them (the report's dashboards) without a pass
    of its own.
    zero_ablation: also splice zeros in at each layer, the CE-loss score's floor (one more pass of
    the later blocks per layer; the sweep, which reports no CE score, leaves it out).
    outlier_threshold: per layer, the norm (raw units) above which a token is an outlier there; the
    `_typical` figures leave those tokens out (none without it).
    hookpoint: the activation the SAEs read and the spliced passes replace (the run's plan.hookpoint)."""
    thresholds = outlier_threshold or {}
    device = lm.device
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
    layers = sorted({layer for t in targets for layer in t.sae.cfg.layers})
    splicer = Splicer(lm, hookpoint)
    sums = {(t.name, layer): ReconstructionSums(lm.d_model) for t in targets for layer in t.sae.cfg.layers}
    n_ctx = contexts.shape[0]
    per_layer = {layer: _PerContext(n_ctx, lm.d_model) for layer in layers}  # x statistics; zero-ablated CE
    per_sae = {key: _PerContext(n_ctx) for key in sums}  # reconstruction errors; spliced CE and KL
    clean = _PerContext(n_ctx)  # clean CE per context (ce), predictions per context (rows)
    clean_ce_sum, ce_tokens = 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    examples = {
        t.name: TopExamples(
            torch.randperm(t.sae.cfg.n_latents, generator=gen)[: min(latents_sampled, t.sae.cfg.n_latents)],
            examples_per_latent,
        )
        for t in targets
    }
    for t in targets:
        t.sae.to(device).eval()
    bar = tqdm(total=contexts.shape[0], unit="ctx", desc="eval", disable=not progress)
    for start in range(0, contexts.shape[0], batch_contexts):
        ids = torch.from_numpy(np.array(contexts[start : start + batch_contexts])).long().to(device)
        # exactly the first ce_contexts contexts are spliced: a prefix of this batch, and of its kept rows
        n_ce = max(0, min(ids.shape[0], ce_contexts - start))
        with torch.inference_mode():
            resid, logits = splicer.clean(ids, logits_to_keep=0 if n_ce else 1)
            keep = ~torch.isin(ids, special)
            coords = keep.nonzero()  # [N, 2] (context in batch, position)
            coords_global = coords.cpu() + torch.tensor([start, 0])
            row_ctx = coords_global[:, 0].numpy()  # each kept row's context
            batch_ctx = np.arange(start, start + n_ce)
            ce_rows = int(keep[:n_ce].sum())
            ce = (
                _CleanBatch(splicer, ids[:n_ce], {k: v[:n_ce] for k, v in resid.items()}, logits[:n_ce], keep[:n_ce])
                if n_ce
                else None
            )
            if ce is not None:
                clean_ce_sum += ce.clean_ce_sum
                ce_tokens += ce.n_predictions
                clean.ce[batch_ctx] = ce.clean_ce_per_context()
                clean.rows[batch_ctx] = ce.n_predictions // n_ce
            for layer in layers:
                x = resid[layer][keep].float()
                outlier_t = x.norm(dim=1) > thresholds.get(layer, float("inf"))
                outlier = outlier_t.cpu().numpy()
                per_layer[layer].add_rows(row_ctx, x, outlier)
                edits: list[_Edit] = []
                for t in targets:
                    if layer not in t.sae.cfg.layers:
                        continue
                    z = t.sae.encode_latents(x, layer)
                    recon = t.sae.decode_latents(z, layer)
                    sums[(t.name, layer)].add(x, recon, z)
                    ps = per_sae[(t.name, layer)]
                    ps.add_errors(row_ctx, x, recon, outlier)
                    examples[t.name].add(z, coords_global, layer)
                    if observe is not None:
                        observe(t.name, layer, z, coords_global, examples[t.name].latents)
                    if ce is not None and t.splices(layer):
                        edits += _edits(ps, x[:ce_rows], recon[:ce_rows], outlier_t[:ce_rows], coords[:ce_rows, 0], n_ce)
                if edits and zero_ablation:
                    edits.append(_Edit(torch.zeros_like(x[:ce_rows]), per_layer[layer], "zero"))
                if ce is not None and edits:
                    for edit, (ce_sums, kl_sums) in zip(edits, ce.spliced_edits(layer, edits)):  # in order: both, then typical
                        at = batch_ctx if edit.contexts is None else batch_ctx[list(edit.contexts)]
                        edit.to.store(edit.view, at, ce_sums, kl_sums)
        bar.update(ids.shape[0])
    bar.close()

    clean_ce = clean_ce_sum / max(ce_tokens, 1)
    n_ce_ctx = int((clean.rows > 0).sum())  # CE contexts are a prefix of the eval contexts
    rows, densities, influence = [], {}, {}
    for t in targets:
        fired = torch.zeros(t.sae.cfg.n_latents, dtype=torch.float64)
        total_rows = 0
        for layer in t.sae.cfg.layers:
            s = sums[(t.name, layer)]
            m = s.finish()
            fired += s.density() * s.rows
            total_rows += s.rows
            row = {"sae": t.name, "kind": t.kind, "group_layers": span(t.sae.cfg.layers), "layer": layer, **m}
            ps, pl = per_sae[(t.name, layer)], per_layer[layer]
            typ_var = pl.total_var(typical=True)
            infl = {
                "fvu": ratio_influence(ps.sq_err, pl.total_var()),
                "fvu_typical": ratio_influence(ps.sq_err_typ, typ_var),
            }
            row.update(
                eval_contexts=n_ctx,
                fvu_typical=float(ps.sq_err_typ.sum()) / max(float(typ_var.sum()), 1e-30),
                outliers=int(pl.outliers.sum()),
                outlier_threshold=float(thresholds.get(layer, float("inf"))),
            )
            if ce_tokens and t.splices(layer):
                sae_ce = float(ps.ce.sum()) / ce_tokens
                z_ce = float(pl.ce.sum()) / ce_tokens
                c = slice(0, n_ce_ctx)
                delta = ps.ce[c] - clean.ce[c]
                delta_typ = ps.ce_typ[c] - clean.ce[c]
                infl.update(
                    delta_ce=ratio_influence(delta, clean.rows[c]),
                    delta_ce_pct=ratio_influence(100.0 * delta, clean.ce[c]),
                    kl=ratio_influence(ps.kl[c], clean.rows[c]),
                    delta_ce_typical=ratio_influence(delta_typ, clean.rows[c]),
                    delta_ce_pct_typical=ratio_influence(100.0 * delta_typ, clean.ce[c]),
                    kl_typical=ratio_influence(ps.kl_typ[c], clean.rows[c]),
                )
                typ_ce = float(ps.ce_typ.sum()) / ce_tokens
                row.update(
                    delta_ce_typical=typ_ce - clean_ce,
                    delta_ce_pct_typical=100.0 * (typ_ce - clean_ce) / clean_ce,
                    kl_typical=float(ps.kl_typ.sum()) / ce_tokens,
                )
                row.update(
                    ce_clean=clean_ce,
                    ce_spliced=sae_ce,
                    delta_ce=sae_ce - clean_ce,
                    delta_ce_pct=100.0 * (sae_ce - clean_ce) / clean_ce,
                    kl=float(ps.kl.sum()) / ce_tokens,
                    ce_predictions=ce_tokens,
                    ce_contexts=n_ce_ctx,
                )
                if zero_ablation:
                    # score = 1 - sum(delta) / sum(zeroed - clean): minus that ratio's influence
                    infl["ce_score"] = -ratio_influence(delta, pl.ce[c] - clean.ce[c])
                    row.update(ce_zero_ablation=z_ce, ce_score=ce_loss_score(clean_ce, sae_ce, z_ce))
            row.update({f"{k}_se": standard_error(v) for k, v in infl.items()})
            influence[(t.name, layer)] = infl
            rows.append(row)
        densities[t.name] = (fired / max(total_rows, 1)).numpy()
    return EvalResult(rows, densities, examples, clean_ce, ce_tokens, int(contexts.size), n_ce_ctx, n_ctx, influence)

