"""Per-layer normalisation statistics: the shard records' sums added up over shards.

Each shard's record holds, per layer, the count and the sums of ||x|| and ||x||^2 of its stored
rows, and manifest/shard-NNNNN.npz their sum of x. Adding those up gives each layer's mean norm
(whose sqrt(d) / E||x|| is the Group-SAE per-layer factor) and its mean vector, exactly, in any
order of shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghsae.cache.norms import NormDistribution
from ghsae.cache.norms import add_up as add_up_norms
from ghsae.errors import StoreError
from ghsae.records import LayerStats, NormSummary, RunStats, ShardRecord

OUTLIER_FACTOR = 10.0
"""stats.json counts each layer's outliers at this multiple of its median norm (the report and fit
use their own `outlier_factor` settings, read off the same histograms)."""


@dataclass
class NormStats:
    """Per-layer statistics over every stored row of the shards they were added up from."""

    layers: list[int]
    count: np.ndarray  # [L] rows per layer
    mean_norm: np.ndarray  # [L] E||x||
    mean_sq_norm: np.ndarray  # [L] E||x||^2
    mean: np.ndarray  # [L, d]
    norms: NormDistribution | None = None
    """Each layer's token-norm distribution; None for shards written before it was recorded."""

    def scale(self, d_model: int) -> np.ndarray:
        """Per-layer factor that makes E||x|| = sqrt(d) (the Group-SAE per-layer normalisation)."""
        return np.sqrt(d_model) / np.maximum(self.mean_norm, 1e-12)

    def for_layers(self, layers: Sequence[int], d_model: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale [len(layers)], mean [len(layers), d]) for a group's layers, in that order."""
        pos = [self.layers.index(layer) for layer in layers]
        return self.scale(d_model)[pos], self.mean[pos]

    def record(self, config_hash: str, d_model: int) -> RunStats:
        """What manifest/stats.json holds (with the norm distribution's summary where it was counted)."""
        scale = self.scale(d_model)
        summary = self.norms.summary(OUTLIER_FACTOR) if self.norms is not None else None
        return RunStats(
            config_hash=config_hash,
            d_model=d_model,
            target_norm=float(np.sqrt(d_model)),
            layers={
                layer: LayerStats(
                    int(self.count[i]),
                    float(self.mean_norm[i]),
                    float(self.mean_sq_norm[i]),
                    float(scale[i]),
                    norms=None if summary is None else NormSummary(**{k: float(v[i]) for k, v in summary.items()}),
                )
                for i, layer in enumerate(self.layers)
            },
            outlier_factor=None if summary is None else OUTLIER_FACTOR,
        )


def add_up(layers: Sequence[int], records: Sequence[ShardRecord], sums_files: Sequence[Path]) -> NormStats:
    """NormStats of `layers` over the shards whose records and sums files are given (in step)."""
    L = len(layers)
    count, sum_norm, sum_sq = np.zeros(L), np.zeros(L), np.zeros(L)
    sum_x = None
    norm_parts: list[tuple[np.ndarray, np.ndarray]] | None = []
    for record, sums in zip(records, sums_files, strict=True):
        for i, layer in enumerate(layers):
            st = record.layer_stats[layer]
            count[i] += st.count
            sum_norm[i] += st.sum_norm
            sum_sq[i] += st.sum_sq_norm
        if not sums.is_file():
            raise StoreError(
                f"{sums} is missing (shard {record.shard}'s activation sums); re-run `ghsae harvest "
                f"--run-dir {sums.parent.parent}` to rewrite shard {record.shard}"
            )
        with np.load(sums) as z:
            sum_x = z["sum_x"] if sum_x is None else sum_x + z["sum_x"]
            if norm_parts is not None and "norm_hist" in z.files:
                norm_parts.append((z["norm_hist"], z["max_norm"]))
            else:
                norm_parts = None  # a shard from before norms were counted: no distribution
    if not (np.isfinite(sum_norm).all() and np.isfinite(sum_sq).all()):
        layer = layers[int(np.flatnonzero(~np.isfinite(sum_norm + sum_sq))[0])]
        raise StoreError(
            f"layer {layer}'s norm sums in the shard records are not finite (its rows' norms overflowed); no SAE "
            f"can be normalised by them. Re-run `ghsae harvest --run-dir {sums_files[0].parent.parent}`: it "
            "rewrites those shards and stops with the cause and its fix"
        )
    denom = np.maximum(count, 1)
    mean = sum_x / denom[:, None] if sum_x is not None else np.zeros((L, 0))
    norms = add_up_norms(list(layers), norm_parts) if norm_parts else None
    return NormStats(list(layers), count, sum_norm / denom, sum_sq / denom, mean, norms)
