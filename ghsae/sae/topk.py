"""TopK (the Group-SAE reference) and BatchTopK: k latents a token, trained sparsely with AuxK.

Options: [fit.topk] / [fit.batchtopk] (TopKOptions), stored flat in [fit] as these runs always were.
SAELens holds TopK as "topk" and BatchTopK as "jumprelu" with one threshold; sparsify holds TopK.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghsae.errors import ConfigError
from ghsae.sae.base import (
    RawLayer,
    SAEConfig,
    SAELensLayer,
    SAEOutput,
    SparseAutoencoder,
    fvu,
    register,
    total_variance,
)
from ghsae.sae.latents import Latents
from ghsae.sae.sparse import SparseCodes, decode_active, encode_active


@dataclass(frozen=True)
class TopKOptions:
    k: int = 128
    """Active latents per token (topk) or on average per token (batchtopk)."""
    aux_coef: float = 0.03125
    """AuxK loss weight (Gao et al. 2024)."""
    auxk_normalisation: str = "total-variance"
    """How the AuxK loss is scaled: total-variance (the Group-SAE reference and sparsify) or
    error-variance (OpenAI's implementation)."""


class TopKFamily(SparseAutoencoder):
    """TopK-style SAEs, trained sparsely: FVU + AuxK over the dead latents (sparse.py)."""

    Options = TopKOptions
    keeps_k = True
    flat_options = True

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, SparseCodes]:
        """(active pre-activations [nnz], their pattern) chosen from pre [n, m] (no graph)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> SAEOutput:
        if not self.training:
            return super().forward(x)
        W_enc, b_enc, b_dec = self.W_enc, self.b_enc, self.b_dec
        with torch.no_grad():
            xc = x - b_dec
            pre = torch.addmm(b_enc, xc, W_enc)  # the one dense product of the step
            chosen, codes = self.select(pre)
        values = encode_active(chosen, codes, x, W_enc, b_enc, b_dec, xc).relu()
        codes = codes.with_values(values)
        recon = decode_active(codes, self.W_dec) + b_dec
        var = total_variance(x)
        err = x - recon
        main = err.pow(2).sum() / var
        losses = {"fvu": main, "auxk": self.auxk_loss(x, pre, xc, err.detach(), var)}
        del pre
        total = losses["fvu"] + losses["auxk"]
        return SAEOutput(recon, losses, total, main.detach(), codes=codes)

    def auxk_loss(
        self, x: torch.Tensor, pre: torch.Tensor, xc: torch.Tensor, err: torch.Tensor, var: torch.Tensor
    ) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the k_aux most active dead latents reconstruct the residual error.

        k_aux = cfg.effective_aux_k (d/2). "total-variance" (default, as the Group-SAE reference and
        sparsify compute it): ||err - err_hat||^2 / total variance of x, times min(n_dead / k_aux, 1).
        "error-variance" (OpenAI): ||err - err_hat||^2 over the summed squared deviation of err from
        its batch mean, no scale. Only dead columns of pre are read; nothing runs when none is dead.
        """
        ids = self.dead_ids()
        if ids.numel() == 0:
            return pre.new_zeros(())
        k_aux = self.cfg.effective_aux_k
        mask = self.dead_mask
        with torch.no_grad():
            sub = pre.index_select(1, ids)
            sub.masked_fill_(~mask[ids], -torch.inf)  # revived since the last read
            top, j = sub.topk(min(k_aux, ids.numel()), dim=-1, sorted=False)
            idx = ids[j]
            still_dead = torch.isfinite(top)
            chosen = torch.where(still_dead, top, 0.0)
        codes = SparseCodes.from_topk(chosen, idx, self.cfg.n_latents)
        values = encode_active(codes.values, codes, x, self.W_enc, self.b_enc, self.b_dec, xc)
        values = values.relu() * still_dead.reshape(-1)
        err_hat = decode_active(codes.with_values(values), self.W_dec)
        sq = (err_hat - err).pow(2).sum()
        if self.cfg.auxk_normalisation == "error-variance":
            loss = sq / total_variance(err)
        else:
            scale = (mask.sum() / k_aux).clamp(max=1.0)
            loss = scale * sq / var
        return self.cfg.aux_coef * loss.nan_to_num(0.0)


@register("topk")
class TopKSAE(TopKFamily):
    """k largest pre-activations per token, ReLU'd; FVU + AuxK (the Group-SAE reference)."""

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def encode_latents(self, x: torch.Tensor, layer: int | torch.Tensor) -> Latents:
        _, codes = self.select(self.pre_acts(self.normalise(x, layer)))
        return Latents.from_codes(codes.with_values(codes.values.relu()))

    def select(self, pre):
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        codes = SparseCodes.from_topk(vals, idx, self.cfg.n_latents)
        return codes.values, codes

    sparsify_activation = "topk"  # sparsify's topk(relu(.)) keeps the same latents as its ReLU after the top k

    def loss_terms(self, x, pre, z, recon):  # the dense path (eval mode): no AuxK outside training
        return {"fvu": fvu(x, recon), "auxk": pre.new_zeros(())}

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        return SAELensLayer("topk", cfg={"k": self.cfg.k, "rescale_acts_by_decoder_norm": False})


@register("batchtopk")
class BatchTopKSAE(TopKFamily):
    """k x n largest pre-activations over the whole batch (Bussmann et al. 2024).

    At inference one learned threshold replaces the batch (an average of the smallest kept
    activation per batch), so a token's latents do not depend on its batch-mates.
    """

    threshold: torch.Tensor
    threshold_steps: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre * (pre > self.threshold)
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()))
        self._track_threshold(vals)
        return torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)

    @torch.no_grad()
    def _track_threshold(self, kept: torch.Tensor) -> None:
        """Running mean (then an EMA at rate 0.01) of the smallest positive kept value; no host sync."""
        positive = kept > 0
        any_kept = positive.any()
        smallest = torch.where(positive, kept, torch.inf).min()
        self.threshold_steps.add_(any_kept.long())
        rate = (1.0 / self.threshold_steps.clamp_min(1).float()).clamp_min(0.01)
        updated = self.threshold + (smallest - self.threshold) * rate
        self.threshold.copy_(torch.where(any_kept, updated, self.threshold))

    def inference_threshold(self) -> torch.Tensor:
        """[m] the one learned threshold, for every latent (float64)."""
        if float(self.threshold) <= 0:
            raise ConfigError("this batchtopk SAE has no inference threshold yet (it was never trained); fit it first")
        return torch.full((self.cfg.n_latents,), float(self.threshold), dtype=torch.float64)

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        # At inference BatchTopK is pre * (pre > t), t > 0: SAELens's JumpReLU (relu(pre) * (pre > t))
        # is the same function, with one threshold for all latents.
        return SAELensLayer("jumprelu", {"threshold": (self.inference_threshold() * raw.latent_scale).float()})

    def select(self, pre):
        n, m = pre.shape
        flat = pre.flatten()
        vals, idx = flat.topk(min(self.cfg.k * n, flat.numel()), sorted=False)
        idx, order = idx.sort()  # row-major: CSR rows in order
        vals = vals[order]
        self._track_threshold(vals.relu())
        rows = idx // m
        crow = torch.searchsorted(rows, torch.arange(n + 1, device=pre.device))
        return vals, SparseCodes(vals, idx % m, crow, m)

    def loss_terms(self, x, pre, z, recon):
        return {"fvu": fvu(x, recon), "auxk": pre.new_zeros(())}
