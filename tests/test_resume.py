"""A harvest killed at any moment and re-run, or split into --shard i/n jobs, writes the same bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from ghsae.cache.manifest import load_plan
from ghsae.config import to_toml
from ghsae.harvest.model import load_model
from ghsae.harvest.run import ShardSlice, harvest
from ghsae.layout import RunLayout


def store_files(run: Path) -> dict[str, bytes]:
    """Every file of the activation store, by relative path."""
    root = run / "acts.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"
    np.testing.assert_array_equal(np.load(RunLayout(a).tokens), np.load(RunLayout(b).tokens))


def harvest_cmd(config: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "ghsae", "harvest", "--config", str(config), "--run-dir", str(run), "--no-progress"]


@pytest.fixture
def slow_config(tiny_llama, text_dataset, tmp_path) -> Path:
    # 16 shards and batch size 1, so the shard phase lasts long enough to be killed inside it.
    cfg = tiny_config(tiny_llama, text_dataset, **{"harvest.tokens": 8192, "harvest.batch_size": 1})
    path = tmp_path / "pipeline.toml"
    path.write_text(to_toml(cfg))
    return path


def test_a_run_killed_at_a_random_moment_resumes_to_identical_bytes(slow_config, tmp_path):
    t0 = time.perf_counter()
    subprocess.run(harvest_cmd(slow_config, tmp_path / "whole"), check=True, capture_output=True)
    full_time = time.perf_counter() - t0

    rng = random.Random(1234)
    run = tmp_path / "killed"
    for _attempt in range(4):
        proc = subprocess.Popen(harvest_cmd(slow_config, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        plan = RunLayout(run).plan
        deadline = time.perf_counter() + 120
        while not plan.exists() and proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.02)
        # after the plan exists: somewhere in the shard phase (the plan step is atomic by rename)
        time.sleep(rng.uniform(0.0, 0.5) * full_time / 4)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(list(RunLayout(run).manifest.glob("shard-*.json")))
        if done < 16:
            break
    assert done < 16, "the harvest finished before it could be killed; the test proves nothing"
    subprocess.run(harvest_cmd(slow_config, run), check=True, capture_output=True)
    assert_same_store(tmp_path / "whole", run)


def test_shard_slices_run_one_after_the_other_equal_one_whole_run(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset)
    lm = load_model(str(tiny_llama), "cpu", "float32")
    harvest(cfg, tmp_path / "whole", progress=False, lm=lm)
    first = harvest(cfg, tmp_path / "split", ShardSlice(0, 2), progress=False, lm=lm)
    assert first.info["shards_missing"] == [1, 3]
    harvest(cfg, tmp_path / "split", ShardSlice(1, 2), progress=False, lm=lm)
    assert_same_store(tmp_path / "whole", tmp_path / "split")


def test_a_rerun_skips_done_shards(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset)
    lm = load_model(str(tiny_llama), "cpu", "float32")
    harvest(cfg, tmp_path / "run", progress=False, lm=lm)
    before = {p: p.stat().st_mtime_ns for p in RunLayout(tmp_path / "run").manifest.iterdir()}
    again = harvest(cfg, tmp_path / "run", progress=False, lm=lm)
    assert again.shards_written == 0
    assert {p: p.stat().st_mtime_ns for p in RunLayout(tmp_path / "run").manifest.iterdir()} == before


def test_the_same_seed_gives_the_same_store_and_another_seed_does_not(tiny_llama, text_dataset, tmp_path):
    lm = load_model(str(tiny_llama), "cpu", "float32")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        harvest(tiny_config(tiny_llama, text_dataset, **{"harvest.seed": seed}), tmp_path / name, progress=False, lm=lm)
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")
    layer_a = load_plan(RunLayout(tmp_path / "a"))
    assert layer_a.n_shards == 4
    assert store_files(tmp_path / "a") != store_files(tmp_path / "c")
