"""`ghsae run` measures the gap to per-layer SAEs from one model pass: every layer harvested once, the
grouped store derived from it, per-layer spot checks trained beside the group SAEs (issue 13)."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from runs import cli, small_config, write_config

from ghsae.compare import per_layer_config
from ghsae.pipeline import fit, harvest, report
from ghsae.run import Run

SPOT = [1, 4]  # the middle layers of the small config's groups 0-2 and 3-5, set as compare.spot_layers
REPORT = {"report.ce_tokens": 128, "report.latents_shown": 1, "report.examples_per_latent": 1}
COMPARE = {"compare.spot_layers": SPOT}  # by default 0 and 4 here (the first of 0-2, the middle of 3-5)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_llama, text_dataset):
    """`ghsae run` on the tiny model with per-layer spot checks, as a user runs it."""
    root = tmp_path_factory.mktemp("compared")
    cfg = small_config(tiny_llama, text_dataset, **REPORT, **COMPARE)
    assert cfg.compare.per_layer == "spot-checks"  # the default
    r = cli(["run", "--config", write_config(root, cfg), "--run-dir", root / "run", "--no-progress"])
    assert r.exit_code == 0, r.output
    return cfg, root / "run", r.output


def baseline_rows(run_dir) -> dict[int, dict]:
    rows = pq.read_table(run_dir / "report" / "metrics.parquet").to_pylist()
    return {r["layer"]: r for r in rows if r["kind"] == "baseline"}


def test_ghsae_run_harvests_every_layer_once_and_derives_the_grouped_store(compared):
    _, run_dir, output = compared
    run, source = Run.open(run_dir), Run.open(run_dir / "per-layer")
    assert source.plan.per_layer and source.complete()
    assert run.layout.derived_from.is_file() and run.plan.groups == ((0, 1, 2), (3, 4, 5))
    assert "without the model" in output
    # per-layer SAEs at the spot layers only, with the group SAEs' tokens per SAE
    assert [source.sae_record(g).layers[0] for g in source.trained_groups()] == SPOT
    assert {source.sae_record(g).tokens for g in source.trained_groups()} == {run.sae_record("group_00").tokens}


def test_the_report_answers_how_much_worse_and_how_much_cheaper_at_the_spot_layers(compared):
    _, run_dir, _ = compared
    page = (run_dir / "report" / "report.html").read_text()
    assert "How much worse, how much cheaper." in page
    assert "At the 2 spot-check layers (1, 4)" in page and "cheaper</b>" in page
    assert "<b>Spot checks.</b>" in page
    assert "spot layers 1, 4" in page  # the headline's span for both kinds and their paired difference
    assert set(baseline_rows(run_dir)) == set(SPOT)
    assert "derived from a harvest of every layer" in page
    assert "one seed: no training-noise error" in page  # compare.seeds = 1: the context error alone


def test_spot_checks_equal_a_full_per_layer_baseline_at_those_layers(compared, tmp_path, tiny_lm):
    """The same numbers as per-layer SAEs trained, with the same seed and tokens, by a separate
    per-layer harvest and fit of every layer."""
    cfg, run_dir, _ = compared
    full = tmp_path / "full-baseline"
    base_cfg = per_layer_config(cfg)
    harvest(base_cfg, full, progress=False, lm=tiny_lm)
    fit(base_cfg, full, progress=False)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    report(cfg, copy, baseline=full, progress=False, lm=tiny_lm)
    spot, every = baseline_rows(run_dir), baseline_rows(copy)
    assert set(every) == set(range(6))
    for layer in SPOT:
        for key, value in spot[layer].items():
            if key != "sae":  # "per-layer group_01" in both: the same name too, but the point is the numbers
                assert every[layer][key] == value, (layer, key)
    own, theirs = Run.open(run_dir / "per-layer"), Run.open(full)
    for group in own.trained_groups():
        a = (own.layout.sae_dir(group) / "sae.safetensors").read_bytes()
        assert a == (theirs.layout.sae_dir(group) / "sae.safetensors").read_bytes(), group


def test_a_run_and_its_all_layers_harvest_moved_together_keep_their_compute_account(compared, tmp_path):
    from ghsae.analysis.report import harvest_cost

    _, run_dir, _ = compared
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    A, derive_s = harvest_cost(Run.open(moved))
    assert A == Run.open(moved / "per-layer").harvest_seconds() and A is not None
    assert derive_s is not None  # the derivation's own seconds (its plan and shard records), shown beside A
