"""Shards are verified on use: a flipped byte, a changed layer id or a truncated file is refused by
fit and verify (naming the shard), and a harvest re-run rewrites it to the clean bytes. The report
reads no activation, so it checks the records instead (tests/test_data_path.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from runs import assert_one_line_error, cli, store_bytes, write_config

from ghsae.cache.store import ActivationStore
from ghsae.run import Run

GROUP, SHARD = "group_01", 2  # layers 3-5


def _first_chunk(path, n_inner: int) -> tuple[np.ndarray, int]:
    """The raw bytes of a Zarr shard file and the offset of its first inner chunk (from its index)."""
    data = np.fromfile(path, dtype=np.uint8)
    index = data[data.size - 4 - 16 * n_inner : data.size - 4].view("<u8").reshape(n_inner, 2)
    return data, int(index[0, 0])


def corrupt(run, how: str) -> None:
    store = ActivationStore.open(run / "acts.zarr")
    n_inner = store.geometry.shard_rows // store.geometry.chunk_rows
    if how == "flipped byte":
        path = store.shard_file(GROUP, "acts", SHARD)
        data, offset = _first_chunk(path, n_inner)
        data[offset + 101] ^= 0x10
        data.tofile(path)
    elif how in ("layer of another group", "layer out of range"):
        path = store.shard_file(GROUP, "layer", SHARD)
        data, offset = _first_chunk(path, n_inner)
        data[offset : offset + 2].view(np.int16)[0] = 0 if how == "layer of another group" else 99
        data.tofile(path)
    elif how == "truncated file":
        path = store.shard_file(GROUP, "acts", SHARD)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        raise ValueError(how)


CORRUPTIONS = ["flipped byte", "layer of another group", "layer out of range", "truncated file"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_shard_is_refused_by_fit_and_verify_and_repaired_by_harvest(
    how, tmp_path, harvested_run, small_cfg, caplog
):
    clean = store_bytes(harvested_run)
    corrupt(harvested_run, how)
    config = write_config(tmp_path, small_cfg)
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--group", GROUP, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, f"shard {SHARD} of {GROUP}")
    assert not (harvested_run / "saes" / GROUP / "sae.safetensors").exists()
    r = cli(["verify", harvested_run])
    assert r.exit_code == 2 and f"shard {SHARD} of {GROUP}" in r.output, r.output
    r = cli(["harvest", "--config", config, "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "in 1 shards" in r.output and f"shard {SHARD} fails verification" in caplog.text
    assert store_bytes(harvested_run) == clean
    assert cli(["verify", harvested_run]).exit_code == 0


def test_verify_passes_a_clean_run_and_writes_nothing(fitted_run):
    before = {p: p.stat().st_mtime_ns for p in fitted_run.rglob("*")}
    r = cli(["verify", fitted_run])
    assert r.exit_code == 0, r.output
    assert "4 shards and 2 SAE folders verified" in r.output
    assert {p: p.stat().st_mtime_ns for p in fitted_run.rglob("*")} == before


def test_verification_costs_little_next_to_reading_the_rows(harvested_run):
    """Hashing a shard must not dominate reading it (the README gives the figure on the default run)."""
    from ghsae.cache.verify import verify_shard

    run = Run.open(harvested_run)
    record = run.shard_record(SHARD)
    t0 = time.perf_counter()
    verify_shard(run.store, run.plan, GROUP, SHARD, record)
    assert time.perf_counter() - t0 < 5.0
