"""Training noise in every comparison: N seeds per arm (compare.seeds, `ghsae sweep --seeds N`), a
standard error across seeds beside the one across eval contexts, spot checks at each group's first,
middle and last layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import cli, small_config, write_config
from stored_run import run_digests

from conftest import tiny_config
from ghsae.analysis.evals import EvalResult
from ghsae.analysis.seeds import ONE_SEED, arm, gap
from ghsae.compare import seed_config, spot_layers
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError
from ghsae.harvest.derive import derive_run
from ghsae.pipeline import harvest
from ghsae.run import Run

FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 512, "fit.checkpoint_tokens": 512}
REPORT = {"report.ce_tokens": 128, "report.latents_shown": 1, "report.examples_per_latent": 1}


# --- spot layers and seed settings ------------------------------------------------------------


def test_spot_checks_take_each_multi_layer_groups_first_middle_and_last_layer_in_turn():
    plan = SimpleNamespace(groups=((0, 1, 2, 3, 4), (5,), (6, 7), (8, 9, 10), (11, 12, 13)))
    # first of 0-4, middle of 6-7, last of 8-10, first again of 11-13; the singleton 5 is a per-layer SAE already
    assert spot_layers(plan, PipelineConfig()) == [0, 7, 10, 11]


def test_compare_spot_layers_keeps_its_override():
    plan = SimpleNamespace(groups=((0, 1, 2, 3, 4), (5,)))
    cfg = PipelineConfig()
    cfg.compare.spot_layers = [3, 1, 3]
    assert spot_layers(plan, cfg) == [1, 3]


def test_seed_zero_is_the_config_itself_and_seed_s_moves_the_init_loader_and_layer_draw():
    cfg = PipelineConfig()
    cfg.fit.seed, cfg.harvest.seed = 10, 20
    assert seed_config(cfg, 0) is cfg
    grouped, per_layer = seed_config(cfg, 2), seed_config(cfg, 2, layer_draw=False)
    assert (grouped.fit.seed, grouped.harvest.seed) == (12, 22)
    assert (per_layer.fit.seed, per_layer.harvest.seed) == (12, 20)  # per-layer SAEs have no layer draw


def test_compare_seeds_must_be_at_least_one():
    from ghsae.config import config_from_dict

    with pytest.raises(ConfigError, match=r"compare.seeds is 0; expected 1 or more"):
        config_from_dict({"compare": {"seeds": 0}})


# --- the standard error across seeds --------------------------------------------------------------


def _result(values: dict[str, float], contexts: int = 8) -> EvalResult:
    """An evaluation of SAEs named in `values` at layer 0, with per-context influences."""
    rng = np.random.default_rng(0)
    rows = [{"sae": name, "kind": "group", "layer": 0, "fvu": v} for name, v in values.items()]
    influence = {(name, 0): {"fvu": rng.normal(0, 0.01, contexts)} for name in values}
    return EvalResult(rows, {}, {}, 1.0, 0, 0, 0, contexts, influence)


def test_a_gap_with_two_seeds_has_a_finite_standard_error_across_seeds_of_the_paired_differences():
    result = _result({"a0": 0.30, "a1": 0.34, "b0": 0.20, "b1": 0.22})
    a, b = [[("a0", 0)], [("a1", 0)]], [[("b0", 0)], [("b1", 0)]]
    d = gap(result, a, b, "fvu")
    assert d.n_seeds == 2 and d.mean == pytest.approx(0.11)
    # the paired differences are 0.10 and 0.12: std 0.0141 over sqrt(2)
    assert d.seed_se == pytest.approx(0.01)
    assert math.isfinite(d.context_se) and d.context_se > 0
    g = arm(result, a, "fvu")
    assert g.mean == pytest.approx(0.32) and g.seed_se == pytest.approx(0.02)


def test_one_seed_has_no_error_across_seeds():
    result = _result({"a0": 0.30, "b0": 0.20})
    d = gap(result, [[("a0", 0)]], [[("b0", 0)]], "fvu")
    assert d.n_seeds == 1 and math.isnan(d.seed_se) and math.isfinite(d.context_se)


# --- a derived run with another seed ---------------------------------------------------------------


def test_a_run_derived_with_another_seed_equals_a_direct_harvest_with_that_seed(
    tiny_llama, text_dataset, tiny_lm, tmp_path
):
    """The all-layers run holds every layer of every kept token, so seed 5's layer draw and row order
    are gathered from a seed-0 harvest, byte for byte what a harvest with seed 5 stores."""
    source = tmp_path / "per-layer"
    harvest(tiny_config(tiny_llama, text_dataset, **{"grouping.groups": "per-layer"}), source, progress=False, lm=tiny_lm)
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], "harvest.seed": 5})
    derived = derive_run(source, cfg, tmp_path / "derived", progress=False)
    harvest(cfg, tmp_path / "direct", progress=False, lm=tiny_lm)
    got, want = run_digests(derived.root), run_digests(tmp_path / "direct")
    assert {k: v for k, v in got.items() if k != "derived.json"} == want
    seed0 = derive_run(source, tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]]}), tmp_path / "s0", progress=False)
    other = run_digests(seed0.root)
    assert other["acts.zarr/group_00/acts"] != got["acts.zarr/group_00/acts"]  # another draw and order


# --- ghsae sweep --seeds 2 ---------------------------------------------------------------------


def _sweep(root: Path, cfg, *extra) -> tuple[Path, str]:
    args = ["sweep", "--config", write_config(root, cfg), "--run-dir", root / "sweep", "--no-progress"]
    r = cli([*args, "--groups", "2,per-layer", *extra])
    assert r.exit_code == 0, r.output
    return root / "sweep", r.output


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_llama, text_dataset):
    cfg = small_config(tiny_llama, text_dataset, **FIT, **REPORT)
    return _sweep(tmp_path_factory.mktemp("two-seeds"), cfg, "--seeds", "2")


def _weights(run: Path, group: str) -> bytes:
    return (run / "saes" / group / "sae.safetensors").read_bytes()


def test_a_sweep_with_two_seeds_trains_two_saes_per_arm_with_different_weights(two_seeds):
    sweep, output = two_seeds
    for arm_name, group in (("G2", "group_00"), ("per-layer", "group_03")):
        seed0, seed1 = sweep / arm_name, sweep / f"{arm_name}-seed1"
        assert Run.open(seed1).trained_groups() == Run.open(seed0).trained_groups()
        assert _weights(seed0, group) != _weights(seed1, group), arm_name
    g2 = Run.open(sweep / "G2-seed1").settings()
    assert (g2.harvest.seed, g2.fit.seed) == (1, 1)  # its own layer draw, initialisation and loader order
    p1 = Run.open(sweep / "per-layer-seed1")
    assert (p1.settings().harvest.seed, p1.settings().fit.seed) == (0, 1)  # no layer draw: the one store
    shard = next((sweep / "per-layer" / "acts.zarr").rglob("c/*"))
    linked = sweep / "per-layer-seed1" / shard.relative_to(sweep / "per-layer")
    assert linked.stat().st_ino == shard.stat().st_ino  # hard links, no bytes copied
    assert "derived G2-seed1" in output


def test_the_sweeps_parquet_and_page_hold_every_seed_and_the_error_across_seeds(two_seeds):
    sweep, _ = two_seeds
    rows = pq.read_table(sweep / "report" / "metrics.parquet").to_pylist()
    keys = {(r["grouping"], r["seed"], r["group"], r["layer"]) for r in rows}
    assert len(keys) == len(rows) == 2 * 2 * 6  # two groupings, two seeds, every layer once
    assert {(r["grouping"], r["seed"]) for r in rows} == {(g, s) for g in ("G2", "per-layer") for s in (0, 1)}
    assert all(r["n_seeds"] == 2 and math.isfinite(r["fvu_seed_se"]) and r["fvu_seed_se"] > 0 for r in rows)
    page = (sweep / "report" / "sweep.html").read_text()
    assert "across 2 seeds" in page and "2 seeds per grouping" in page
    assert "across 2 seeds" in (sweep / "report" / "summary.md").read_text()


def test_a_sweeps_gap_with_two_seeds_has_a_finite_error_across_seeds(two_seeds, tiny_lm):
    from ghsae.analysis.sweep import gather_sweep
    from ghsae.analysis.sweep_page import summary_rows

    sweep, _ = two_seeds
    cfg = Run.open(sweep / "G2").settings()
    runs = {name: [sweep / name, sweep / f"{name}-seed1"] for name in ("G2", "per-layer")}
    data = gather_sweep(cfg, runs, tiny_lm, auto=None, source=sweep / "per-layer", cache=sweep / "report" / "evaluation.npz", progress=False)
    g2 = next(r for r in summary_rows(data) if r["grouping"].name == "G2")
    for key in ("fvu_diff", "kl_diff", "delta_ce_pct_diff"):
        assert g2[key].n_seeds == 2 and math.isfinite(g2[key].seed_se) and math.isfinite(g2[key].context_se), key


def _sae_record(run: Path, group: str) -> dict:
    """An SAE's cfg.json without what differs between two folders: its run's path and wall-clock seconds."""
    record = json.loads((run / "saes" / group / "cfg.json").read_text())
    record["sae"]["extra"].pop("run")
    record.pop("seconds")
    return record


def test_seed_zero_of_a_sweep_is_a_sweep_without_seeds(two_seeds, tmp_path, tiny_llama, text_dataset):
    sweep, _ = two_seeds
    one, _ = _sweep(tmp_path, small_config(tiny_llama, text_dataset, **FIT, **REPORT))
    assert ONE_SEED in (one / "report" / "sweep.html").read_text()
    ours = {p.name for p in sweep.iterdir()} - {"G2-seed1", "per-layer-seed1"}
    assert ours == {p.name for p in one.iterdir()}
    for name in ("G2", "per-layer"):
        a, b = run_digests(sweep / name), run_digests(one / name)
        assert a.keys() == b.keys()
        differ = {k for k in a if a[k] != b[k] and not k.startswith("saes/group_")}
        assert differ <= {"config.json"}, differ  # the plan, store, statistics and fit settings
        for group in Run.open(one / name).trained_groups():
            assert _weights(sweep / name, group) == _weights(one / name, group), (name, group)
            assert _sae_record(sweep / name, group) == _sae_record(one / name, group), (name, group)
        # config.json records the comparison's seeds, and that is all that differs
        x, y = (json.loads((root / name / "config.json").read_text()) for root in (sweep, one))
        assert x["resolved"]["compare"].pop("seeds") == 2 and y["resolved"]["compare"].pop("seeds") == 1
        assert x == y


# --- ghsae run with compare.seeds = 2 --------------------------------------------------------------


@pytest.fixture(scope="module")
def run_two_seeds(tmp_path_factory, tiny_llama, text_dataset):
    root = tmp_path_factory.mktemp("run-two-seeds")
    cfg = small_config(tiny_llama, text_dataset, **REPORT, **{"compare.spot_layers": [1, 4], "compare.seeds": 2})
    r = cli(["run", "--config", write_config(root, cfg), "--run-dir", root / "run", "--no-progress"])
    assert r.exit_code == 0, r.output
    return root / "run"


def test_ghsae_run_with_two_seeds_trains_the_second_in_its_own_folder(run_two_seeds):
    run = run_two_seeds
    seed1 = Run.open(run / "seed1")
    assert seed1.layout.derived_from.is_file() and seed1.settings().harvest.seed == 1
    spot = Run.open(run / "seed1" / "per-layer")
    assert [spot.sae_record(g).layers[0] for g in spot.trained_groups()] == [1, 4]
    assert spot.settings().fit.seed == 1
    for group in spot.trained_groups():
        assert _weights(run / "seed1" / "per-layer", group) != _weights(run / "per-layer", group)


def test_ghsae_runs_gap_shows_the_error_across_seeds_beside_the_one_across_contexts(run_two_seeds):
    run = run_two_seeds
    page = (run / "report" / "report.html").read_text()
    assert "averaged over 2 seeds per arm" in page and "across 2 seeds" in page
    assert ONE_SEED not in page
    summary = (run / "report" / "summary.md").read_text()
    assert "- FVU: " in summary and "across 2 seeds" in summary
    rows = pq.read_table(run / "report" / "metrics.parquet").to_pylist()
    assert {(r["kind"], r["seed"]) for r in rows} == {(k, s) for k in ("group", "baseline") for s in (0, 1)}
    assert all(math.isfinite(r["fvu_seed_se"]) for r in rows)


def test_a_report_gap_averages_both_arms_over_the_seeds_it_pairs_so_the_difference_is_their_difference():
    # three seeds of group SAEs against one of a --baseline run: only seed 0 pairs
    from ghsae.analysis.page import gap_figures
    from ghsae.analysis.report import SAEKind

    result = _result({"g0": 0.30, "g1": 0.40, "g2": 0.50, "b0": 0.20})
    for r in result.rows:
        r["kind"] = "baseline" if r["sae"].startswith("b") else "group"
    seeds_of = {"group": ["g0", "g1", "g2"], "baseline": ["b0"]}
    data = SimpleNamespace(
        compared_layers=[0],
        result=result,
        rows_by_seed=lambda kind: [{0: {"sae": name}} for name in seeds_of[kind.value]],
    )
    assert SAEKind.GROUP.value == "group" and SAEKind.BASELINE.value == "baseline"
    checked = 0
    for _label, _spec, views in gap_figures(data):
        for _view, g, p, d in views:
            if math.isnan(d.mean):
                continue  # a metric this fake evaluation lacks
            assert d.mean == pytest.approx(g.mean - p.mean)
            assert g.n_seeds == p.n_seeds == d.n_seeds == 1
            checked += 1
    assert checked  # FVU at least
