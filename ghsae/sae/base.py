"""Sparse autoencoders: the config, the base class and the registry of architectures by name.

Every SAE works in *normalised* space inside: a group SAE serves several layers, each scaled by its
own factor so that E||x|| = sqrt(d) (Ghilardi et al. 2025), optionally centred. The SAE carries
those per-layer factors as buffers, and its public methods speak each layer's raw units:
`encode(x, layer)` takes raw residuals, `decode(z, layer)` and `reconstruct(x, layer)` return
them, so decode(encode(x, l), l) is in the units of x. `decode_normalised(z)` is the one method in
normalised space (training feeds already-normalised batches to `forward`: the loader normalises
on the device).

Shapes: x [n, d], latents [n, m], W_enc [d, m], W_dec [m, d].

Each architecture is one file (topk.py, jumprelu.py, relu.py) holding its class, registered by
name, with its own fit options (a dataclass: the [fit.<name>] table), its SAELens mapping and
whether sparsify holds it. Adding one is a new file that subclasses SparseAutoencoder (below).

Training TopK and BatchTopK never builds the [n, m] latents: `forward` keeps them as
(values, indices) (sparse.py) and decodes by gathering k decoder rows per token, so only the
encoder's product is dense. `encode` and `decode` keep their dense signatures for callers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ghsae.errors import ConfigError
from ghsae.layers import layer_lookup_table
from ghsae.sae.latents import Latents
from ghsae.sae.sparse import SparseCodes

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
    options: dict = field(default_factory=dict)
    """The options of an architecture that keeps them in a table of its own (its Options' fields);
    the built-in architectures' options are the flat fields above, as their SAEs always stored them."""

    def __post_init__(self) -> None:
        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(REGISTRY)}")
        if self.k < 1 or (REGISTRY[self.architecture].keeps_k and self.k > self.n_latents):
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
        out = dataclasses.asdict(self)
        if not out["options"]:
            del out["options"]  # the built-in architectures' records stay as they always were
        return out

    def typed_options(self) -> Any:
        """This SAE's options as its architecture's Options dataclass."""
        cls = REGISTRY[self.architecture]
        if cls.flat_options:  # the built-in ones keep them in the flat fields above
            return cls.Options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls.Options)})
        return cls.Options(**self.options)


@dataclass(frozen=True)
class NoOptions:
    """An architecture without options of its own."""


@dataclass(frozen=True)
class RawLayer:
    """One layer of a group SAE on raw activations: pre = (x - b_dec) W_enc + b_enc, recon = z W_dec + b_dec."""

    W_enc: torch.Tensor  # [d, m]
    b_enc: torch.Tensor  # [m]
    W_dec: torch.Tensor  # [m, d]
    b_dec: torch.Tensor  # [d]
    latent_scale: float  # these latents are ghsae's times this (1, or 1/s with unit_decoder)

    def state(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}


@dataclass(frozen=True)
class SAELensLayer:
    """What SAELens needs of one layer beyond the raw weights: its architecture name, extra tensors
    (a threshold) and the architecture's own cfg.json fields."""

    architecture: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)


# Without a graph (evaluation), sparse latents decode by summing their active decoder rows: for TopK
# at k = m / 72 that is a small fraction of the dense product's work. Below these sizes, or denser
# than 1 / SPARSE_DECODE_RATIO, the dense product is as fast.
SPARSE_DECODE_MIN = 1 << 16
SPARSE_DECODE_RATIO = 8


