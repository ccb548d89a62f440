"""`ghsae sweep --budgets`: every grouping at each budget of tokens per SAE from one harvest, a budget
added later trained alone; `--lr-grid`: each arm's learning rate picked on held-out contexts the
evaluation never sees; transfer on both sides of the comparison."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import cli, small_config, write_config
from test_sweep import FIT, GROUPING, REPORT

from ghsae.layout import RunLayout, sae_weights
from ghsae.records import LrChoiceRecord, SweepRecord, load_record
from ghsae.run import Run

GRID = "1e-3,1e-2"  # two rates keep the test small; the choice logic is the same for three
# a third seed at the smallest budget alone, where training is cheapest
ARGS = ["--groups", "2,per-layer", "--seeds", "2", "--seeds-at-smallest", "3", "--transfer", "G2", "--lr-grid", GRID]


def _weights(sweep_dir, pattern):
    """Every SAE weights file under the sweep's folders matching `pattern`, with its time written."""
    out = {}
    for folder in sorted(sweep_dir.glob(pattern)):
        run = Run.open(folder)
        for g in run.plan.group_names:
            out[(folder.name, g)] = sae_weights(run.layout.sae_dir(g)).stat().st_mtime_ns
    return out


def _harvest_records(sweep_dir):
    return {p.name: p.stat().st_mtime_ns for p in RunLayout(sweep_dir / "per-layer").manifest.glob("shard-*.json")}


@pytest.fixture(scope="module")
def budgets(tmp_path_factory, tiny_llama, text_dataset):
    root = tmp_path_factory.mktemp("budgets")
    cfg = small_config(tiny_llama, text_dataset, **FIT, **REPORT, **GROUPING)
    args = ["sweep", "--config", write_config(root, cfg), "--run-dir", root / "sweep", "--no-progress", *ARGS]
    r = cli([*args, "--budgets", "256,512"])
    assert r.exit_code == 0, r.output
    sweep_dir = root / "sweep"
    first = {
        "rows": pq.read_table(sweep_dir / "report" / "metrics.parquet").to_pylist(),
        "weights": _weights(sweep_dir, "*-t*"),
        "harvest": _harvest_records(sweep_dir),
    }
    r = cli([*args, "--budgets", "256,512,1024"])
    assert r.exit_code == 0, r.output
    return sweep_dir, first


def test_every_grouping_trains_at_every_budget_from_one_harvest(budgets):
    sweep_dir, first = budgets
    assert {r["tokens"] for r in first["rows"]} == {256, 512}
    assert {r["arm"] for r in first["rows"]} == {"G2", "G2-transfer", "per-layer", "per-layer-transfer"}
    for budget, suffixes in ((256, ("", "-seed1", "-seed2")), (512, ("", "-seed1"))):
        for seed_suffix in suffixes:
            for arm in ("G2", "per-layer"):
                run = Run.open(sweep_dir / f"{arm}-t{budget}{seed_suffix}")
                seen = {run.sae_record(g).tokens for g in run.plan.group_names}
                assert all(budget <= t < budget + 64 for t in seen), seen  # the last batch may run over
    assert not (sweep_dir / "G2-t512-seed2").exists()  # compare.seeds_at_smallest: the smallest budget only
    assert {(r["tokens"], r["n_seeds"]) for r in first["rows"]} == {(256, 3), (512, 2)}
    summary = (sweep_dir / "report" / "summary.md").read_text()
    assert "3 seeds per grouping at 256 tokens per SAE and 2 at the other budgets" in summary
    page = (sweep_dir / "report" / "sweep.html").read_text()
    assert "<th>seeds</th>" in page  # the budget table says how many each budget trained
    # one harvest: the all-layers store holds the largest budget, and each budget's store is hard links to it
    assert Run.open(sweep_dir / "per-layer").plan.n_contexts_harvest * 64 >= 512
    a = (sweep_dir / "G2" / "acts.zarr" / "zarr.json").stat()
    b = (sweep_dir / "G2-t256-seed1" / "acts.zarr" / "zarr.json").stat()
    c = (sweep_dir / "G2-seed1" / "acts.zarr" / "zarr.json").stat()
    assert b.st_ino == c.st_ino and a.st_ino != c.st_ino  # seed 1's layer draw is its own derived store


