"""Environment failures end with one clear line, exit 2 (130/143 for signals), and the run resumes to
the same result: a full disk, a read-only folder, damaged run files, an unreachable scheduler."""

from __future__ import annotations

import json

import pytest
import torch
from runs import assert_one_line_error, cli, ghsae, store_bytes, write_config
from safetensors.torch import load_file

from ghsae import faults
from ghsae.faults import FAULT_ENV


@pytest.fixture
def fault(monkeypatch):
    """Arm a fault point (ghsae/faults.py) in this process; disarmed after the test."""

    def arm(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv(FAULT_ENV, raising=False)
        else:
            monkeypatch.setenv(FAULT_ENV, spec)
        faults.reload()

    yield arm
    monkeypatch.delenv(FAULT_ENV, raising=False)
    faults.reload()


def sae_weights(run, group="group_00"):
    return load_file(str(run / "saes" / group / "sae.safetensors"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("enospc@shard-00001/after-group_00", "disk full while writing"),
        ("erofs@shard-00001/before-write", "cannot write"),
    ],
)
def test_a_harvest_that_cannot_write_says_so_in_one_line_and_resumes(
    spec, message, tmp_path, fault, small_cfg, harvested_template
):
    config, run = write_config(tmp_path, small_cfg), tmp_path / "run"
    fault(spec)
    r = cli(["harvest", "--config", config, "--run-dir", run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, message)
    assert "re-run the same command to resume" in r.output
    fault(None)
    r = cli(["harvest", "--config", config, "--run-dir", run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert store_bytes(run) == store_bytes(harvested_template)


def test_a_fit_that_runs_out_of_disk_leaves_no_temp_file_and_resumes(
    tmp_path, fault, small_cfg, harvested_run, fitted_template
):
    config = write_config(tmp_path, small_cfg)
    args = ["fit", "--config", config, "--run-dir", harvested_run, "--group", "group_00", "--no-progress"]
    fault("enospc@fit/checkpoint")
    r = cli(args)
    assert r.exit_code == 2
    assert_one_line_error(r.output, "disk full while writing")
    assert "checkpoint.pt" in r.output
    assert not [p for p in (harvested_run / "saes" / "group_00").iterdir() if p.name.endswith(".tmp")]
    fault(None)
    assert cli(args).exit_code == 0
    for name, tensor in sae_weights(fitted_template).items():
        assert torch.equal(tensor, sae_weights(harvested_run)[name]), name


def test_too_little_free_space_is_refused_before_writing_naming_both_sizes(tmp_path, small_cfg, monkeypatch):
    import shutil

    from ghsae import space

    real = shutil.disk_usage

    def small_disk(path):
        return real(path)._replace(free=100_000)

    config, run = write_config(tmp_path, small_cfg), tmp_path / "run"
    monkeypatch.setattr(space.shutil, "disk_usage", small_disk)
    r = cli(["harvest", "--config", config, "--run-dir", run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "free")
    assert "(100,000 bytes) free" in r.output and "need up to" in r.output
    assert not list((run / "manifest").glob("shard-*.json"))


@pytest.mark.parametrize("sig, code, line", [("int", 130, "ghsae: interrupted;"), ("term", 143, "ghsae: terminated")])
def test_sigint_and_sigterm_end_harvest_with_one_line_and_it_resumes(
    sig, code, line, tmp_path, small_cfg, harvested_template
):
    config, run = write_config(tmp_path, small_cfg), tmp_path / "run"
    args = ["harvest", "--config", config, "--run-dir", run, "--no-progress"]
    import os

    r = ghsae(args, env={**os.environ, FAULT_ENV: f"{sig}@shard-00001/after-group_00"})
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(line)
    assert "re-run the same command to resume" in r.stderr
    assert cli(args).exit_code == 0
    assert store_bytes(run) == store_bytes(harvested_template)


@pytest.mark.parametrize("sig, code", [("int", 130), ("term", 143)])
def test_sigint_and_sigterm_end_fit_with_one_line_and_it_resumes_to_the_same_weights(
    sig, code, tmp_path, small_cfg, harvested_run, fitted_template
):
    import os

    config = write_config(tmp_path, small_cfg)
    args = ["fit", "--config", config, "--run-dir", harvested_run, "--group", "group_00", "--no-progress"]
    r = ghsae(args, env={**os.environ, FAULT_ENV: f"{sig}@fit/step-5"})
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "re-run the same command to resume" in r.stderr
    assert (harvested_run / "saes" / "group_00" / "checkpoint.pt").is_file()
    assert cli(args).exit_code == 0
    for name, tensor in sae_weights(fitted_template).items():
        assert torch.equal(tensor, sae_weights(harvested_run)[name]), name


# --- damaged run files ---------------------------------------------------------------------------


def test_an_invalid_config_json_is_named_and_a_harvest_rerun_rewrites_it(tmp_path, fitted_run, small_cfg):
    (fitted_run / "config.json").write_text("{not json")
    config = write_config(tmp_path, small_cfg)
    r = cli(["report", "--config", config, "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "config.json is damaged")
    r = cli(["harvest", "--config", config, "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((fitted_run / "config.json").read_text())["hash"] == small_cfg.identity_hash()


def test_an_empty_shard_record_is_named_and_rewritten_by_harvest(
    tmp_path, harvested_run, small_cfg, harvested_template
):
    (harvested_run / "manifest" / "shard-00001.json").write_text("")
    r = cli(["info", harvested_run])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "shard-00001.json is damaged: empty")
    r = cli(["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 0 and "in 1 shards" in r.output, r.output
    assert store_bytes(harvested_run) == store_bytes(harvested_template)


@pytest.mark.parametrize("name", ["plan/plan.json", "plan/tokens.npy"])
def test_a_deleted_plan_file_is_named_and_rebuilt_by_harvest_without_rewriting_shards(
    name, tmp_path, fitted_run, small_cfg, harvested_template
):
    (fitted_run / name).unlink()
    config = write_config(tmp_path, small_cfg)
    r = cli(["report", "--config", config, "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "plan" if name.endswith("json") else "tokens.npy is missing")
    r = cli(["harvest", "--config", config, "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0 and "in 0 shards" in r.output, r.output
    assert (fitted_run / name).is_file()
    assert store_bytes(fitted_run) == store_bytes(harvested_template)


def test_a_deleted_array_metadata_file_is_named(tmp_path, harvested_run, small_cfg):
    (harvested_run / "acts.zarr" / "group_01" / "layer" / "zarr.json").unlink()
    config = write_config(tmp_path, small_cfg)
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--group", "group_01", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "group_01/layer/zarr.json is missing")
    r = cli(["verify", harvested_run])
    assert r.exit_code == 2 and "zarr.json is missing" in r.output


def test_an_unreachable_scheduler_is_named_in_one_line(tmp_path, small_cfg, monkeypatch):
    from ghsae import executors

    monkeypatch.setattr(executors, "SCHEDULER_TIMEOUT_S", 2)
    r = cli(
        [
            "harvest",
            "--config",
            write_config(tmp_path, small_cfg),
            "--run-dir",
            tmp_path / "run",
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--no-progress",
        ]
    )
    assert r.exit_code == 2
    assert_one_line_error(r.output, "cannot reach the dask scheduler at tcp://127.0.0.1:9")
