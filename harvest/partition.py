"""Layer groups for every number of groups G: the reference's clustering, agglomerative clustering or an exact DP.

AMAD(P) = mean over groups of the largest pairwise angular distance inside the group (its
diameter; Ghilardi et al. 2025). G is the smallest G whose partition has AMAD below the
threshold (the paper's criterion), applied to the chosen method's own partitions. The reference
leaves the last layer out (its notebook clusters dist[:-1, :-1]): with grouping.last_layer = own
the methods see layers 0..L-2 only and layer L-1 gets an SAE of its own (`solve_grouping`,
`choose_groups`). Three methods (`grouping.method`):

- "reference" (default): what the reference code runs, sklearn's AgglomerativeClustering(linkage="complete")
  fit on the *rows* of the distance matrix as feature vectors (Euclidean distance between rows, not
  the angular distances themselves), with the matrix as the reference stores it: lower-triangular
  (groups/distance.py fills dist[i, j] for j < i only). Groups need not be contiguous; ghsae trains
  one SAE per run of consecutive layers, so a chosen partition that is not contiguous is refused.
- "agglomerative": complete-linkage agglomerative clustering of the angular-distance matrix itself,
  where only adjacent clusters may merge, so every group is a run of consecutive layers. Merging
  the pair whose largest cross distance is smallest is, for contiguous clusters, merging the pair
  whose union has the smallest diameter, the quantity AMAD averages. `complete_linkage` below is
  the same clustering without the adjacency constraint, kept for comparison.
- "dp": a dynamic program over contiguous segmentations that is exact for a named objective:
  - "layer-mean": least mean over *layers* of their group's diameter, sum_g |g| diam(g) / L. Each
    layer is charged the spread of the group its SAE must serve; groups come out balanced.
  - "amad": least AMAD itself. Degenerate on real models: AMAD averages over groups, so a
    singleton counts as a free 0 and the optimum is one huge group plus singletons.
  - "max": least largest diameter (minimax).
  All share best[g][j] = agg(best[g-1][i], cost(i, j-1)) over split points i: O(L^3).

Which method's partitions give the better SAEs at equal G and tokens is measured, not assumed
(docs/decisions.md#grouping).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ghsae.errors import ConfigError
from ghsae.layers import consecutive

Partition = list[list[int]]  # each group a list of positions into the layer list, ascending
METHODS = ("agglomerative", "dp", "reference")
OBJECTIVES = ("layer-mean", "amad", "max")
LINKAGE = "complete-linkage"  # the agglomerative method's criterion, named like an objective in records
ROW_LINKAGE = "complete-linkage-rows"  # the reference method's: complete linkage of the rows, Euclidean
LAST_LAYER = ("own", "grouped")


@dataclass(frozen=True)
class PartitionSolution:
    """A method's partition for every G = 1..L, with each partition's AMAD."""

    method: str
    objective: str  # the DP's objective, LINKAGE (agglomerative) or ROW_LINKAGE (reference)
    value: np.ndarray  # [L] the criterion at each G: DP objective, or the height of the merge that left G groups
    amad: np.ndarray  # [L] AMAD of each partition
    partitions: list[Partition]  # partition for G = 1..L (index G-1)

    def auto_groups(self, threshold: float) -> int:
        """The smallest G whose partition's AMAD is below threshold (AMAD(L) = 0, so one exists)."""
        return int(np.nonzero(self.amad < threshold)[0][0]) + 1


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


def solve(dist: np.ndarray, method: str, objective: str = "layer-mean") -> PartitionSolution:
    """Every G's partition by `method` (`objective` is used by the DP only)."""
    if method == "agglomerative":
        return agglomerative_partitions(dist)
    if method == "dp":
        return solve_partitions(dist, objective)
    if method == "reference":
        return reference_partitions(dist)
    raise ValueError(f"unknown grouping method {method!r}; expected one of {METHODS}")


def _check_square(dist: np.ndarray) -> np.ndarray:
    dist = np.asarray(dist, dtype=np.float64)
    n = dist.shape[0]
    if dist.ndim != 2 or dist.shape != (n, n) or n == 0:
        raise ValueError(f"distance matrix must be square and non-empty, got {dist.shape}")
    return dist


