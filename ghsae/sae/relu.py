"""ReLU latents with an L1 penalty (the standard SAE). Options: [fit.relu] (ReLUOptions), stored
flat in [fit]. SAELens holds it as "standard"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghsae.sae.base import RawLayer, SAELensLayer, SparseAutoencoder, register


@dataclass(frozen=True)
class ReLUOptions:
    sparsity_coef: float = 0.001
    """Weight of the L1 penalty, against the squared error per token."""


@register("relu")
class ReLUSAE(SparseAutoencoder):
    """ReLU latents; squared error + sparsity_coef * L1 (decoder rows are unit norm, so no reweighting)."""

    Options = ReLUOptions
    flat_options = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def loss_terms(self, x, pre, z, recon):
        mse = (x - recon).pow(2).sum(-1).mean()
        return {"mse": mse, "l1": self.cfg.sparsity_coef * z.abs().sum(-1).mean()}

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        return SAELensLayer("standard")
