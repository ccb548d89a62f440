"""The data path reads each thing once: the report reads the records and SAEs, not the store (so it
renders with acts.zarr gone); `ghsae run` hashes each shard's bytes once; fit reads the harvest's
statistics file."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
from runs import assert_one_line_error, cli, small_config, write_config

from ghsae.cache import verify
from ghsae.run import Run

REPORT = {"report.ce_tokens": 128, "report.latents_shown": 1, "report.examples_per_latent": 1}


def test_the_report_renders_with_the_activation_store_moved_away_after_fit(fitted_run, tmp_path, small_cfg):
    shutil.move(fitted_run / "acts.zarr", tmp_path / "acts.zarr")
    r = cli(["report", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (fitted_run / "report" / "report.html").is_file()


def test_the_report_refuses_a_damaged_shard_record_before_loading_the_model(fitted_run, tmp_path, small_cfg):
    record = fitted_run / "manifest" / "shard-00002.json"
    record.write_text(record.read_text()[:40])
    r = cli(["report", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "shard-00002.json")
    assert not (fitted_run / "report").exists()


def test_ghsae_run_hashes_each_shard_of_each_store_once(tmp_path, tiny_llama, text_dataset, monkeypatch):
    checked: Counter = Counter()
    real = verify.verify_shard

    def counting(store, plan, group, shard, record):
        checked[(str(store.path), group, shard)] += 1
        return real(store, plan, group, shard, record)

    monkeypatch.setattr(verify, "verify_shard", counting)
    cfg = small_config(tiny_llama, text_dataset, **REPORT, **{"compare.spot_layers": [1, 4]})
    r = cli(["run", "--config", write_config(tmp_path, cfg), "--run-dir", tmp_path / "run", "--no-progress"])
    assert r.exit_code == 0, r.output
    grouped = Run.open(tmp_path / "run")
    every = {(str(grouped.store.path), g, s) for g in grouped.plan.group_names for s in range(grouped.plan.n_shards)}
    assert every <= set(checked)  # fit verified every shard it trained on...
    assert max(checked.values()) == 1, [k for k, n in checked.items() if n > 1]  # ...and nothing twice


def test_fit_statistics_of_a_complete_run_come_from_the_statistics_file(harvested_run):
    added = Run.open(harvested_run).add_up_stats(list(range(Run.open(harvested_run).plan.n_shards)))
    for sums in (harvested_run / "manifest").glob("shard-*.npz"):
        sums.unlink()  # what an add-up would read
    read = Run.open(harvested_run).norm_stats()
    np.testing.assert_allclose(read.mean_norm, added.mean_norm, rtol=1e-12)
    np.testing.assert_allclose(read.mean, added.mean, rtol=1e-12)
    np.testing.assert_allclose(read.count, added.count)
    assert read.layers == added.layers
