"""fit.log: the training metrics also go to TensorBoard and to an offline W&B run, one per SAE.

Both are read back with the libraries' own formats: TensorBoard's EventAccumulator, and W&B's
transaction log (the run-<id>.wandb file `wandb sync` uploads) decoded with W&B's protobuf Record.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from runs import assert_one_line_error, cli, small_config, write_config

from conftest import needs_module

pytestmark = [
    needs_module("tensorboard", "pip install tensorboard"),
    needs_module("wandb", "pip install wandb"),
]

TRACKED = ("loss", "fvu", "l0", "dead_pct", "lr", "tokens_per_s")


@pytest.fixture(scope="module")
def tracked_run(tiny_llama, text_dataset, harvested_template, tmp_path_factory):
    """The small run fitted with fit.log = [tensorboard, wandb], W&B left to its default mode."""
    from ghsae.pipeline import fit

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("wandb-home")
    mp.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(home / var.lower()))
    mp.setenv("WANDB_SILENT", "true")
    run = tmp_path_factory.mktemp("tracked") / "run"
    shutil.copytree(harvested_template, run)
    try:
        fit(small_config(tiny_llama, text_dataset, **{"fit.log": ["tensorboard", "wandb"]}), run, progress=False)
    finally:
        mp.undo()
    return run


def training_metrics(run: Path, group: str) -> dict[str, list]:
    return pq.read_table(run / "saes" / group / "metrics.parquet").to_pydict()


def tensorboard_scalars(folder: Path, tag: str) -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def wandb_records(path: Path) -> list:
    """Every Record of a W&B transaction log: a 7-byte header (':W&B', magic, version), then LevelDB
    log records (crc32c, length, type) in 32 KiB blocks, each a W&B protobuf Record or a piece of one."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(run: Path) -> dict[str, tuple]:
    """{display name: (the run record, [history rows])} of every offline W&B run in RUN/wandb/."""
    out = {}
    for log in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(log)
        info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        rows = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        out[info.display_name] = (info, rows)
    return out


def test_a_fit_with_tensorboard_logs_every_metric_of_metrics_parquet_at_its_steps(tracked_run):
    for group in ("group_00", "group_01"):
        metrics = training_metrics(tracked_run, group)
        for key in TRACKED:
            steps, values = tensorboard_scalars(tracked_run / "tensorboard" / group, f"train/{key}")
            assert steps == metrics["step"], key
            np.testing.assert_allclose(values, metrics[key], rtol=1e-6, err_msg=key)  # events hold float32


def test_a_fit_with_wandb_leaves_one_offline_run_per_sae_grouped_by_run_folder_with_the_fvu_series(tracked_run):
    runs = wandb_runs(tracked_run)
    assert sorted(runs) == ["group_00", "group_01"]
    for group, (info, rows) in runs.items():
        assert info.run_group == tracked_run.name and info.job_type == "fit"
        metrics = training_metrics(tracked_run, group)
        logged = [row for row in rows if "train/fvu" in row]
        assert [row["_step"] for row in logged] == metrics["step"]
        np.testing.assert_allclose([row["train/fvu"] for row in logged], metrics["fvu"], rtol=1e-12)
        for key in TRACKED:
            np.testing.assert_allclose([row[f"train/{key}"] for row in logged], metrics[key], rtol=1e-12)


def test_fit_log_changes_neither_the_saes_nor_their_fit_settings(tracked_run, fitted_template):
    from ghsae.config import config_from_dict
    from ghsae.sae import load_sae
    from ghsae.train.provenance import fit_settings

    for group in ("group_00", "group_01"):
        tracked, plain = load_sae(tracked_run / "saes" / group), load_sae(fitted_template / "saes" / group)
        for name, tensor in plain.state_dict().items():
            torch.testing.assert_close(tracked.state_dict()[name], tensor, msg=name)
    logged = config_from_dict({"fit": {"log": ["wandb", "tensorboard"]}})
    assert fit_settings(logged) == fit_settings(config_from_dict({}))
    assert logged.identity_hash() == config_from_dict({}).identity_hash()


def test_a_fitted_run_fitted_again_with_trackers_is_already_trained(fitted_run, tiny_llama, text_dataset, tmp_path):
    cfg = small_config(tiny_llama, text_dataset, **{"fit.log": ["tensorboard"]})
    r = cli(["fit", "--run-dir", fitted_run, "--config", write_config(tmp_path, cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "already trained" in r.output
    assert not (fitted_run / "tensorboard").exists()  # nothing trained, nothing logged


def test_a_tracker_that_is_not_installed_is_a_one_line_error_naming_the_pip_command(
    harvested_run, tiny_llama, text_dataset, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package it cannot import
    cfg = small_config(tiny_llama, text_dataset, **{"fit.log": ["wandb"]})
    r = cli(["fit", "--run-dir", harvested_run, "--config", write_config(tmp_path, cfg), "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.log names wandb but the wandb package is not installed")
    assert "pip install wandb" in r.output
    assert not (harvested_run / "saes" / "group_00" / "checkpoint.pt").exists()


@pytest.mark.parametrize("log", [["mlflow"], ["wandb", "wandb"]])
def test_fit_log_names_only_known_trackers_once(log):
    from ghsae.config import config_from_dict
    from ghsae.errors import ConfigError

    with pytest.raises(ConfigError, match="fit.log is .*expected distinct names among tensorboard, wandb"):
        config_from_dict({"fit": {"log": log}})
