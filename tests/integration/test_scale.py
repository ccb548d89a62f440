"""Harvest and fit on a real dask LocalCluster of 2 worker processes: the same bytes as one process,
even when a worker dies half-way through a shard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from faults import FAULT_DIR, die_once_mid_shard
from test_resume import assert_same_store

from conftest import tiny_config
from ghsae.cli import main
from ghsae.config import to_toml
from ghsae.errors import ConfigError
from ghsae.executors import open_executor
from ghsae.layout import RunLayout
from ghsae.pipeline import fit, harvest
from ghsae.run import Run
from ghsae.sae import load_sae

TESTS = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def client():
    # worker processes import tests/faults.py by name
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS + (os.pathsep + old if old else "")
    try:
        with open_executor(workers=2, progress=False) as ex:
            yield ex
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_llama, text_dataset, tiny_lm):
    cfg = tiny_config(tiny_llama, text_dataset)
    run = tmp_path_factory.mktemp("single") / "run"
    harvest(cfg, run, progress=False, lm=tiny_lm)
    return cfg, run


def test_a_two_worker_harvest_writes_the_same_bytes_as_one_process(client, single_process_run, tmp_path):
    cfg, single = single_process_run
    summary = harvest(cfg, tmp_path / "run", client, progress=False)
    assert summary.info.complete and summary.shards_written == 4
    assert_same_store(single, tmp_path / "run")
    assert (RunLayout(tmp_path / "run").stats).read_bytes() == RunLayout(single).stats.read_bytes()
    # both workers took part (each loads the model once and keeps it)
    who = client.client.run(lambda: sorted(__import__("ghsae.lm", fromlist=["x"])._LOADED))
    assert sum(1 for models in who.values() if models) == 2
    # a second run finds every shard done and writes nothing
    again = harvest(cfg, tmp_path / "run", client, progress=False)
    assert again.shards_written == 0


def test_a_worker_dying_mid_shard_is_replaced_and_its_shard_redone(client, single_process_run, tmp_path, monkeypatch):
    cfg, single = single_process_run
    faults = tmp_path / "faults"
    faults.mkdir()
    client.client.run(lambda d=str(faults): os.environ.__setitem__(FAULT_DIR, d))
    monkeypatch.setenv(FAULT_DIR, str(faults))  # for workers the nanny starts after the death
    summary = harvest(cfg, tmp_path / "run", client, progress=False, shard_task=die_once_mid_shard)
    assert (faults / "died").exists(), "the fault must have fired for the test to mean anything"
    assert summary.info.complete
    assert_same_store(single, tmp_path / "run")


def test_fit_on_two_workers_trains_every_group(client, tiny_llama, text_dataset, tiny_lm, tmp_path):
    fit_cfg = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 128, "fit.tokens": 1024, "fit.lr": 3e-3}
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], **fit_cfg})
    harvest(cfg, tmp_path / "run", progress=False, lm=tiny_lm)
    results = fit(cfg, tmp_path / "run", client, progress=False)
    assert [r.group for r in results] == ["group_00", "group_01"]
    for r in results:
        sae = load_sae(r.folder)
        assert sae.cfg.layers == r.layers and r.tokens >= 1024
        assert torch.isfinite(sae.W_dec).all()
    assert Run.open(tmp_path / "run").info().saes_missing == []


def test_the_cli_refuses_workers_with_a_scheduler_and_with_shard_slices(tiny_llama, text_dataset, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(to_toml(tiny_config(tiny_llama, text_dataset)))
    base = ["harvest", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    r = CliRunner().invoke(main, base + ["--workers", "2", "--scheduler", "tcp://nowhere:1"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(main, base + ["--workers", "2", "--shard", "0/2"])
    assert r.exit_code == 2 and "--shard" in r.output
    with pytest.raises(ConfigError, match="positive"):
        with open_executor(workers=0):
            pass