def agglomerative_partitions(dist: np.ndarray) -> PartitionSolution:
    """Complete linkage restricted to adjacent clusters; one merge per G from L down to 1.

    link[a] is the complete linkage (largest cross distance) between cluster a and cluster a+1;
    after a merge the new cluster's links follow Lance-Williams for complete linkage,
    d(A u B, C) = max(d(A, C), d(B, C)), so no distance is recomputed from the matrix.
    """
    dist = _check_square(dist)
    n = dist.shape[0]
    clusters: list[list[int]] = [[i] for i in range(n)]
    # cross[a][b]: complete linkage between clusters a and b (kept for every pair, as merges need
    # the merged cluster's linkage to its new neighbours)
    cross = dist.copy()
    partitions: list[Partition] = [[] for _ in range(n)]
    heights = np.zeros(n)
    partitions[n - 1] = [list(c) for c in clusters]
    while len(clusters) > 1:
        links = [cross[a, a + 1] for a in range(len(clusters) - 1)]
        a = int(np.argmin(links))  # ties go to the leftmost pair: deterministic
        merged = np.maximum(cross[a], cross[a + 1])
        cross[a], cross[:, a] = merged, merged
        cross[a, a] = 0.0
        cross = np.delete(np.delete(cross, a + 1, axis=0), a + 1, axis=1)
        clusters[a] = clusters[a] + clusters[a + 1]
        del clusters[a + 1]
        g = len(clusters)
        partitions[g - 1] = [list(c) for c in clusters]
        heights[g - 1] = links[a]
    amads = np.array([amad(dist, p) for p in partitions])
    return PartitionSolution(
        method="agglomerative", objective=LINKAGE, value=heights, amad=amads, partitions=partitions
    )


def reference_partitions(dist: np.ndarray) -> PartitionSolution:
    """The reference's clustering for every G: sklearn's complete linkage on the rows of the
    lower-triangular distance matrix (Euclidean between rows); groups sorted by their first layer.

    value[G-1] is the Euclidean height of the merge that left G clusters (0 at G = L), in the
    rows' units, not an angular distance.
    """
    from sklearn.cluster import AgglomerativeClustering  # imported here: only this method needs it

    rows = np.tril(_check_square(dist))
    bad = np.argwhere(~np.isfinite(rows))
    if bad.size:  # sklearn would stop with its own ValueError, naming no layer
        i, j = (int(v) for v in bad[0])
        raise ConfigError(
            f"the distance between layer positions {i} and {j} is {rows[i, j]} (not finite), so grouping.method = "
            "reference cannot cluster; the probe's activations hold inf/NaN there: compute in float32 "
            '(model.dtype = "float32") or check the model'
        )
    n = rows.shape[0]
    if n == 1:  # sklearn needs two samples; one layer is one group
        return PartitionSolution("reference", ROW_LINKAGE, np.zeros(1), np.zeros(1), [[[0]]])
    partitions = [_clusters(AgglomerativeClustering(n_clusters=g, linkage="complete").fit_predict(rows)) for g in range(1, n + 1)]
    tree = AgglomerativeClustering(n_clusters=1, linkage="complete", compute_distances=True).fit(rows)
    heights = np.append(tree.distances_[::-1], 0.0)  # merge heights from the last merge (G = 1) down
    amads = np.array([amad(dist, p) for p in partitions])
    return PartitionSolution("reference", ROW_LINKAGE, value=heights, amad=amads, partitions=partitions)


def _clusters(labels: np.ndarray) -> Partition:
    """Cluster labels as groups of positions, each ascending, ordered by first position."""
    groups: dict[int, list[int]] = {}
    for position, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(position)
    return sorted(groups.values(), key=lambda g: g[0])


