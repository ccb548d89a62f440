"""Each layer's distribution of token norms, as a histogram that shards add up exactly.

Language models put a few tokens (the first token after BOS, some delimiters) at residual norms
tens of times the median: the massive activations of Sun et al., "Massive Activations in Large
Language Models" (COLM 2024), which act as attention sinks. A squared-error metric summed over
tokens is dominated by them, so the harvest measures every layer's norm distribution and the
evaluation reports its figures both over all tokens and over typical ones.

A shard counts its stored rows' norms in fixed log-spaced bins (16 per octave: 4.4 % wide, from
2^-24 to 2^40), so shards add up in any order and a quantile is read to within a bin; the largest
norm is kept exactly beside it. A token is an outlier at a layer when its norm exceeds `factor`
times that layer's median norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BINS_PER_OCTAVE = 16
LOWEST_OCTAVE, HIGHEST_OCTAVE = -24, 40
N_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE
QUANTILES = {"median_norm": 0.5, "q99_norm": 0.99, "q999_norm": 0.999}
"""The quantiles recorded per layer in manifest/stats.json."""


def bin_of(norms: torch.Tensor) -> torch.Tensor:
    """The bin index of each norm (norms below 2^-24 or above 2^40 land in the end bins)."""
    octaves = torch.log2(norms.double().clamp_min(2.0**LOWEST_OCTAVE))
    index = torch.floor((octaves - LOWEST_OCTAVE) * BINS_PER_OCTAVE).long()
    return index.clamp_(0, N_BINS - 1)


def lower_edge(index: np.ndarray | int) -> np.ndarray:
    return 2.0 ** (LOWEST_OCTAVE + np.asarray(index, dtype=np.float64) / BINS_PER_OCTAVE)


@dataclass
class NormDistribution:
    """Per-layer histograms of token norms, [L, N_BINS] counts, and each layer's largest norm."""

    layers: list[int]
    hist: np.ndarray  # [L, N_BINS] int64
    max_norm: np.ndarray  # [L]

    def quantile(self, q: float) -> np.ndarray:
        """[L] the q-quantile of each layer's norms, interpolated geometrically inside its bin."""
        out = np.full(len(self.layers), np.nan)
        for i, counts in enumerate(self.hist):
            total = counts.sum()
            if total == 0:
                continue
            cum = np.cumsum(counts)
            b = int(np.searchsorted(cum, q * total, side="left"))
            before = cum[b - 1] if b else 0
            frac = (q * total - before) / max(counts[b], 1)
            out[i] = min(float(lower_edge(b + frac)), float(self.max_norm[i]))
        return out

    def median(self) -> np.ndarray:
        return self.quantile(0.5)

    def threshold(self, factor: float) -> np.ndarray:
        """[L] the norm above which a token is an outlier: factor x the layer's median."""
        return factor * self.median()

    def count_above(self, threshold: np.ndarray) -> np.ndarray:
        """[L] how many norms exceed each layer's threshold (the bin holding it counted by the share
        of its width above the threshold, taking norms as log-uniform inside a bin)."""
        out = np.zeros(len(self.layers))
        for i, counts in enumerate(self.hist):
            if not np.isfinite(threshold[i]):
                continue
            pos = (np.log2(threshold[i]) - LOWEST_OCTAVE) * BINS_PER_OCTAVE
            b = int(np.clip(np.floor(pos), 0, N_BINS - 1))
            out[i] = counts[b + 1 :].sum() + counts[b] * (1.0 - min(max(pos - b, 0.0), 1.0))
        return np.round(out)

    def summary(self, factor: float) -> dict[str, np.ndarray]:
        """What stats.json records per layer: the quantiles, the largest norm, the outliers at `factor`."""
        out = {name: self.quantile(q) for name, q in QUANTILES.items()}
        out["max_norm"] = self.max_norm.astype(np.float64)
        out["outliers"] = self.count_above(self.threshold(factor))
        return out


class NormCounter:
    """Adds up one shard's row norms per layer position, on the harvest's device."""

    def __init__(self, n_layers: int, device: torch.device):
        self.hist = torch.zeros(n_layers, N_BINS, dtype=torch.int64, device=device)
        self.max_norm = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def add(self, i: int, norms: torch.Tensor) -> None:
        self.hist[i] += torch.bincount(bin_of(norms), minlength=N_BINS)
        self.max_norm[i] = torch.maximum(self.max_norm[i], norms.max().double())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.hist.cpu().numpy(), self.max_norm.cpu().numpy()


def add_up(layers: list[int], parts: list[tuple[np.ndarray, np.ndarray]]) -> NormDistribution:
    """The distribution over shards, from each shard's (hist [L, B], max_norm [L])."""
    hist = np.zeros((len(layers), N_BINS), dtype=np.int64)
    max_norm = np.zeros(len(layers))
    for part_hist, part_max in parts:
        hist += part_hist
        max_norm = np.maximum(max_norm, part_max)
    return NormDistribution(list(layers), hist, max_norm)
