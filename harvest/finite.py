"""The harvest's guard against activations no later stage can use.

Three kinds, each stopping the harvest before anything of them is stored or averaged (the probe's
batches and every shard's batches pass through a guard):

- non-finite values (inf/NaN) from the model: nothing downstream can normalise, train on or
  evaluate them, and one such row makes a layer's statistics infinite and its scale 0;
- rows whose norm is past NORM_LIMIT: the statistics, fit and report square norms in float32,
  so such a row's square overflows to inf whatever the storage dtype (an embedding scaled by
  1e37 stores in bfloat16 but gives mean_norm = inf and scale = 0);
- values past the storage dtype's range (float16's 65504; bfloat16 has float32's range).

The message names the layer and where (probe or shard), the largest finite row norm seen, and
the fix: bfloat16 storage for a float16 overflow, a float32 compute dtype when the model ran in
16 bits, otherwise that the model itself produces these activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ghsae.cache.dtypes import storage_dtype as dtype_named
from ghsae.errors import HarvestError

NORM_LIMIT = 1e16
"""Largest row norm a harvest accepts: 1e16 squared and added up over a million rows is 1e38, still
below float32's 3.4e38 (the statistics, fit and report compute squared norms in float32)."""


class ActivationGuard:
    """Per-layer peaks of the rows seen since the last check, kept on the rows' device and read once
    per check (one host sync per batch)."""

    def __init__(self, layers: Sequence[int], device: torch.device):
        n = len(layers)
        self.layers = tuple(layers)
        self.nonfinite = torch.zeros(n, dtype=torch.int64, device=device)  # rows holding inf/NaN
        self.peak_norm = torch.zeros(n, dtype=torch.float64, device=device)  # largest finite row norm
        self.peak_abs = torch.zeros(n, dtype=torch.float64, device=device)  # largest |value| of finite rows

    def track(self, i: int, rows: torch.Tensor) -> None:
        """Add rows [n, d] (as the model produced them) of the layer at position i."""
        if rows.shape[0] == 0:
            return
        # float64 norms: a row of finite float32 values has a finite float64 norm, so a
        # non-finite norm means an inf/NaN in the row, never an overflow of the norm itself.
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
        finite = torch.isfinite(norms)
        zero = norms.new_zeros(())
        self.nonfinite[i] += (~finite).sum()
        self.peak_norm[i] = torch.maximum(self.peak_norm[i], torch.where(finite, norms, zero).amax())
        peaks = rows.abs().amax(dim=1).double()
        self.peak_abs[i] = torch.maximum(self.peak_abs[i], torch.where(finite, peaks, zero).amax())

    def check(self, where: str, storage_dtype: str | None, compute_dtype: torch.dtype) -> None:
        """Raise HarvestError for the first layer whose rows are unusable; `where` names the probe
        or the shard, `storage_dtype` is None where nothing is stored (the probe checks anyway)."""
        peaks = torch.stack([self.nonfinite.double(), self.peak_norm, self.peak_abs]).tolist()  # one host sync
        nonfinite, peak_norm, peak_abs = [int(n) for n in peaks[0]], peaks[1], peaks[2]
        for i, layer in enumerate(self.layers):
            problem = _problem(nonfinite[i], peak_norm[i], peak_abs[i], storage_dtype, compute_dtype)
            if problem is not None:
                raise HarvestError(f"{where}, layer {layer}: {problem}")


def _problem(
    nonfinite: int, peak_norm: float, peak_abs: float, storage_dtype: str | None, compute_dtype: torch.dtype
) -> str | None:
    seen = f"the largest finite row norm seen there is {peak_norm:.4g}"
    if nonfinite:
        return (
            f"the model produced {nonfinite} rows holding inf/NaN ({seen}); ghsae never stores them. "
            + _model_fix(compute_dtype)
        )
    if peak_norm > NORM_LIMIT:
        return (
            f"an activation row has norm {peak_norm:.4g}, past {NORM_LIMIT:g}: its square overflows float32 (the "
            "dtype of the statistics, fit and report) whatever storage.dtype is, so no storage dtype can hold it. "
            + MODEL_ITSELF
        )
    stored = dtype_named(storage_dtype) if storage_dtype is not None else None
    if stored is not None and peak_abs > stored.max_finite:
        return (
            f"an activation of magnitude {peak_abs:.4g} does not fit {stored.name} (max {stored.max_finite:g}; {seen}); "
            'set storage.dtype = "bfloat16" in pipeline.toml (float32\'s range) and re-run `ghsae harvest` with '
            "--config pipeline.toml --overwrite"
        )
    return None


MODEL_ITSELF = (
    "The model itself produces these activations: check its weights and inputs (or harvest other layers: "
    "grouping.layers)"
)


def _model_fix(compute_dtype: torch.dtype) -> str:
    if compute_dtype in (torch.float16, torch.bfloat16):
        name = str(compute_dtype).removeprefix("torch.")
        return (
            f'The model ran in {name}, which overflows sooner: set model.dtype = "float32" in pipeline.toml and '
            "re-run `ghsae harvest` with --config pipeline.toml"
        )
    return MODEL_ITSELF + " (it ran in float32)"
