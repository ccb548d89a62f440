"""The reference's operating point: its clustering method, its last layer left out of grouping, and
runs made before either keeping what they did."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runs import assert_one_line_error, cli
from sklearn.cluster import AgglomerativeClustering

from conftest import tiny_config
from ghsae.config import LAST_LAYER, PipelineConfig, config_from_dict, config_from_run
from ghsae.errors import ConfigError
from ghsae.harvest import partition
from ghsae.harvest.partition import PartitionSolution, choose_groups, solve, solve_grouping
from ghsae.records import GroupingRecord


def lower_triangular(n: int, seed: int) -> np.ndarray:
    """Distances below the diagonal only, as the reference's groups/distance.py stores them."""
    return np.tril(np.random.default_rng(seed).uniform(0.05, 0.6, size=(n, n)), k=-1)


def as_sets(partition_: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset(g) for g in partition_}


@pytest.mark.parametrize("n", [2, 5, 9, 16])
@pytest.mark.parametrize("seed", range(4))
def test_reference_method_equals_sklearn_complete_linkage_on_the_rows_at_every_g(n, seed):
    dist = lower_triangular(n, seed)
    solution = solve(dist, "reference")
    assert len(solution.partitions) == n
    for g in range(1, n + 1):
        labels = AgglomerativeClustering(n_clusters=g, linkage="complete").fit_predict(dist)
        expected = [np.flatnonzero(labels == c).tolist() for c in set(labels.tolist())]
        ours = solution.partitions[g - 1]
        assert as_sets(ours) == as_sets(expected)
        assert [grp[0] for grp in ours] == sorted(grp[0] for grp in ours)  # sorted by first layer
        assert all(grp == sorted(grp) for grp in ours)
        assert solution.amad[g - 1] == pytest.approx(partition.amad(dist, ours))


def test_reference_method_clusters_the_lower_triangle_of_a_symmetric_matrix():
    low = lower_triangular(8, 7)
    symmetric = low + low.T
    assert solve(symmetric, "reference").partitions == solve(low, "reference").partitions


def test_reference_value_is_the_height_of_the_merge_that_left_g_groups():
    dist = lower_triangular(7, 3)
    heights = AgglomerativeClustering(n_clusters=1, linkage="complete", compute_distances=True).fit(dist).distances_
    value = solve(dist, "reference").value
    assert value[0] == pytest.approx(heights[-1]) and value[-1] == 0.0
    assert np.all(np.diff(value) <= 1e-12)  # complete linkage: fewer groups, higher last merge


