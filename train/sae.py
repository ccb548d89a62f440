"""Sparse autoencoders: one base class, architectures registered by name.

Every SAE works in *normalised* space: a group SAE serves several layers, each scaled by its own
factor so that E||x|| = sqrt(d) (Ghilardi et al. 2025), optionally centred. The SAE carries those
per-layer factors as buffers, so `encode(x, layer)` and `reconstruct(x, layer)` take raw
residuals and `reconstruct` returns the layer's raw units. Training feeds already-normalised
batches to `forward` (the loader normalises on the device).

Shapes: x [n, d], latents [n, m], W_enc [d, m], W_dec [m, d].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ghsae.cache.loader import layer_lookup_table

REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    def wrap(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in REGISTRY:
            raise ValueError(
                f"SAE architecture {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})"
            )
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass
class SAEConfig:
    architecture: str
    """Registered name: topk, batchtopk, jumprelu or relu."""
    d_model: int
    """Width of the residual stream."""
    n_latents: int
    """Dictionary size m (expansion x d)."""
    layers: list[int]
    """Model layers this SAE serves, in order; one normalisation entry per layer."""
    k: int = 128
    """Active latents per token (topk) or on average per token (batchtopk)."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss (0: d_model // 2, capped at n_latents)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many training tokens without firing."""
    sparsity_coef: float = 1e-3
    """L0 (jumprelu) or L1 (relu) penalty weight, against the squared error per token."""
    jump_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the JumpReLU straight-through estimator."""
    jump_init_threshold: float = 1e-3
    """Initial JumpReLU threshold."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (run, group, config hash); saved, never interpreted."""

    def __post_init__(self) -> None:
        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(REGISTRY)}")
        if self.k < 1 or (self.architecture in ("topk", "batchtopk") and self.k > self.n_latents):
            raise ValueError(f"k is {self.k}; expected 1..n_latents ({self.n_latents})")
        if not self.layers:
            raise ValueError("an SAE must serve at least one layer")

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or self.d_model // 2, self.n_latents)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SAEOutput:
    recon: torch.Tensor  # [n, d] in normalised space
    latents: torch.Tensor  # [n, m]
    losses: dict[str, torch.Tensor]  # each term, already weighted
    loss: torch.Tensor  # their sum, what is minimised
    fvu: torch.Tensor  # fraction of variance unexplained on this batch


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the summed squared deviation from the batch mean."""
    return (x - recon).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


class SparseAutoencoder(nn.Module):
    architecture: ClassVar[str] = ""
    # buffers (registered in __init__), declared for the type checker
    norm_layers: torch.Tensor
    norm_scale: torch.Tensor
    norm_mean: torch.Tensor
    layer_lookup: torch.Tensor
    tokens_since_fired: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_model, cfg.n_latents
        W_dec = torch.randn(m, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # encoder starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        L = len(cfg.layers)
        self.register_buffer("norm_layers", torch.tensor(cfg.layers, dtype=torch.long))
        self.register_buffer("norm_scale", torch.ones(L))
        self.register_buffer("norm_mean", torch.zeros(L, d))
        self.register_buffer("layer_lookup", layer_lookup_table(cfg.layers))
        # tokens since each latent last fired, for dead-latent tracking and AuxK
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))

    # --- normalisation ----------------------------------------------------------------

    def set_normalisation(self, scale: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        """Per-layer factors, in the order of cfg.layers: x_norm = (x - mean) * scale."""
        self.norm_scale.copy_(scale)
        if mean is not None:
            self.norm_mean.copy_(mean)

    def layer_positions(self, layer: int | torch.Tensor, n: int) -> torch.Tensor:
        """Index into the normalisation buffers for each row's layer (one int, or [n] ids)."""
        ids = torch.as_tensor(layer, device=self.layer_lookup.device).long()
        if ids.dim() == 0:
            ids = ids.expand(n)
        size = self.layer_lookup.numel()
        pos = self.layer_lookup[ids.clamp(0, size - 1)]
        bad = (ids < 0) | (ids >= size) | (pos < 0)
        if bad.any():
            raise ValueError(f"this SAE serves layers {self.cfg.layers}; got layer {ids[bad].unique().tolist()}")
        return pos

    def normalise(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        pos = self.layer_positions(layer, x.shape[0])
        return (x - self.norm_mean[pos]) * self.norm_scale[pos, None]

    def denormalise(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        pos = self.layer_positions(layer, x.shape[0])
        return x / self.norm_scale[pos, None] + self.norm_mean[pos]

    # --- the public interface ------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def encode(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Latents [n, m] of raw residuals x [n, d] taken at `layer` (an int or one id per row)."""
        return self.activate(self.pre_acts(self.normalise(x, layer)))

    def reconstruct(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw residuals, in the layer's raw units."""
        return self.denormalise(self.decode(self.encode(x, layer)), layer)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Training step on a normalised batch: reconstruction, latents and every loss term."""
        pre = self.pre_acts(x)
        z = self.activate(pre)
        recon = self.decode(z)
        losses = self.loss_terms(x, pre, z, recon)
        total = torch.stack(list(losses.values())).sum()
        return SAEOutput(recon, z, losses, total, fvu(x, recon.detach()))

    def loss_terms(self, x, pre, z, recon) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- training-time housekeeping ------------------------------------------------------

    def update_dead(self, z: torch.Tensor) -> None:
        fired = (z > 0).any(dim=0)
        self.tokens_since_fired += z.shape[0]
        self.tokens_since_fired[fired] = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each unit-norm decoder row (it would only change the norm)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    def auxk_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top dead latents reconstruct the residual error."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        err = (x - recon).detach()
        k = min(self.cfg.effective_aux_k, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(k, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        err_hat = z_aux @ self.W_dec
        return self.cfg.aux_coef * fvu(err, err_hat).nan_to_num(0.0)


@register("topk")
class TopKSAE(SparseAutoencoder):
    """k largest pre-activations per token, ReLU'd; FVU + AuxK (the Group-SAE reference)."""

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def loss_terms(self, x, pre, z, recon):
        return {"fvu": fvu(x, recon), "auxk": self.auxk_loss(x, pre, recon)}


@register("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
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
        z = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
        with torch.no_grad():
            kept = vals[vals > 0]
            if kept.numel():
                self.threshold_steps += 1
                rate = max(1.0 / float(self.threshold_steps), 0.01)  # running mean, then an EMA
                self.threshold.lerp_(kept.min(), rate)
        return z

    def loss_terms(self, x, pre, z, recon):
        return {"fvu": fvu(x, recon), "auxk": self.auxk_loss(x, pre, recon)}


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - t); d/dt through a rectangle kernel of width eps (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, log_t, eps):
        t = log_t.exp()
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return pre * (pre > t)

    @staticmethod
    def backward(ctx, grad):
        pre, t = ctx.saved_tensors
        eps = ctx.eps
        near = ((pre - t).abs() < eps / 2).to(pre.dtype)
        grad_pre = grad * (pre > t)
        grad_t = (-(t / eps) * near * grad).sum(0)  # dz/dt = -pre * delta(pre - t), pre ~ t in the kernel
        return grad_pre, grad_t * t, None  # chain rule through t = exp(log_t)


class _Step(torch.autograd.Function):
    """H(pre - t) with the same straight-through gradient for t (the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, log_t, eps):
        t = log_t.exp()
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, t = ctx.saved_tensors
        near = ((pre - t).abs() < ctx.eps / 2).to(pre.dtype)
        grad_t = (-(1.0 / ctx.eps) * near * grad).sum(0)
        return torch.zeros_like(pre), grad_t * t, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Per-latent learned thresholds; squared error + sparsity_coef * L0, via straight-through estimators."""

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


@register("relu")
class ReLUSAE(SparseAutoencoder):
    """ReLU latents; squared error + sparsity_coef * L1 (decoder rows are unit norm, so no reweighting)."""

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def loss_terms(self, x, pre, z, recon):
        mse = (x - recon).pow(2).sum(-1).mean()
        return {"mse": mse, "l1": self.cfg.sparsity_coef * z.abs().sum(-1).mean()}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    return REGISTRY[cfg.architecture](cfg)
