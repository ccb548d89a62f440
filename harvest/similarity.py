"""The similarity probe: per-layer statistics and the L x L mean angular distance matrices.

Angular distance between layers i and j is the mean over tokens of arccos(cos(x_i, x_j)) / pi
(Ghilardi et al. 2025). Two distances, named for what they do (`grouping.distance`):

- "layer-centred" (the default, the reference's): cosines after subtracting each layer's mean.
  The reference's distance script (groups/distance.py in ghidav/group-sae) subtracts a running
  mean of each layer's activations (alpha = 0.05 per batch) before its cosines; here the mean is
  the exact mean over the probe tokens, the same quantity without the running mean's lag.
- "raw": cosines of the residuals as they are (a variant). On SmolLM2-135M a layer's mean has
  0.70-0.84 of its average norm (0.46 at layer 0), so raw cosines are dominated by that shared
  direction and raw distances come out smaller.

Both are always measured and stored. Centring needs the means first, so the probe makes two
passes over its tokens instead of holding every layer's activations in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ghsae.harvest.finite import ActivationGuard
from ghsae.hooks import capture_layers
from ghsae.lm import LoadedModel

DISTANCES = ("raw", "layer-centred")
ALIASES = {"centred": "layer-centred"}
"""Old names still read: runs made before the rename say "centred" in config.json and plan.json."""
NPZ_KEYS = {"raw": "raw", "layer-centred": "centred"}
"""similarity.npz's array for each distance; the key "centred" predates the rename and is kept so
every stored run opens unchanged."""


def canonical_distance(name: str) -> str:
    """The distance's current name (an alias resolved); raises ValueError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; expected one of {DISTANCES}")
    return name


def distance_matrix(arrays, name: str) -> np.ndarray:
    """The [L, L] matrix of distance `name` from similarity.npz (or anything indexed like it)."""
    return np.asarray(arrays[NPZ_KEYS[canonical_distance(name)]])


@dataclass
class LayerStats:
    """Per-layer statistics over non-special tokens (float64 accumulators)."""

    layers: list[int]
    count: int
    mean: np.ndarray  # [L, d]
    mean_norm: np.ndarray  # [L]  E||x||
    mean_sq_norm: np.ndarray  # [L]  E||x||^2


@dataclass
class SimilarityResult:
    layers: list[int]
    raw: np.ndarray  # [L, L] mean angular distance on raw residuals
    centred: np.ndarray  # [L, L] the same after subtracting each layer's mean ("layer-centred")
    stats: LayerStats
    tokens: int

    def __getitem__(self, key: str) -> np.ndarray:  # indexed like similarity.npz (NPZ_KEYS)
        return {"raw": self.raw, "centred": self.centred}[key]


BatchIter = Callable[[], Iterator[torch.Tensor]]
"""Yields input_ids batches [B, T]; called once per pass, must give the same batches each time."""


def probe_similarity(
    lm: LoadedModel,
    batches: BatchIter,
    layers: list[int],
    progress=None,
    storage_dtype: str | None = None,
    hookpoint: str = "resid_post",
) -> SimilarityResult:
    """The probe's statistics and distances of the layers' activations at `hookpoint`, the ones the
    shards store. Its activations are checked like a shard's (storage_dtype:
    the store's, so a float16 overflow stops the harvest here already): a distance of inf/NaN rows
    would be recorded as a plausible number (unit vectors of inf rows are 0: AMAD 0.0)."""
    guard = ActivationGuard(layers, lm.device)
    special = torch.tensor(lm.special_ids, dtype=torch.long, device=lm.device)
    n_layers, d = len(layers), lm.d_model
    sum_x = torch.zeros(n_layers, d, dtype=torch.float64, device=lm.device)
    sum_norm = torch.zeros(n_layers, dtype=torch.float64, device=lm.device)
    sum_sq = torch.zeros(n_layers, dtype=torch.float64, device=lm.device)
    dist_raw = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=lm.device)
    count = 0
    for stacked in _stacked_passes(lm, batches, layers, special, progress, hookpoint):
        x = stacked.float()
        for i in range(n_layers):
            guard.track(i, x[i])
        guard.check(f"the similarity probe (first {count + x.shape[1]:,} tokens)", storage_dtype, lm.dtype)
        sum_x += x.double().sum(dim=1)
        norms = x.norm(dim=-1).double()
        sum_norm += norms.sum(dim=1)
        sum_sq += (norms**2).sum(dim=1)
        dist_raw += _angular_distance_sums(x)
        count += x.shape[1]
    if count == 0:
        raise ValueError("the probe saw no non-special tokens")
    mean = sum_x / count
    dist_centred = torch.zeros_like(dist_raw)
    for stacked in _stacked_passes(lm, batches, layers, special, progress, hookpoint):
        dist_centred += _angular_distance_sums(stacked.float() - mean.float()[:, None, :])
    stats = LayerStats(
        layers=list(layers),
        count=count,
        mean=mean.cpu().numpy(),
        mean_norm=(sum_norm / count).cpu().numpy(),
        mean_sq_norm=(sum_sq / count).cpu().numpy(),
    )
    return SimilarityResult(
        layers=list(layers),
        raw=(dist_raw / count).cpu().numpy(),
        centred=(dist_centred / count).cpu().numpy(),
        stats=stats,
        tokens=count,
    )


def _stacked_passes(
    lm: LoadedModel, batches: BatchIter, layers: list[int], special: torch.Tensor, progress, hookpoint: str
):
    """Per batch, the listed layers' activations at non-special positions, stacked [L, n, d]."""
    index = {layer: i for i, layer in enumerate(layers)}
    for input_ids in batches():
        input_ids = input_ids.to(lm.device)
        keep = ~torch.isin(input_ids.reshape(-1), special)
        out = torch.empty(len(layers), int(keep.sum()), lm.d_model, dtype=lm.dtype, device=lm.device)

        def on_layer(layer: int, resid: torch.Tensor, out=out, keep=keep) -> None:
            out[index[layer]] = resid.reshape(-1, resid.shape[-1])[keep]

        capture_layers(lm.model, lm.blocks, input_ids, layers, on_layer, hookpoint)
        if progress is not None:
            progress.update(input_ids.numel())
        yield out


def _angular_distance_sums(x_LND: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of arccos(cos(x_i, x_j)) / pi for every layer pair, [L, L] float64."""
    unit = x_LND / x_LND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n_layers = unit.shape[0]
    sums = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=x_LND.device)
    for i in range(n_layers):
        cos = torch.einsum("nd,lnd->ln", unit[i], unit[i:])  # [L-i, n]
        # arccos is ill-conditioned near cos = 1 (neighbouring layers): take it in float64.
        ang = torch.arccos(cos.double().clamp(-1.0, 1.0)).sum(dim=1) / np.pi
        sums[i, i:] = ang
        sums[i:, i] = ang
    sums.fill_diagonal_(0.0)
    return sums
