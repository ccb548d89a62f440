"""Metric functions of the report, on plain tensors so each can be checked by hand.

Reconstruction metrics are *accumulated* over batches (sums, not means of means) so that an eval
split into batches gives the same number as one big batch: `ReconstructionSums` keeps the sums and
`finish()` turns them into the figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ghsae.sae import Latents


@dataclass
class ReconstructionSums:
    """Running sums over rows x (raw units) and their reconstructions r, for one (SAE, layer)."""

    d_model: int
    rows: int = 0
    active: float = 0.0  # sum over rows of the number of non-zero latents (L0)
    sq_err: float = 0.0  # sum ||x - r||^2
    x_sum: torch.Tensor = field(init=False)
    x_sq: float = 0.0  # sum ||x||^2
    cos: float = 0.0  # sum cos(x, r)
    fired: torch.Tensor | None = None  # per latent: rows where it was active
    err_sum: torch.Tensor = field(init=False)  # sum (x - r), for explained variance's residual mean

    def __post_init__(self) -> None:
        self.x_sum = torch.zeros(self.d_model, dtype=torch.float64)
        self.err_sum = torch.zeros(self.d_model, dtype=torch.float64)

    def add(self, x: torch.Tensor, recon: torch.Tensor, latents: Latents) -> None:
        x, recon = x.double(), recon.double()
        err = x - recon
        self.rows += x.shape[0]
        # per-latent firing counts from the latents' own form: a TopK SAE's (values, indices), never a
        # scan of a dense [rows, m] matrix (that scan was a seventh of the report's evaluation, py-spy)
        counts = latents.fired_counts()
        self.active += float(counts.sum())
        self.sq_err += float(err.pow(2).sum())
        self.x_sum += x.sum(0)
        self.x_sq += float(x.pow(2).sum())
        self.err_sum += err.sum(0)
        self.cos += float(torch.nn.functional.cosine_similarity(x, recon, dim=-1, eps=1e-12).sum())
        self.fired = counts if self.fired is None else self.fired + counts

    def finish(self) -> dict[str, float]:
        n = max(self.rows, 1)
        mean = self.x_sum / n
        total_var = self.x_sq - n * float(mean.pow(2).sum())  # sum ||x - mean||^2
        err_mean = self.err_sum / n
        resid_var = self.sq_err - n * float(err_mean.pow(2).sum())  # sum ||err - mean(err)||^2
        fired = self.fired if self.fired is not None else torch.zeros(0, dtype=torch.int64)
        return {
            "rows": self.rows,
            "l0": self.active / n,
            "mse": self.sq_err / (n * self.d_model),
            "fvu": self.sq_err / max(total_var, 1e-30),
            "explained_variance": 1.0 - resid_var / max(total_var, 1e-30),
            "cosine": self.cos / n,
            "dead_pct": 100.0 * float((fired == 0).double().mean()) if fired.numel() else float("nan"),
        }

    def density(self) -> torch.Tensor:
        """Per latent: the share of rows where it fired."""
        assert self.fired is not None
        return self.fired.double() / max(self.rows, 1)


def token_ce_and_kl(
    clean_logprobs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, clean_probs: torch.Tensor | None = None
):
    """Per-position CE of the targets and KL(clean || these logits), from one log-softmax over the vocabulary.

    clean_probs (= clean_logprobs.exp()) may be passed in when many passes share one clean batch.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ce = -logprobs.gather(-1, targets[:, None])[:, 0]
    p = clean_logprobs.exp() if clean_probs is None else clean_probs
    kl = (p * (clean_logprobs - logprobs)).sum(-1)
    return ce, kl


def ce_loss_score(clean_ce: float, spliced_ce: float, zero_ce: float) -> float:
    """1 when splicing in the SAE costs nothing, 0 when it is as bad as zeroing the layer."""
    denom = zero_ce - clean_ce
    return (zero_ce - spliced_ce) / denom if abs(denom) > 1e-12 else float("nan")


def mmcs(decoder_a: torch.Tensor, decoder_b: torch.Tensor, chunk: int = 4096) -> float:
    """Mean max cosine similarity: for each row of decoder_a, its best match among decoder_b's rows."""
    a = torch.nn.functional.normalize(decoder_a.float(), dim=-1)
    b = torch.nn.functional.normalize(decoder_b.float(), dim=-1)
    best = torch.cat([(a[i : i + chunk] @ b.T).max(dim=-1).values for i in range(0, a.shape[0], chunk)])
    return float(best.mean())


def ratio_influence(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Each unit's influence on R = sum(num) / sum(den), for R's standard error over units.

    Units are eval contexts: predictions inside one context are correlated, contexts are
    independent draws. Linearising R (the delta method), unit s contributes
    (num_s - R den_s) / sum(den); the squared influences sum, times S / (S - 1), to R's variance.
    Means of several ratios (a mean over layers) take the mean of their influences, so their
    correlation through shared contexts is kept.
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    total = den.sum()
    if total == 0:
        return np.full(num.shape, np.nan)
    return (num - (num.sum() / total) * den) / total


def standard_error(influence: np.ndarray) -> float:
    """Standard error from per-unit influences (NaN with fewer than two units)."""
    s = influence.shape[0]
    if s < 2:
        return float("nan")
    return float(np.sqrt(s / (s - 1) * np.square(influence).sum()))