def test_adding_a_budget_trains_only_it_and_harvests_nothing_again(budgets):
    sweep_dir, first = budgets
    assert _harvest_records(sweep_dir) == first["harvest"]
    now = _weights(sweep_dir, "*-t*")
    assert {k: now[k] for k in first["weights"]} == first["weights"]  # the smaller budgets' SAEs kept
    new = set(now) - set(first["weights"])
    assert new and all("-t1024" in folder for folder, _ in new)
    rows = pq.read_table(sweep_dir / "report" / "metrics.parquet").to_pylist()
    assert {r["tokens"] for r in rows} == {256, 512, 1024}
    record = load_record(SweepRecord, sweep_dir / "ghsae-sweep.json")
    assert record.budgets == (256, 512, 1024) and record.harvest_tokens == 512


def test_the_learning_rate_is_chosen_on_contexts_disjoint_from_the_eval_contexts(budgets):
    sweep_dir, _ = budgets
    choice = load_record(LrChoiceRecord, sweep_dir / "lr-choice.json")
    held_out = Run.open(sweep_dir / "per-layer").plan.eval_contexts
    v0, v1 = choice.validation_contexts
    e0, e1 = choice.eval_contexts
    assert v0 < v1 and e0 < e1 and (v1 <= e0 or e1 <= v0)
    assert held_out[0] <= min(v0, e0) and max(v1, e1) <= held_out[1]
    # the sweep's evaluation ran on the eval contexts alone
    with np.load(sweep_dir / "report" / "evaluation.npz") as z:
        key = json.loads(json.loads(str(z["meta"]))["key"])
    assert key["eval"] == [e0, e1]
    assert set(choice.chosen) == {"G2", "per-layer"} and set(choice.chosen.values()) <= {1e-3, 1e-2}
    for arm, lr in choice.chosen.items():  # each arm's own choice at every budget
        for budget in (256, 1024):
            run = Run.open(sweep_dir / f"{arm}-t{budget}")
            assert {run.sae_record(g).fit["lr"] for g in run.plan.group_names} == {lr}


def test_the_grids_run_at_the_chosen_rate_is_the_arms_seed_0_at_the_smallest_budget(budgets):
    sweep_dir, _ = budgets
    choice = load_record(LrChoiceRecord, sweep_dir / "lr-choice.json")
    for arm, lr in choice.chosen.items():
        grid = Run.open(sweep_dir / "lr-grid" / f"{arm}-t{choice.budget}-lr{lr:g}")
        run = Run.open(sweep_dir / f"{arm}-t{choice.budget}")
        for g in run.plan.group_names:  # the same file, not a second training of the same SAE
            assert sae_weights(run.layout.sae_dir(g)).stat().st_ino == sae_weights(grid.layout.sae_dir(g)).stat().st_ino
        seed1 = Run.open(sweep_dir / f"{arm}-t{choice.budget}-seed1")  # other seeds train their own
        g = seed1.plan.group_names[0]
        assert sae_weights(seed1.layout.sae_dir(g)).stat().st_ino != sae_weights(grid.layout.sae_dir(g)).stat().st_ino
        larger = Run.open(sweep_dir / f"{arm}-t512")
        assert sae_weights(larger.layout.sae_dir(g)).stat().st_ino != sae_weights(grid.layout.sae_dir(g)).stat().st_ino


def test_per_layer_saes_train_with_transfer_beside_a_grouped_transfer_variant(budgets):
    sweep_dir, _ = budgets
    run = Run.open(sweep_dir / "per-layer-transfer-t256")
    assert "init_from" not in run.sae_record("group_00").sae["extra"]
    assert run.sae_record("group_01").sae["extra"]["init_from"] == str(run.layout.sae_dir("group_00"))
    page = (sweep_dir / "report" / "sweep.html").read_text()
    assert "at equal total compute" in page and "relative gap against tokens" in page
    assert (sweep_dir / "report" / "gap_budget.png").read_bytes()[:4] == b"\x89PNG"
