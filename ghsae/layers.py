"""Layer ids and groups of layers: the lookup table from a layer id to its place in a group, and
the labels groups are shown with."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_lookup_table(layers: Sequence[int]) -> torch.Tensor:
    """lookup[layer] = position of `layer` in `layers` (-1 for layers not listed)."""
    lookup = torch.full((max(layers) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(list(layers))] = torch.arange(len(layers))
    return lookup


def span(layers: Sequence[int], dash: str = "-") -> str:
    """"3-7" for a group of several layers, "3" for one (only the ends are shown)."""
    return f"{layers[0]}{dash}{layers[-1]}" if len(layers) > 1 else str(layers[0])


def consecutive(layers: Sequence[int]) -> bool:
    """The layers are a run of consecutive layer ids, in order (what `span` can show by its ends)."""
    return list(layers) == list(range(layers[0], layers[0] + len(layers)))


def spans(groups: Sequence[Sequence[int]], dash: str = "–") -> str:
    """Groups as ranges ("0–9, 10–18"); a group that is not a run of consecutive layers is listed in full."""
    return ", ".join(span(g, dash) if consecutive(g) else str(list(g)) for g in groups)