def test_a_partition_that_is_not_contiguous_is_refused_naming_g_and_groups():
    layers = [0, 1, 2, 3]
    split = PartitionSolution(
        "reference", partition.ROW_LINKAGE, np.zeros(4), np.array([0.5, 0.1, 0.05, 0.0]),
        [[[0, 1, 2, 3]], [[0, 2], [1, 3]], [[0], [1, 3], [2]], [[0], [1], [2], [3]]],
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        choose_groups(split, 2, 0.2, layers)
    message = str(e.value)
    assert "\n" not in message
    assert "grouping.method = reference" in message and "G = 2" in message and "[0, 2]; [1, 3]" in message
    assert "dp or agglomerative" in message
    with pytest.raises(ConfigError, match="G = 3"):  # auto picks G = 3 (AMAD 0.05 < 0.1), not contiguous
        choose_groups(split, "auto", 0.1, layers)
    assert choose_groups(split, 4, 0.2, layers) == [[0], [1], [2], [3]]


def random_distances(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arccos(np.clip(x @ x.T, -1, 1)) / np.pi * (1 - np.eye(n))


@pytest.mark.parametrize("method", partition.METHODS)
def test_the_last_layer_keeps_its_own_group_and_g_counts_the_others(method):
    layers = list(range(10, 20))
    dist = random_distances(10, 1)
    solution = solve_grouping(dist, method, "layer-mean", "own")
    assert len(solution.partitions) == len(solution.amad) == 9  # layers 10..18: the reference's dist[:-1, :-1]
    assert np.allclose(solution.amad, solve(dist[:9, :9], method).amad)
    for spec in ("auto", 1, 3, 9):
        try:
            groups = choose_groups(solution, spec, 0.2, layers)
        except ConfigError as e:  # reference: a partition that is not contiguous
            assert method == "reference" and "not runs of consecutive layers" in str(e)
            continue
        assert groups[-1] == [19] and all(19 not in g for g in groups[:-1])
        if spec != "auto":
            assert len(groups) == spec + 1
    grouped = solve_grouping(dist, "dp", "layer-mean", "grouped")
    assert len(grouped.partitions) == 10 and choose_groups(grouped, 1, 0.2, layers) == [layers]


def test_per_layer_and_explicit_ranges_are_not_changed_by_the_last_layer_setting():
    layers = list(range(6))
    dist = random_distances(6, 2)
    for last in LAST_LAYER:
        solution = solve_grouping(dist, "dp", "layer-mean", last, "per-layer")
        assert choose_groups(solution, "per-layer", 0.2, layers) == [[i] for i in layers]
        ranges = [[0, 2], [3, 5]]
        solution = solve_grouping(dist, "dp", "layer-mean", last, ranges)
        assert choose_groups(solution, ranges, 0.2, layers) == [[0, 1, 2], [3, 4, 5]]
        assert len(solution.partitions) == 6  # the ranges group the last layer: the curve covers it too


def test_asking_for_g_above_the_grouped_layers_names_the_last_layer_setting():
    solution = solve_grouping(random_distances(6, 0), "dp", "layer-mean", "own")
    with pytest.raises(ConfigError, match=r"expected at most 5 groups of layers 0..4, or set grouping.last_layer = grouped"):
        choose_groups(solution, 6, 0.2, list(range(6)))


def test_config_checks_last_layer_and_method_and_defaults_to_the_reference_operating_point():
    cfg = PipelineConfig()
    assert (cfg.grouping.distance, cfg.grouping.last_layer, cfg.grouping.method) == ("layer-centred", "own", "reference")
    assert config_from_dict({"grouping": {"method": "reference"}}).grouping.method == "reference"
    with pytest.raises(ConfigError, match="grouping.last_layer is 'alone'; expected one of own, grouped"):
        config_from_dict({"grouping": {"last_layer": "alone"}})
    assert LAST_LAYER == partition.LAST_LAYER


def test_a_config_json_from_before_keeps_its_identity_and_hash():
    # grouping section of config.json's identity as ghsae wrote it before last_layer existed, for a
    # run made with the then default raw distance
    old_identity = {"amad_threshold": 0.2, "distance": "raw", "groups": "auto", "layers": "all", "objective": "layer-mean"}
    resolved = PipelineConfig().to_dict()
    resolved["grouping"] = {**old_identity, "method": "dp"}  # no last_layer: the key did not exist
    cfg = config_from_run(resolved)
    assert (cfg.grouping.distance, cfg.grouping.last_layer) == ("raw", "grouped")
    assert cfg.identity()["grouping"] == old_identity
    # the same keys in a pipeline.toml today ask for the new operating point: another run
    assert config_from_dict({"grouping": {**old_identity}}).identity()["grouping"] == {**old_identity, "last_layer": "own", "method": "reference"}


def test_a_plan_from_before_reads_as_grouped_and_writes_back_unchanged():
    old = {
        "distance": "raw", "method": "dp", "threshold": 0.2, "objective": "layer-mean",
        "curve": [0.4, 0.1, 0.0], "objective_curve": [0.4, 0.1, 0.0], "chosen_groups": 2, "chosen_amad": 0.1,
    }  # fmt: skip
    record = GroupingRecord.from_json(old)
    assert record.last_layer == "grouped" and record.to_json() == old
    assert record.describe((0, 1, 2)) == "G = 2 groups of layers 0..2"
    own = GroupingRecord.from_json({**old, "last_layer": "own", "curve": [0.4, 0.0]})
    assert own.to_json()["last_layer"] == "own"
    assert own.describe((0, 1, 2)) == "G = 2 groups of layers 0..1, plus layer 2 on its own"


@pytest.mark.parametrize("groups, method", [("auto", "dp"), (2, "dp"), (2, "reference")])
def test_a_harvest_leaves_the_last_layer_out_of_grouping_by_default(
    groups, method, tiny_llama, text_dataset, tiny_lm, tmp_path
):
    from ghsae.pipeline import harvest
    from ghsae.run import Run

    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": groups, "grouping.method": method})
    harvest(cfg, tmp_path / "run", plan_only=True, progress=False, lm=tiny_lm)
    plan = Run.open(tmp_path / "run").plan
    L = len(plan.layers)
    assert plan.groups[-1] == (plan.layers[-1],)
    assert all(plan.layers[-1] not in g for g in plan.groups[:-1])
    gr = plan.grouping
    assert gr.method == method and gr.last_layer == "own" and gr.chosen_groups == len(plan.groups) - 1 and len(gr.curve) == L - 1
    r = cli(["info", tmp_path / "run"])
    assert gr.describe(plan.layers) in r.output
    from ghsae.analysis.report import clustering

    cl = clustering(Run.open(tmp_path / "run"))  # what the report's clustering section shows
    assert cl.g == gr.chosen_groups and cl.summary == gr.describe(plan.layers)
    assert all(len(curve) == L - 1 for curve in cl.curves.values())
    assert {"layer-centred", "raw"} == {a.distance for a in cl.auto if a.method.startswith("reference")}
    if groups == 2:
        assert gr.chosen_groups == 2 and len(plan.groups) == 3
        assert f"G = 2 groups of layers 0..{L - 2}, plus layer {L - 1} on its own" in r.output


def test_a_run_made_before_last_layer_existed_resumes_as_it_was(tiny_llama, text_dataset, tiny_lm, tmp_path):
    from ghsae.pipeline import harvest, settings_for
    from ghsae.run import Run

    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2, "grouping.distance": "raw", "grouping.last_layer": "grouped"})
    harvest(cfg, run_dir, plan_only=True, progress=False, lm=tiny_lm)
    stored = json.loads((run_dir / "config.json").read_text())
    del stored["resolved"]["grouping"]["last_layer"]  # as ghsae wrote it before the key existed
    assert "last_layer" not in stored["identity"]["grouping"]
    (run_dir / "config.json").write_text(json.dumps(stored))
    settings = Run.open(run_dir).settings()
    assert settings.grouping.last_layer == "grouped" and settings.grouping.distance == "raw"
    assert settings.identity() == stored["identity"] and settings.identity_hash() == stored["hash"]
    resumed = settings_for(run_dir, None, {})
    harvest(resumed, run_dir, plan_only=True, progress=False, lm=tiny_lm)  # not refused as another config
    assert len(Run.open(run_dir).plan.groups) == 2


def test_too_many_groups_for_the_grouped_layers_is_one_line_before_any_work(tiny_llama, text_dataset, tmp_path):
    from runs import write_config

    config = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", "--groups", "6", "--no-progress"])
    assert_one_line_error(r.output, "and the last, 5, has an SAE of its own (grouping.last_layer = own)")


def test_the_reference_method_names_a_distance_that_is_not_finite():
    dist = random_distances(5, 0)
    dist[3, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"layer positions 3 and 1 is nan \(not finite\)"):
        solve_grouping(dist, "reference", "layer-mean", "grouped")
