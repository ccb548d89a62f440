"""A grouped run derived from an all-layers run equals a direct harvest of that grouping, byte for byte."""

from __future__ import annotations

import pytest
from stored_run import run_digests

from conftest import tiny_config
from ghsae.errors import ConfigError
from ghsae.harvest.derive import derive_run
from ghsae.pipeline import harvest
from ghsae.run import Run


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_llama, text_dataset, tiny_lm):
    """An all-layers run of the tiny model (every layer a group of its own)."""
    run = tmp_path_factory.mktemp("source") / "per-layer"
    harvest(tiny_config(tiny_llama, text_dataset, **{"grouping.groups": "per-layer"}), run, progress=False, lm=tiny_lm)
    return run


def without_derivation_record(digests: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digests.items() if k != "derived.json"}


@pytest.mark.parametrize("groups", [[[0, 2], [3, 5]], 3, "auto"], ids=["ranges", "G=3", "auto"])
def test_a_derived_run_equals_a_direct_harvest_of_the_same_grouping(
    source, tiny_llama, text_dataset, tiny_lm, tmp_path, groups
):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": groups})
    derived = derive_run(source, cfg, tmp_path / "derived", progress=False)
    harvest(cfg, tmp_path / "direct", progress=False, lm=tiny_lm)
    direct = Run.open(tmp_path / "direct")
    assert derived.plan.groups == direct.plan.groups and len(derived.plan.groups) > 1
    got, want = run_digests(derived.root), run_digests(direct.root)
    assert without_derivation_record(got) == want
    assert "derived.json" in got
    # the rows themselves, not only their hash: every group's activations come from the source
    assert any(k.endswith("/acts") for k in want)


def test_a_derived_bfloat16_store_equals_a_direct_harvest(tiny_llama, text_dataset, tiny_lm, tmp_path):
    # bfloat16 rows are stored as uint16 bits: the derivation widens them for the sums as a harvest does
    bf16 = {"storage.dtype": "bfloat16"}
    source_cfg = tiny_config(tiny_llama, text_dataset, **bf16, **{"grouping.groups": "per-layer"})
    harvest(source_cfg, tmp_path / "per-layer", progress=False, lm=tiny_lm)
    cfg = tiny_config(tiny_llama, text_dataset, **bf16, **{"grouping.groups": 3})
    derived = derive_run(tmp_path / "per-layer", cfg, tmp_path / "derived", progress=False)
    harvest(cfg, tmp_path / "direct", progress=False, lm=tiny_lm)
    assert without_derivation_record(run_digests(derived.root)) == run_digests(tmp_path / "direct")


def test_a_derivation_resumes_to_the_same_bytes(source, tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2})
    run = derive_run(source, cfg, tmp_path / "derived", progress=False)
    before = without_derivation_record(run_digests(run.root))
    run.forget_shard(1)  # as if killed before shard 1's record
    assert not run.layout.stats.exists()  # forgetting a shard makes the run's statistics stale: removed
    derive_run(source, cfg, tmp_path / "derived", progress=False)
    assert without_derivation_record(run_digests(run.root)) == before


def test_a_source_that_cannot_give_the_rows_is_refused_with_the_reason(source, tiny_llama, text_dataset, tmp_path):
    other_tokens = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2, "harvest.tokens": 1024})
    with pytest.raises(ConfigError, match=r"harvest.tokens is 2048 in the source, 1024 here"):
        derive_run(source, other_tokens, tmp_path / "a", progress=False)
    grouped = tmp_path / "grouped"
    derive_run(source, tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2}), grouped, progress=False)
    with pytest.raises(ConfigError, match=r"is not an all-layers run \(harvest it with --groups per-layer\)"):
        derive_run(
            grouped, tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 3}), tmp_path / "b", progress=False
        )


def test_a_derivation_into_a_folder_holding_a_direct_harvest_is_refused(
    source, tiny_llama, text_dataset, tiny_lm, tmp_path
):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2})
    harvest(cfg, tmp_path / "direct", progress=False, lm=tiny_lm)
    with pytest.raises(ConfigError, match="holds a direct harvest; a derived run cannot be written into it"):
        derive_run(source, cfg, tmp_path / "direct", progress=False)


def test_an_interrupted_derivation_is_marked_derived_from_its_start(source, tiny_llama, text_dataset, tmp_path):
    """derived.json is written before the plan: a run killed mid-derivation is never taken for a
    direct harvest (which would finish it with the model and misstate its cost)."""
    from ghsae.records import DerivedFrom, load_record

    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2})
    run = derive_run(source, cfg, tmp_path / "derived", progress=False)
    record = load_record(DerivedFrom, run.layout.derived_from)
    assert record.source_path(run.root) == source.resolve()
    assert not record.source.startswith("/")  # relative: the pair can move together
    assert run.layout.derived_from.stat().st_mtime_ns <= run.layout.plan.stat().st_mtime_ns


def test_a_rebuilt_plan_of_a_run_from_before_issue_13_keeps_its_statistics_rule(
    tiny_llama, text_dataset, tiny_lm, tmp_path, monkeypatch
):
    from ghsae.harvest import plan as plan_module
    from ghsae.records import STATS_FROM_MODEL

    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2})
    with monkeypatch.context() as m:
        m.setattr(plan_module, "STATS_FROM", STATS_FROM_MODEL)
        harvest(cfg, tmp_path / "old", progress=False, lm=tiny_lm)
    before = run_digests(tmp_path / "old")
    (tmp_path / "old" / "plan" / "tokens.npy").unlink()  # a lost plan file: the next harvest rebuilds the plan
    harvest(cfg, tmp_path / "old", progress=False, lm=tiny_lm)
    assert Run.open(tmp_path / "old").plan.stats_from == STATS_FROM_MODEL
    assert run_digests(tmp_path / "old") == before