def _gather_decode(z: torch.Tensor, active: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """z @ W_dec from z's nonzero entries only: each row's active decoder rows, weighted and summed."""
    rows, cols = active.nonzero(as_tuple=True)
    offsets = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    counts = torch.bincount(rows, minlength=z.shape[0])
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    return torch.nn.functional.embedding_bag(
        cols, W_dec.to(z.dtype), offsets, mode="sum", per_sample_weights=z[rows, cols]
    )


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
    """The base of every architecture. A subclass sets `activate` and `loss_terms` (or `forward`),
    and where it differs from these defaults: Options, keeps_k, flat_options, saelens,
    sparsify_activation. Registering it by name (@register) is all the rest of ghsae needs."""

    architecture: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    """The architecture's own fit options, read from [fit.<name>]: a dataclass, a docstring a field."""
    keeps_k: ClassVar[bool] = False
    """Keeps k latents a token (fit refuses a k above the dictionary size)."""
    flat_options: ClassVar[bool] = False
    """Its options are stored flat in [fit] and in SAEConfig's own fields (the built-in architectures,
    as their runs always stored them); otherwise under [fit.<name>] and SAEConfig.options."""
    sparsify_activation: ClassVar[str | None] = None
    """sparsify's SparseCoder activation of this architecture; None: sparsify cannot hold it."""
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

    # --- what an architecture declares ----------------------------------------------------

    @classmethod
    def config_fields(cls, fit: Any) -> dict[str, Any]:
        """SAEConfig's keyword arguments for this architecture's options, from a FitConfig."""
        if cls.flat_options:  # every built-in records the same four, whichever it is (stored as before)
            return {
                "k": fit.k,
                "aux_coef": fit.aux_coef,
                "auxk_normalisation": fit.auxk_normalisation,
                "sparsity_coef": fit.sparsity_coef,
            }
        return {"options": dataclasses.asdict(cls.Options(**fit.options.get(cls.architecture, {})))}

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        """How SAELens holds one layer of this SAE (raw: the layer's weights in raw units)."""
        raise ConfigError(f"SAE architecture {self.architecture!r} has no SAELens export; it defines none")

    def raw_layer(self, layer: int, unit_decoder: bool = False) -> RawLayer:
        """Fold `layer`'s normalisation into the weights (train/export.py), in float64, stored as float32."""
        pos = self.cfg.layers.index(layer)
        s = float(self.norm_scale[pos])
        mu = self.norm_mean[pos].detach().double()
        w_enc, w_dec = self.W_enc.detach().double(), self.W_dec.detach().double()
        b_enc, b_dec = self.b_enc.detach().double(), self.b_dec.detach().double()
        c = 1 / s if unit_decoder else 1.0  # latents' factor; decoder rows get 1 / (s c)
        return RawLayer(
            W_enc=(w_enc * (s * c)).float(),
            b_enc=(b_enc * c).float(),
            W_dec=(w_dec / (s * c)).float(),
            b_dec=(mu + b_dec / s).float(),
            latent_scale=c,
        )

    # --- the public interface ------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Latents [n, m] of raw residuals x [n, d] taken at `layer` (an int or one id per row)."""
        return self.activate(self.pre_acts(self.normalise(x, layer)))

    def decode(self, z: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Residuals [n, d] in `layer`'s raw units from latents z [n, m]: decode(encode(x, l), l) ~ x."""
        return self.denormalise(self.decode_normalised(z), layer)

    def encode_latents(self, x: torch.Tensor, layer: int | torch.Tensor) -> Latents:
        """encode(), in whichever form is cheapest to read (latents.py): dense here; TopK keeps its
        (values, indices). The evaluation's path: no [n, m] matrix where the architecture has none."""
        return Latents.from_dense(self.encode(x, layer))

    def decode_latents(self, latents: Latents, layer: int | torch.Tensor) -> torch.Tensor:
        """decode() of encode_latents()'s latents: residuals [n, d] in `layer`'s raw units."""
        if latents.dense_z is not None:
            return self.decode(latents.dense_z, layer)
        return self.denormalise(latents.decode_rows(self.W_dec) + self.b_dec, layer)

    def reconstruct(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw residuals, in the layer's raw units."""
        return self.decode(self.encode(x, layer), layer)

    def decode_normalised(self, z: torch.Tensor) -> torch.Tensor:
        """z W_dec + b_dec: the reconstruction in the SAE's normalised space (what training compares with
        the normalised batch). `decode(z, layer)` is the same in a layer's raw units."""
        if not torch.is_grad_enabled() and z.dim() == 2 and z.shape[0] * z.shape[1] >= SPARSE_DECODE_MIN:
            active = z != 0
            if int(active.sum()) * SPARSE_DECODE_RATIO < z.numel():
                return _gather_decode(z, active, self.W_dec) + self.b_dec
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Training step on a normalised batch: reconstruction, latents and every loss term."""
        pre = self.pre_acts(x)
        z = self.activate(pre)
        recon = self.decode_normalised(z)
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
