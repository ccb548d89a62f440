"""JumpReLU (Rajamanoharan et al. 2024): per-latent learned thresholds, squared error + an L0 penalty.

Options: [fit.jumprelu] (JumpReLUOptions), stored flat in [fit]. SAELens holds it as "jumprelu".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ghsae.sae.base import RawLayer, SAEConfig, SAELensLayer, SparseAutoencoder, register


@dataclass(frozen=True)
class JumpReLUOptions:
    sparsity_coef: float = 0.001
    """Weight of the L0 penalty, against the squared error per token."""


def _save_threshold(ctx, pre: torch.Tensor, log_t: torch.Tensor, eps: float) -> torch.Tensor:
    """t = exp(log_t), kept with pre and the kernel width for the backward pass."""
    t = log_t.exp()
    ctx.save_for_backward(pre, t)
    ctx.eps = eps
    return t


def _kernel(ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, t, K): K = 1/eps where pre lies within eps/2 of t, the rectangle kernel standing in for
    delta(pre - t) in the straight-through gradient for t."""
    pre, t = ctx.saved_tensors
    return pre, t, ((pre - t).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - t); d/dt through the rectangle kernel (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, log_t, eps):
        t = _save_threshold(ctx, pre, log_t, eps)
        return pre * (pre > t)

    @staticmethod
    def backward(ctx, grad):
        pre, t, k = _kernel(ctx)
        grad_t = -(t * k * grad).sum(0)  # dz/dt = -pre * delta(pre - t), pre ~ t in the kernel
        return grad * (pre > t), grad_t * t, None  # chain rule through t = exp(log_t)


class _Step(torch.autograd.Function):
    """H(pre - t) with the same straight-through gradient for t (the L0 penalty); none for pre."""

    @staticmethod
    def forward(ctx, pre, log_t, eps):
        t = _save_threshold(ctx, pre, log_t, eps)
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, t, k = _kernel(ctx)
        grad_t = -(k * grad).sum(0)  # dH/dt = -delta(pre - t)
        return torch.zeros_like(pre), grad_t * t, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Per-latent learned thresholds; squared error + sparsity_coef * L0, via straight-through estimators."""

    Options = JumpReLUOptions
    flat_options = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), float(torch.tensor(cfg.jump_init_threshold).log()))
        )

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.log_threshold, self.cfg.jump_bandwidth)

    def loss_terms(self, x, pre, z, recon):
        l0 = _Step.apply(pre, self.log_threshold, self.cfg.jump_bandwidth).sum(-1).mean()
        mse = (x - recon).pow(2).sum(-1).mean()
        return {"mse": mse, "l0": self.cfg.sparsity_coef * l0}

    def inference_threshold(self) -> torch.Tensor:
        """[m] each latent's threshold (float64)."""
        return self.log_threshold.detach().double().exp()

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        return SAELensLayer("jumprelu", {"threshold": (self.inference_threshold() * raw.latent_scale).float()})
