from __future__ import annotations

import numpy as np
import pytest

from ghsae.errors import ConfigError
from ghsae.harvest.partition import (
    METHODS,
    OBJECTIVES,
    agglomerative_partitions,
    amad,
    brute_force,
    choose_groups,
    complete_linkage,
    segment_diameters,
    solve,
    solve_partitions,
)


def random_distances(n: int, seed: int) -> np.ndarray:
    """Angular-like distances of random points on a sphere (symmetric, zero diagonal)."""
    x = np.random.default_rng(seed).normal(size=(n, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arccos(np.clip(x @ x.T, -1, 1)) / np.pi * (1 - np.eye(n))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", range(6))
def test_dynamic_program_matches_brute_force_for_every_g(objective, seed):
    n = 4 + seed  # 4..9 layers
    dist = random_distances(n, seed)
    solution = solve_partitions(dist, objective)
    for g in range(1, n + 1):
        best, _ = brute_force(dist, g, objective)
        assert solution.value[g - 1] == pytest.approx(best, abs=1e-12)
        part = solution.partitions[g - 1]
        assert [i for grp in part for i in grp] == list(range(n)) and len(part) == g


def test_amad_objective_is_degenerate_and_layer_mean_is_not():
    # Distances grow with the layer gap and saturate, as on real models. Minimising AMAD alone
    # piles layers into one group and leaves singletons; layer-mean balances the groups.
    n = 12
    idx = np.arange(n)
    dist = np.sqrt(np.abs(idx[:, None] - idx[None, :]) / n)
    sizes_amad = [len(g) for g in solve_partitions(dist, "amad").partitions[2]]
    sizes_mean = [len(g) for g in solve_partitions(dist, "layer-mean").partitions[2]]
    assert sorted(sizes_amad) == [1, 1, 10]
    assert sorted(sizes_mean) == [4, 4, 4]


def test_amad_of_a_partition_is_the_mean_group_diameter():
    dist = np.array([[0, 0.1, 0.4], [0.1, 0, 0.2], [0.4, 0.2, 0]])
    assert amad(dist, [[0, 1], [2]]) == pytest.approx((0.1 + 0.0) / 2)
    assert amad(dist, [[0, 1, 2]]) == pytest.approx(0.4)
    assert segment_diameters(dist)[0, 2] == pytest.approx(0.4)


def test_auto_picks_the_smallest_g_whose_amad_is_below_the_threshold():
    dist = random_distances(8, 1)
    solution = solve_partitions(dist, "layer-mean")
    layers = list(range(10, 18))
    groups = choose_groups(solution, "auto", 0.3, layers)
    g = len(groups)
    assert solution.amad[g - 1] < 0.3
    assert all(solution.amad[: g - 1] >= 0.3)
    assert [x for grp in groups for x in grp] == layers


def test_per_layer_fixed_and_explicit_groups():
    solution = solve_partitions(random_distances(6, 2))
    layers = list(range(6))
    assert choose_groups(solution, "per-layer", 0.2, layers) == [[i] for i in layers]
    assert len(choose_groups(solution, 3, 0.2, layers)) == 3
    assert choose_groups(solution, [[0, 1], [2, 5]], 0.2, layers) == [[0, 1], [2, 3, 4, 5]]


@pytest.mark.parametrize("ranges", [[[0, 1], [3, 5]], [[0, 2], [2, 5]], [[0, 5], [6, 7]]])
def test_explicit_ranges_with_gaps_overlaps_or_extra_layers_are_refused(ranges):
    with pytest.raises(ConfigError, match="must cover"):
        choose_groups(solve_partitions(random_distances(6, 3)), ranges, 0.2, list(range(6)))


def test_more_groups_than_layers_is_refused():
    with pytest.raises(ConfigError, match="at most 6"):
        choose_groups(solve_partitions(random_distances(6, 3)), 7, 0.2, list(range(6)))


def test_complete_linkage_merges_the_closest_layers_first():
    dist = np.array([[0, 0.1, 0.9, 0.9], [0.1, 0, 0.9, 0.9], [0.9, 0.9, 0, 0.2], [0.9, 0.9, 0.2, 0]])
    assert complete_linkage(dist, 2) == [[0, 1], [2, 3]]


def plain_adjacent_complete_linkage(dist: np.ndarray, n_groups: int) -> list[list[int]]:
    """The textbook algorithm, written independently: merge the adjacent pair of clusters whose
    largest cross distance is smallest (leftmost on ties), recomputing every link from the matrix."""
    clusters = [[i] for i in range(dist.shape[0])]
    while len(clusters) > n_groups:
        links = []
        for a in range(len(clusters) - 1):
            links.append(max(dist[i, j] for i in clusters[a] for j in clusters[a + 1]))
        a = links.index(min(links))
        clusters[a : a + 2] = [clusters[a] + clusters[a + 1]]
    return clusters


@pytest.mark.parametrize("seed", range(8))
def test_agglomerative_matches_a_plain_implementation_for_every_g(seed):
    n = 5 + seed  # 5..12 layers
    dist = random_distances(n, 100 + seed)
    solution = agglomerative_partitions(dist)
    for g in range(1, n + 1):
        expected = plain_adjacent_complete_linkage(dist, g)
        assert solution.partitions[g - 1] == expected
        assert solution.amad[g - 1] == pytest.approx(amad(dist, expected), abs=1e-12)


def test_agglomerative_groups_are_contiguous_and_nested():
    dist = random_distances(10, 7)
    parts = agglomerative_partitions(dist).partitions
    for g, part in enumerate(parts, start=1):
        assert len(part) == g and [i for grp in part for i in grp] == list(range(10))
    # hierarchical: every group at G is inside one group at G - 1
    for finer, coarser in zip(parts[1:], parts[:-1]):
        assert all(any(set(f) <= set(c) for c in coarser) for f in finer)


def test_agglomerative_equals_unconstrained_linkage_when_distance_grows_with_layer_gap():
    # Points on a line: every cross distance to a non-neighbour exceeds one to a neighbour, so the
    # contiguity constraint never binds and both agree with the paper's (unconstrained) clustering.
    x = np.cumsum(np.random.default_rng(3).uniform(0.01, 0.1, size=12))
    dist = np.abs(x[:, None] - x[None, :])
    solution = agglomerative_partitions(dist)
    for g in range(1, 13):
        assert solution.partitions[g - 1] == complete_linkage(dist, g)


def test_methods_dispatch_and_auto_uses_each_methods_own_partitions():
    dist = random_distances(9, 11)
    for method in METHODS:
        sol = solve(dist, method)
        assert sol.method == method
        g = sol.auto_groups(0.3)
        assert sol.amad[g - 1] < 0.3 and all(sol.amad[: g - 1] >= 0.3)
        assert choose_groups(sol, "auto", 0.3, list(range(9))) == sol.partitions[g - 1]
    with pytest.raises(ValueError, match="unknown grouping method"):
        solve(dist, "kmeans")
