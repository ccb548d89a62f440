"""Contiguous layer groups for every number of groups G, by an exact dynamic program.

AMAD(P) = mean over groups of the largest pairwise angular distance inside the group (its
diameter; Ghilardi et al. 2025). The reference clusters distance-matrix rows agglomeratively.
Here a dynamic program over contiguous segmentations finds, for each G, the partition that is
optimal for an objective:

- "amad": least AMAD itself. Exact, but degenerate on real models: AMAD averages over groups,
  so a singleton group counts as a free 0 and the optimum is one huge group plus singletons
  (SmolLM2-135M, G=3: layers 0-27 | 28 | 29).
- "layer-mean" (default): least mean over *layers* of their group's diameter,
  sum_g |g| * diam(g) / L. Each layer is charged the spread of the group its SAE must serve,
  which is what costs reconstruction quality; groups come out balanced, and their AMAD is lower
  than complete linkage's at every G we measured.
- "max": least largest diameter (minimax): every group's layers are within that distance.

G is then the smallest G whose partition has AMAD below the threshold, the paper's criterion.
All objectives share best[g][j] = agg(best[g-1][i], cost(i, j-1)) over split points i: O(L^3).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ghsae.errors import ConfigError

Partition = list[list[int]]  # each group a list of consecutive positions into the layer list
OBJECTIVES = ("layer-mean", "amad", "max")


@dataclass
class PartitionSolution:
    objective: str
    value: np.ndarray  # [L] optimal objective value for G = 1..L (index G-1)
    amad: np.ndarray  # [L] AMAD of each optimal partition
    partitions: list[Partition]  # optimal partition for G = 1..L (index G-1)


def segment_diameters(dist: np.ndarray) -> np.ndarray:
    """diam[i, j] = max distance between positions i..j inclusive (0 when i == j)."""
    n = dist.shape[0]
    diam = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            diam[i, j] = max(diam[i, j - 1], dist[i : j + 1, j].max())
    return diam


def amad(dist: np.ndarray, partition: Partition) -> float:
    return float(np.mean([dist[np.ix_(g, g)].max() for g in partition]))


def objective_value(dist: np.ndarray, partition: Partition, objective: str) -> float:
    diams = np.array([dist[np.ix_(g, g)].max() for g in partition])
    if objective == "amad":
        return float(diams.mean())
    if objective == "max":
        return float(diams.max())
    sizes = np.array([len(g) for g in partition])
    return float((sizes * diams).sum() / sizes.sum())


def solve_partitions(dist: np.ndarray, objective: str = "layer-mean") -> PartitionSolution:
    dist = np.asarray(dist, dtype=np.float64)
    n = dist.shape[0]
    if dist.shape != (n, n) or n == 0:
        raise ValueError(f"distance matrix must be square and non-empty, got {dist.shape}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    diam = segment_diameters(dist)
    sizes = np.arange(n)[None, :] - np.arange(n)[:, None] + 1  # sizes[i, j] = j - i + 1
    cost = diam * sizes if objective == "layer-mean" else diam
    combine = np.maximum if objective == "max" else np.add
    # best[g, j]: optimal aggregate splitting positions 0..j-1 into g groups
    best = np.full((n + 1, n + 1), np.inf)
    cut = np.zeros((n + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, n + 1):
        for j in range(g, n + 1):
            starts = np.arange(g - 1, j)
            costs = combine(best[g - 1, starts], cost[starts, j - 1])
            k = int(np.argmin(costs))  # ties go to the earliest start: deterministic
            best[g, j] = costs[k]
            cut[g, j] = starts[k]
    partitions = []
    for g in range(1, n + 1):
        bounds, j = [], n
        for gg in range(g, 0, -1):
            i = int(cut[gg, j])
            bounds.append(list(range(i, j)))
            j = i
        partitions.append(bounds[::-1])
    value = np.array([objective_value(dist, p, objective) for p in partitions])
    amads = np.array([amad(dist, p) for p in partitions])
    return PartitionSolution(objective=objective, value=value, amad=amads, partitions=partitions)


def brute_force(dist: np.ndarray, n_groups: int, objective: str) -> tuple[float, Partition]:
    """Every contiguous partition into n_groups, for checking solve_partitions on small L."""
    n = dist.shape[0]
    best: tuple[float, Partition] = (float("inf"), [])
    for cuts in itertools.combinations(range(1, n), n_groups - 1):
        edges = (0, *cuts, n)
        part = [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]
        value = objective_value(dist, part, objective)
        if value < best[0] - 1e-12:
            best = (value, part)
    return best


def complete_linkage(dist: np.ndarray, n_groups: int) -> Partition:
    """Unconstrained complete-linkage agglomerative clustering (the reference's method), for comparison.

    Groups need not be contiguous; returned sorted by their first layer.
    """
    clusters: list[list[int]] = [[i] for i in range(dist.shape[0])]
    while len(clusters) > n_groups:
        best = (float("inf"), 0, 1)
        for a, b in itertools.combinations(range(len(clusters)), 2):
            link = dist[np.ix_(clusters[a], clusters[b])].max()
            if link < best[0]:
                best = (link, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


def choose_groups(
    solution: PartitionSolution, spec: str | int | list[list[int]], threshold: float, layers: list[int]
) -> list[list[int]]:
    """Resolve grouping.groups against the AMAD solution; returns groups of model layer indices."""
    n = len(layers)
    if spec == "per-layer":
        positions: Partition = [[i] for i in range(n)]
    elif spec == "auto":
        below = np.nonzero(solution.amad < threshold)[0]
        positions = solution.partitions[int(below[0])]  # AMAD(L) = 0, so below is never empty
    elif isinstance(spec, int):
        if spec > n:
            raise ConfigError(f"grouping.groups is {spec} but only {n} layers are harvested; expected at most {n}")
        positions = solution.partitions[spec - 1]
    elif isinstance(spec, list):
        return _explicit_groups(spec, layers)
    else:
        raise ConfigError(f"grouping.groups is {spec!r}; expected auto, per-layer, a number or [[first, last], ...]")
    return [[layers[i] for i in g] for g in positions]


def _explicit_groups(ranges: list[list[int]], layers: list[int]) -> list[list[int]]:
    groups = [list(range(a, b + 1)) for a, b in ranges]
    flat = [layer for g in groups for layer in g]
    if flat != layers:
        raise ConfigError(
            f"grouping.groups {ranges} must cover the harvested layers {layers[0]}..{layers[-1]} "
            "in order, each exactly once, with no gaps"
        )
    return groups
