"""Sparse autoencoders: one base class, architectures registered by name.

Every SAE works in *normalised* space: a group SAE serves several layers, each scaled by its own
factor so that E||x|| = sqrt(d) (Ghilardi et al. 2025), optionally centred. The SAE carries those
per-layer factors as buffers, so `encode(x, layer)` and `reconstruct(x, layer)` take raw
residuals and `reconstruct` returns the layer's raw units. Training feeds already-normalised
batches to `forward` (the loader normalises on the device).

Shapes: x [n, d], latents [n, m], W_enc [d, m], W_dec [m, d].

Training TopK and BatchTopK never builds the [n, m] latents: `forward` keeps them as
(values, indices) (train/sparse.py) and decodes by gathering k decoder rows per token, so only the
encoder's product is dense. `encode` and `decode` keep their dense signatures for callers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ghsae.cache.loader import layer_lookup_table
from ghsae.train.sparse import SparseCodes, decode_active, encode_active

AUXK_NORMALISATIONS = ("total-variance", "error-variance")
DEAD_TOKENS_CAP = 10_000_000  # the reference's dead window (sparsify's dead_feature_threshold)
DEAD_FRACTION = 0.1  # auto window: this share of the SAE's training tokens, capped at the reference's


def dead_window(dead_tokens: int, total_tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead: `dead_tokens`, or (0) the auto window.

    Auto is min(10M, total_tokens / 10): the reference's 10M assumes runs of ~1B tokens, and at the
    embedded default (~97K tokens an SAE) it would never be reached. A tenth of the run leaves nine
    tenths for AuxK to revive what it finds, and on the default run (~9.7K tokens, ~19 steps of 512)
    it sits next to the report's 8,192 held-out tokens a layer, so "dead in training" (no firing in
    the last window) and "dead in the report" (no firing on the held-out tokens) test about the
    same firing-rate floor, roughly 1 in 10^4 tokens.
    """
    if dead_tokens:
        return dead_tokens
    return max(1, min(DEAD_TOKENS_CAP, int(total_tokens * DEAD_FRACTION)))


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
    auxk_normalisation: str = "total-variance"
    """total-variance (the Group-SAE reference / sparsify: squared error over the total variance of x,
    times min(n_dead / k_aux, 1)) or error-variance (OpenAI: over the variance of the residual error)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many training tokens without firing (fit resolves its auto value)."""
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
        if self.auxk_normalisation not in AUXK_NORMALISATIONS:
            raise ValueError(
                f"auxk_normalisation is {self.auxk_normalisation!r}; expected one of {', '.join(AUXK_NORMALISATIONS)}"
            )
        if self.dead_tokens < 1:
            raise ValueError(f"dead_tokens is {self.dead_tokens}; expected a positive token count")

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or self.d_model // 2, self.n_latents)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SAEOutput:
    recon: torch.Tensor  # [n, d] in normalised space
    losses: dict[str, torch.Tensor]  # each term, already weighted
    loss: torch.Tensor  # their sum, what is minimised
    fvu: torch.Tensor  # fraction of variance unexplained on this batch
    codes: SparseCodes | None = None  # active latents (TopK family)
    dense: torch.Tensor | None = None  # [n, m] latents (architectures that compute them densely)

    @property
    def latents(self) -> torch.Tensor:
        """[n, m] latents; built on request for the sparse architectures."""
        if self.dense is not None:
            return self.dense
        assert self.codes is not None
        return self.codes.to_dense()

    def fired(self) -> torch.Tensor:
        """[m] bool: latents active on some row of this batch."""
        if self.codes is not None:
            return self.codes.fired()
        assert self.dense is not None
        return (self.dense.detach() > 0).any(dim=0)

    def l0(self) -> torch.Tensor:
        """Mean active latents per row (a device scalar)."""
        if self.codes is not None:
            return self.codes.l0()
        assert self.dense is not None
        return (self.dense.detach() > 0).sum(dim=-1).float().mean()


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """Summed squared deviation of x from its batch mean (the FVU's and AuxK's denominator)."""
    return (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the summed squared deviation from the batch mean."""
    return (x - recon).pow(2).sum() / total_variance(x)


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
        return SAEOutput(recon, losses, total, fvu(x, recon.detach()), dense=z)

    def loss_terms(self, x, pre, z, recon) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- training-time housekeeping ------------------------------------------------------

    # Steps between reads of the dead set to the host (AuxK needs its size to pick k_aux). 1 (the
    # default, and what the trainer uses on CPU, where a read costs nothing) is exact; on CUDA the
    # trainer reads it every few steps so that a step never waits for the device: a latent that
    # fires leaves AuxK at once (the device mask), one that dies joins at the next read.
    dead_refresh: int = 1
    _dead_ids: torch.Tensor | None = None  # the dead set as last read (None: read at next use)
    _dead_age: int = 0  # steps since that read

    def _load_from_state_dict(self, *args, **kwargs):
        self._dead_ids = None  # tokens_since_fired is about to change
        super()._load_from_state_dict(*args, **kwargs)

    def update_dead(self, out: SAEOutput, n_tokens: int | None = None) -> None:
        """Count the batch's tokens against every latent that did not fire in it (no host sync)."""
        fired = out.fired()
        n = out.recon.shape[0] if n_tokens is None else n_tokens
        self.tokens_since_fired.add_(n).masked_fill_(fired, 0)
        self._dead_age += 1
        if self._dead_age >= self.dead_refresh:
            self._dead_ids = None
            self._dead_age = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        """[m] bool: latents that have not fired in the last cfg.dead_tokens training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def dead_ids(self) -> torch.Tensor:
        """Ids of the dead latents as last read to the host (see dead_refresh)."""
        ids = self._dead_ids
        if self.dead_refresh <= 1 or ids is None or ids.device != self.tokens_since_fired.device:
            ids = self.dead_mask.nonzero().flatten()
            self._dead_ids = ids
        return ids

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each unit-norm decoder row (it would only change the norm)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec


class TopKFamily(SparseAutoencoder):
    """TopK-style SAEs, trained sparsely: FVU + AuxK over the dead latents (train/sparse.py)."""

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

    def select(self, pre):
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        codes = SparseCodes.from_topk(vals, idx, self.cfg.n_latents)
        return codes.values, codes

    def loss_terms(self, x, pre, z, recon):  # the dense path (eval mode): no AuxK outside training
        return {"fvu": fvu(x, recon), "auxk": pre.new_zeros(())}


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