def solve_partitions(dist: np.ndarray, objective: str = "layer-mean") -> PartitionSolution:
    """The exact DP: for every G, the contiguous partition with the least `objective`."""
    dist = _check_square(dist)
    n = dist.shape[0]
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
    return PartitionSolution(method="dp", objective=objective, value=value, amad=amads, partitions=partitions)


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
    """Unconstrained complete-linkage clustering (groups need not be contiguous), for comparison.

    Returned sorted by each group's first layer.
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


def partition_scope(n_layers: int, last_layer: str, spec: str | int | list[list[int]] = "auto") -> int:
    """How many of the harvested layers, from the first, the partition covers.

    All but the last when it keeps an SAE of its own (last_layer = own; the reference clusters
    dist[:-1, :-1]); every layer with last_layer = grouped, with a single harvested layer, or when
    explicit ranges put the last layer in a group with others.
    """
    if last_layer != "own" or n_layers < 2:
        return n_layers
    if isinstance(spec, list) and spec and spec[-1][0] != spec[-1][1]:
        return n_layers
    return n_layers - 1


def solve_grouping(
    dist: np.ndarray, method: str, objective: str, last_layer: str, spec: str | int | list[list[int]] = "auto"
) -> PartitionSolution:
    """`solve` over the layers the partition covers (`partition_scope`): its G counts their groups."""
    n = partition_scope(_check_square(dist).shape[0], last_layer, spec)
    return solve(dist[:n, :n], method, objective)


def choose_groups(
    solution: PartitionSolution, spec: str | int | list[list[int]], threshold: float, layers: list[int]
) -> list[list[int]]:
    """Resolve grouping.groups against the method's partitions; returns groups of model layer indices.

    The solution covers the first len(solution.partitions) layers; each layer after them (the last,
    with last_layer = own) is a group of its own.
    """
    n, k = len(layers), len(solution.partitions)
    if spec == "per-layer":
        positions: Partition = [[i] for i in range(n)]
    elif spec == "auto" or isinstance(spec, int):
        g = solution.auto_groups(threshold) if spec == "auto" else int(spec)
        if g > k:
            raise ConfigError(too_many_groups(g, n, k, layers))
        positions = _contiguous(solution, g, layers) + [[i] for i in range(k, n)]
    elif isinstance(spec, list):
        return _explicit_groups(spec, layers)
    else:
        raise ConfigError(f"grouping.groups is {spec!r}; expected auto, per-layer, a number or [[first, last], ...]")
    return [[layers[i] for i in g] for g in positions]


def too_many_groups(g: int, n: int, k: int, layers: list[int]) -> str:
    """Why G = g groups cannot be made of the n harvested layers, k of which the partition covers."""
    message = f"grouping.groups (--groups) is {g} but only {n} layers are harvested"
    if k == n:
        return f"{message}; expected at most {n}"
    return (
        f"{message} and the last, {layers[-1]}, has an SAE of its own (grouping.last_layer = own); expected at "
        f"most {k} groups of layers {layers[0]}..{layers[k - 1]}, or set grouping.last_layer = grouped"
    )


def _contiguous(solution: PartitionSolution, g: int, layers: list[int]) -> Partition:
    """The method's partition at G = g, refused where a group is not a run of consecutive layers:
    every stage after the plan (labels, plots, ranges) takes a group for its first..last layers."""
    part = solution.partitions[g - 1]
    if all(consecutive(grp) for grp in part):
        return part
    shown = "; ".join(str([layers[i] for i in grp]) for grp in part)
    raise ConfigError(
        f"grouping.method = {solution.method} gives groups that are not runs of consecutive layers at G = {g} "
        f"({shown}); ghsae trains one SAE per run of consecutive layers: use grouping.method = dp or agglomerative, "
        "or another grouping.groups (--groups)"
    )


def _explicit_groups(ranges: list[list[int]], layers: list[int]) -> list[list[int]]:
    groups = [list(range(a, b + 1)) for a, b in ranges]
    flat = [layer for g in groups for layer in g]
    if flat != layers:
        raise ConfigError(
            f"grouping.groups {ranges} must cover the harvested layers {layers[0]}..{layers[-1]} "
            "in order, each exactly once, with no gaps"
        )
    return groups
