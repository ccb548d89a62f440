"""What a tiny run stores is pinned: integers, text and structure exactly, floats within a tolerance.

A refactor that changes what is stored fails here, naming the file and the place in it. The
reference lives in tests/assets (stored-run.json, readable, and stored-run.npz, the floats); see
tests/stored_run.py for what is exact and what is compared within a tolerance, and why. A change
that means to alter what is stored records a new reference, says so in its commit, and bumps the
run format where old runs would be misread:

    GHSAE_RECORD_STORED_RUN=1 .venv/bin/python -m pytest tests/integration/test_stored_run.py

The tiny model is built from numpy's generator (conftest.portable_init), so every machine starts
from the same weights and only the float kernels differ. Paths are relative (the run is built
inside tmp_path), so the config hash does not depend on where the test runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stored_run
from runs import small_config

from conftest import generate_documents, save_tiny_model

TESTS = Path(__file__).resolve().parents[1]
ASSETS = TESTS / "assets"
REFERENCE = "stored-run"
# Runs planned before plans recorded stats_from: their statistics come from the model's pass.
REFERENCE_MODEL_STATS = "stored-run-model-stats"
RECORD = bool(os.environ.get("GHSAE_RECORD_STORED_RUN"))

# Environment that makes torch and MKL take their portable kernels instead of the vector units'
# own (AVX2, AVX-512): the floats differ in their last bits, as on another CPU.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def build_tiny_run(folder: Path) -> Path:
    """Harvest and fit the small two-group config, with paths relative to `folder` (the cwd)."""
    from ghsae.pipeline import fit, harvest

    save_tiny_model(Path("model"), "llama")
    with open("docs.jsonl", "w") as fh:
        for doc in generate_documents(600):
            fh.write(json.dumps({"text": doc}) + "\n")
    cfg = small_config(Path("model"), Path("docs.jsonl"))
    harvest(cfg, "run", progress=False)
    fit(cfg, "run", progress=False)
    return folder / "run"


def checked_snapshot(run: Path) -> stored_run.Snapshot:
    """The run's snapshot, after its own verification (which checks the digests of float bytes)."""
    from ghsae.run import Run

    opened = Run.open(run)
    problems = opened.verify()[0] + opened.verify_saes()[0]
    assert not problems, problems
    return stored_run.snapshot(run)


def _assert_matches(got: stored_run.Snapshot, name: str, base: stored_run.Snapshot | None = None) -> None:
    if RECORD:
        stored_run.save(got, ASSETS, name, base=base)
    problems = stored_run.compare(got, stored_run.load(ASSETS, name, base=base))
    assert not problems, "what the run stores changed:\n" + "\n".join(problems)


def test_a_new_run_stores_what_the_reference_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_matches(checked_snapshot(build_tiny_run(tmp_path)), REFERENCE)


def test_a_run_planned_before_stats_from_keeps_its_statistics_rule(tmp_path, monkeypatch):
    """A plan without stats_from (runs made before it existed) keeps its rules: a resumed old run
    writes what it always wrote. Its statistics come from the model's pass instead of the stored
    rows, which moves them by about 4e-5 of their size, less than another CPU's kernels may (see
    stored_run.Tolerance): the plan's missing stats_from is what tells the two apart here, and
    tests/integration/test_derive.py checks the stored-rows rule's sums exactly on one machine."""
    from ghsae.harvest import plan
    from ghsae.records import STATS_FROM_MODEL

    monkeypatch.setattr(plan, "STATS_FROM", STATS_FROM_MODEL)
    monkeypatch.chdir(tmp_path)
    got = checked_snapshot(build_tiny_run(tmp_path))
    new = stored_run.load(ASSETS, REFERENCE)
    _assert_matches(got, REFERENCE_MODEL_STATS, base=new)
    assert [p.split(" ")[0:2] for p in stored_run.compare(got, new)] == [["plan/plan.json", "stats_from:"]]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the kernel switches are x86's")
def test_a_run_on_other_float_kernels_matches_the_reference_within_tolerance(tmp_path):
    """Built again in a process that uses torch's and MKL's portable kernels, as another CPU would:
    its floats differ from this process's in their last bits (checked, so the test shows
    something), and it still matches the reference."""
    script = (
        "import sys, stored_run; from pathlib import Path; from test_stored_run import build_tiny_run, checked_snapshot;"
        "stored_run.save(checked_snapshot(build_tiny_run(Path.cwd())), Path.cwd(), 'other')"
    )
    env = {**os.environ, **OTHER_KERNELS, "PYTHONPATH": os.pathsep.join([str(TESTS), str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    other = stored_run.load(tmp_path, "other")
    reference = stored_run.load(ASSETS, REFERENCE)

    acts = "acts.zarr/group_00/acts::values"
    assert not np.array_equal(other.floats[acts], reference.floats[acts]), (
        "the portable kernels gave the reference's exact floats: this test no longer shows a difference"
    )
    problems = stored_run.compare(other, reference)
    assert not problems, "\n".join(problems)


def test_the_comparison_catches_a_real_change_in_the_floats():
    """A tolerance wide enough for other kernels but too wide to catch anything would make the
    tests above unable to fail: moving one activation row by 1 % of the largest value fails."""
    reference = stored_run.load(ASSETS, REFERENCE)
    moved = stored_run.load(ASSETS, REFERENCE)
    key = "acts.zarr/group_01/acts::values"
    values = moved.floats[key].astype(np.float32)
    values[7] += 0.01 * np.abs(values).max()
    moved.floats[key] = values
    problems = stored_run.compare(moved, reference)
    assert len(problems) == 1 and problems[0].startswith("acts.zarr/group_01/acts (values): moved by"), problems
