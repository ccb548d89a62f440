"""Evaluate SAEs on the run's held-out contexts: reconstruction, spliced-in CE and KL, dead latents,
and the contexts where a sample of latents fires hardest.

One clean forward pass per batch of contexts keeps every block's output; each (SAE, layer) is then
measured on the non-special positions of that layer (the rows harvest would have stored), and for
the first `ce_contexts` contexts its reconstruction is spliced into the forward pass at that layer
alone (see splice.py: only the blocks after the layer are run). Zero-ablating the same positions
gives the CE-loss score's floor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ghsae.analysis.metrics import ReconstructionSums, ce_loss_score, token_ce_and_kl
from ghsae.analysis.splice import Splicer
from ghsae.harvest.model import LoadedModel
from ghsae.train.sae import SparseAutoencoder


@dataclass
class EvalTarget:
    """One SAE to evaluate on each layer it serves. kind: "group" (this run) or "baseline"."""

    name: str
    kind: str
    sae: SparseAutoencoder


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

    def add(self, z: torch.Tensor, coords: torch.Tensor, layer: int) -> None:
        """z [N, m] latents of rows at coords [N, 2] (context, position) drawn from `layer`.

        A token is evaluated at every layer its SAE serves; it is kept once, at its strongest layer.
        """
        vals = z[:, self.latents].T.float().cpu()  # [S, N]
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


@dataclass
class _Splice:
    ce: float = 0.0
    kl: float = 0.0


class _CleanBatch:
    """One batch's clean pass, and CE / KL sums of passes with one layer's kept positions replaced."""

    def __init__(self, splicer: Splicer, ids, resid: dict[int, torch.Tensor], logits, keep):
        self.splicer, self.ids, self.resid, self.keep = splicer, ids, resid, keep
        self.targets = ids[:, 1:].reshape(-1)
        self.n_predictions = self.targets.numel()
        clean = logits[:, :-1].reshape(self.n_predictions, -1)
        self.clean_logprobs = torch.log_softmax(clean.float(), dim=-1)
        self.clean_probs = self.clean_logprobs.exp()  # shared by every spliced pass of the batch
        # the clean CE from the same log-softmax the KLs use, not a second one over the vocabulary
        self.clean_ce_sum = -float(self.clean_logprobs.gather(-1, self.targets[:, None]).sum())

    def spliced(self, layer: int, values: torch.Tensor) -> tuple[float, float]:
        """(sum of CE, sum of KL) over the batch's predictions with `values` at layer's kept positions."""
        new = self.resid[layer].clone()
        new[self.keep] = values.to(new.dtype)
        out = self.splicer.spliced(self.ids, layer, new)[:, :-1].reshape(self.n_predictions, -1)
        ce, kl = token_ce_and_kl(self.clean_logprobs, out, self.targets, self.clean_probs)
        return float(ce.sum()), float(kl.sum())


@dataclass
class EvalResult:
    rows: list[dict]  # one per (SAE, layer)
    densities: dict[str, np.ndarray]  # per SAE: each latent's firing rate over all its layers' rows
    examples: dict[str, TopExamples]
    clean_ce: float
    ce_tokens: int
    eval_tokens: int


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
) -> EvalResult:
    device = lm.device
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
    layers = sorted({layer for t in targets for layer in t.sae.cfg.layers})
    splicer = Splicer(lm)
    sums = {(t.name, layer): ReconstructionSums(lm.d_model) for t in targets for layer in t.sae.cfg.layers}
    spliced = {key: _Splice() for key in sums}
    zero_ce = {layer: 0.0 for layer in layers}
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
        with torch.inference_mode():
            resid, logits = splicer.clean(ids)
            keep = ~torch.isin(ids, special)
            coords = keep.nonzero()  # [N, 2] (context in batch, position)
            coords_global = coords.cpu() + torch.tensor([start, 0])
            ce = _CleanBatch(splicer, ids, resid, logits, keep) if start < ce_contexts else None
            if ce is not None:
                clean_ce_sum += ce.clean_ce_sum
                ce_tokens += ce.n_predictions
            for layer in layers:
                x = resid[layer][keep].float()
                if ce is not None:
                    zero_ce[layer] += ce.spliced(layer, torch.zeros_like(x))[0]
                for t in targets:
                    if layer not in t.sae.cfg.layers:
                        continue
                    z = t.sae.encode(x, layer)
                    recon = t.sae.denormalise(t.sae.decode(z), layer)
                    sums[(t.name, layer)].add(x, recon, z)
                    examples[t.name].add(z, coords_global, layer)
                    if ce is not None:
                        ce_sum, kl_sum = ce.spliced(layer, recon)
                        spliced[(t.name, layer)].ce += ce_sum
                        spliced[(t.name, layer)].kl += kl_sum
        bar.update(ids.shape[0])
    bar.close()

    clean_ce = clean_ce_sum / max(ce_tokens, 1)
    rows, densities = [], {}
    for t in targets:
        fired = torch.zeros(t.sae.cfg.n_latents, dtype=torch.float64)
        total_rows = 0
        for layer in t.sae.cfg.layers:
            s = sums[(t.name, layer)]
            m = s.finish()
            fired += s.density() * s.rows
            total_rows += s.rows
            row = {"sae": t.name, "kind": t.kind, "group_layers": _span(t.sae.cfg.layers), "layer": layer, **m}
            if ce_tokens:
                sae_ce = spliced[(t.name, layer)].ce / ce_tokens
                z_ce = zero_ce[layer] / ce_tokens
                row.update(
                    ce_clean=clean_ce,
                    ce_spliced=sae_ce,
                    delta_ce=sae_ce - clean_ce,
                    delta_ce_pct=100.0 * (sae_ce - clean_ce) / clean_ce,
                    ce_zero_ablation=z_ce,
                    ce_score=ce_loss_score(clean_ce, sae_ce, z_ce),
                    kl=spliced[(t.name, layer)].kl / ce_tokens,
                )
            rows.append(row)
        densities[t.name] = (fired / max(total_rows, 1)).numpy()
    return EvalResult(rows, densities, examples, clean_ce, ce_tokens, int(contexts.size))


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
