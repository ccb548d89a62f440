"""A run never holds or reports what it should not: unusable activations stop the harvest, a run is
never its own baseline, a report shows only what it measured, a run without its settings is
refused, and a store that lost its Zarr metadata is repaired by one harvest re-run."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runs import assert_one_line_error, cli, small_config, store_bytes, write_config

from conftest import save_tiny_model
from ghsae.errors import HarvestError, StoreError
from ghsae.layout import RunLayout
from ghsae.lm import load_model
from ghsae.pipeline import harvest
from ghsae.run import Run

# --- activations no stage can use ------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_model(tmp_path_factory):
    """A tiny Llama whose embedding is scaled by 1e37: every residual fits bfloat16, but no row norm's
    square fits float32."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("huge") / "model", "llama", n_layers=6)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e37)
    model.save_pretrained(folder)
    return folder


def _inf_at_layer(lm, layer: int):
    """A forward hook that turns the first context of each batch to inf at `layer`'s output (before
    the harvest's own hook reads it): a few rows of each shard. Returns the hook's handle."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0] = float("inf")

    return lm.blocks[layer].register_forward_hook(hook)


def test_an_embedding_scaled_by_1e37_stops_the_harvest_naming_the_layer_and_that_no_storage_holds_it(
    tmp_path, huge_model, text_dataset
):
    cfg = small_config(huge_model, text_dataset, **{"storage.dtype": "bfloat16"})
    run = tmp_path / "run"
    r = cli(["harvest", "--config", write_config(tmp_path, cfg), "--run-dir", run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "layer 0: an activation row has norm")
    line = r.output.strip().splitlines()[-1]
    assert "no storage dtype can hold it" in line and "model itself" in line
    assert 'storage.dtype = "bfloat16"' not in line  # the store is bfloat16 already
    layout = RunLayout(run)
    assert not layout.plan.exists() and not layout.stats.exists()  # no probe recorded, no statistics


def test_inf_from_the_model_in_a_few_rows_stops_the_shard_before_anything_of_it_is_written(
    tmp_path, tiny_llama, text_dataset
):
    cfg = small_config(tiny_llama, text_dataset, **{"storage.dtype": "bfloat16"})
    lm = load_model(str(tiny_llama), "cpu", "float32")  # a private copy: the hook must not leak
    run = tmp_path / "run"
    harvest(cfg, run, progress=False, lm=lm, plan_only=True)
    amad = Run.open(run).plan.grouping.chosen_amad
    handle = _inf_at_layer(lm, 5)
    try:
        with pytest.raises(HarvestError) as e:
            harvest(cfg, run, progress=False, lm=lm)
    finally:
        handle.remove()
    message = str(e.value)
    assert re.match(r"shard 0, layer 5: the model produced \d+ rows holding inf/NaN", message), message
    assert "largest finite row norm seen there is" in message and "it ran in float32" in message
    assert "bfloat16" not in message
    layout = RunLayout(run)
    assert not layout.shard_record(0).exists() and not layout.shard_sums(0).exists()
    assert not layout.stats.exists()
    assert math.isfinite(amad) and amad > 0


def test_inf_in_the_probe_stops_the_plan_instead_of_recording_a_distance(tmp_path, tiny_llama, text_dataset):
    cfg = small_config(tiny_llama, text_dataset)
    lm = load_model(str(tiny_llama), "cpu", "float32")
    handle = _inf_at_layer(lm, 2)
    try:
        with pytest.raises(HarvestError, match=r"^the similarity probe .*, layer 2: the model produced \d+ rows"):
            harvest(cfg, tmp_path / "run", progress=False, lm=lm)
    finally:
        handle.remove()
    assert not RunLayout(tmp_path / "run").plan.exists()


def test_a_model_run_in_16_bits_is_told_to_compute_in_float32_and_float16_storage_to_use_bfloat16():
    from ghsae.harvest import finite

    guard = finite.ActivationGuard([7, 8], torch.device("cpu"))
    guard.track(0, torch.ones(4, 3))
    guard.track(1, torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
    with pytest.raises(HarvestError, match=r'shard 3, layer 8: .*1 rows holding inf/NaN.*model.dtype = "float32"'):
        guard.check("shard 3", "bfloat16", torch.bfloat16)
    loud = finite.ActivationGuard([7], torch.device("cpu"))
    loud.track(0, torch.full((2, 4), 1e5))
    loud.check("shard 0", "bfloat16", torch.float32)  # bfloat16 holds 1e5
    with pytest.raises(HarvestError, match=r'magnitude 1e\+05 does not fit float16.*storage.dtype = "bfloat16"'):
        loud.check("shard 0", "float16", torch.float32)


@pytest.fixture(scope="module")
def unchecked_runs(tmp_path_factory, huge_model, tiny_llama, text_dataset):
    """Runs written as a ghsae without the activation checks wrote them: a bfloat16 store of the 1e37
    model (stats with mean_norm inf, scale 0) and one holding inf in a few rows."""
    from ghsae.harvest import finite

    root = tmp_path_factory.mktemp("unchecked")
    runs = {}
    original = finite.ActivationGuard.check
    finite.ActivationGuard.check = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        # that ghsae partitioned with dp, its default then, which ran on the NaN distances of inf rows
        unchecked = {"storage.dtype": "bfloat16", "grouping.method": "dp"}
        cfg = small_config(huge_model, text_dataset, **unchecked)
        with pytest.raises(StoreError, match="norm sums in the shard records are not finite"):
            harvest(cfg, root / "huge", progress=False)  # every shard written; the statistics refused
        runs["huge"] = (cfg, root / "huge")
        cfg = small_config(tiny_llama, text_dataset, **unchecked)
        lm = load_model(str(tiny_llama), "cpu", "float32")
        handle = _inf_at_layer(lm, 5)
        try:
            with pytest.raises(StoreError, match="norm sums in the shard records are not finite"):
                harvest(cfg, root / "inf", progress=False, lm=lm)
        finally:
            handle.remove()
        runs["inf"] = (cfg, root / "inf")
    finally:
        finite.ActivationGuard.check = original  # type: ignore[method-assign]
    return runs


@pytest.mark.parametrize("name, layer", [("huge", 0), ("inf", 5)])
def test_a_store_written_without_the_checks_fails_verify_fit_and_report_in_one_line(
    name, layer, unchecked_runs, tmp_path
):
    cfg, template = unchecked_runs[name]
    run = tmp_path / "run"
    shutil.copytree(template, run)
    problem = f"norm sums for layer {layer} are not finite"
    r = cli(["verify", run])
    assert r.exit_code == 2 and problem in r.output, r.output
    r = cli(["fit", "--run-dir", run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, f"layer {layer}'s norm sums in the shard records are not finite")
    assert "bfloat16" not in r.output  # the store is bfloat16 already
    assert not (run / "saes" / "group_00" / "sae.safetensors").exists()
    r = cli(["report", "--run-dir", run, "--no-progress"])  # was a raw traceback: max() arg is an empty sequence
    assert r.exit_code == 2
    assert_one_line_error(r.output, problem)


def test_a_harvest_rerun_of_such_a_store_stops_with_the_cause(unchecked_runs, tmp_path):
    cfg, template = unchecked_runs["inf"]
    run = tmp_path / "run"
    shutil.copytree(template, run)
    lm = load_model(str(cfg.model.path), "cpu", "float32")
    handle = _inf_at_layer(lm, 5)
    try:
        with pytest.raises(HarvestError, match=r"layer 5: the model produced \d+ rows holding inf/NaN"):
            harvest(cfg, run, progress=False, lm=lm)
    finally:
        handle.remove()


def test_inf_and_nan_are_counted_from_the_stored_bits_of_either_dtype():
    from ghsae.cache.store import count_nonfinite, to_storage

    x = torch.tensor([[1.0, float("inf"), -float("inf")], [float("nan"), 65504.0, -3.0e38]])
    assert count_nonfinite(to_storage(x, "bfloat16"), "bfloat16") == 3
    assert count_nonfinite(to_storage(x, "float16"), "float16") == 4  # -3e38 overflows float16 to -inf


def test_verification_refuses_stored_inf_even_where_the_record_agrees(harvested_run):
    from ghsae.cache.store import to_storage
    from ghsae.cache.verify import verify_shard

    run = Run.open(harvested_run)
    record = run.shard_record(1)
    rows = run.store.read_shard("group_00", 1, record.groups["group_00"].rows)
    rows.acts[5, 2] = to_storage(torch.tensor([float("inf")]), "float16")[0]
    run.store.write_shard("group_00", 1, rows)
    agreeing = dataclasses.replace(
        record.groups["group_00"], checksums=rows.checksums(), files=run.store.file_sizes("group_00", 1)
    )
    record = dataclasses.replace(record, groups={**record.groups, "group_00": agreeing})
    with pytest.raises(StoreError, match=r"shard 1 of group_00 .*: array acts holds 1 inf/NaN values"):
        verify_shard(run.store, run.plan, "group_00", 1, record)


def test_no_dashboard_pass_is_made_when_no_latent_fired(tiny_lm):
    from ghsae.analysis.dashboards import collect

    assert collect(tiny_lm, np.zeros((1, 4), dtype=np.int32), [0], {}) == {}


# --- a run is not its own baseline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def per_layer_run(tmp_path_factory, tiny_llama, text_dataset, tiny_lm):
    """A fitted per-layer run: the kind a baseline must be, so only being itself can refuse it."""
    from ghsae.pipeline import fit

    cfg = small_config(tiny_llama, text_dataset, **{"grouping.groups": "per-layer"})
    run = tmp_path_factory.mktemp("per_layer") / "run"
    harvest(cfg, run, progress=False, lm=tiny_lm)
    fit(cfg, run, progress=False)
    return run


def test_a_run_given_itself_as_baseline_is_refused_also_through_a_symlink(per_layer_run, tmp_path):
    link = tmp_path / "same"
    link.symlink_to(per_layer_run)
    for run, baseline in ((per_layer_run, per_layer_run), (per_layer_run, link), (link, per_layer_run / ".." / "run")):
        r = cli(["report", "--run-dir", run, "--baseline", baseline, "--no-progress"])
        assert r.exit_code == 2
        assert_one_line_error(r.output, "is this run's own folder")
    assert not (per_layer_run / "report" / "report.html").exists()


# --- a report shows what it measured -------------------------------------------------------------


def test_a_report_without_tasks_removes_circuit_results_of_an_earlier_report(fitted_run):
    stale = fitted_run / "report" / "circuits.parquet"
    stale.parent.mkdir()
    pq.write_table(pa.table({"task": ["ioi"], "layer": [4], "value": [0.9]}), stale)
    r = cli(["report", "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (fitted_run / "report" / "report.html").is_file()
    assert not stale.exists()


# --- a run without its settings --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["invalid", "list", "missing"])
@pytest.mark.parametrize("saes", ["removed", "kept"])
def test_a_run_whose_config_json_is_damaged_or_missing_is_refused_naming_it(damage, saes, fitted_run):
    config = fitted_run / "config.json"
    if damage == "missing":
        config.unlink()
    else:
        config.write_text("{not json" if damage == "invalid" else "[1, 2]")
    if saes == "removed":
        shutil.rmtree(fitted_run / "saes")
    for command in (["fit", "--run-dir", fitted_run], ["report", "--run-dir", fitted_run], ["info", fitted_run]):
        r = cli(command if command[0] == "info" else [*command, "--no-progress"])
        assert r.exit_code == 2, (command, r.output)
        assert_one_line_error(r.output, "config.json")
        assert "ghsae harvest --run-dir" in r.output and "other fit settings" not in r.output
    assert (fitted_run / "saes" / "group_00" / "sae.safetensors").exists() == (saes == "kept")


def test_a_harvest_rewrites_a_missing_config_json_from_its_config_and_then_fit_uses_the_runs_settings(
    tmp_path, fitted_run, small_cfg
):
    (fitted_run / "config.json").unlink()
    r = cli(["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((fitted_run / "config.json").read_text())["resolved"]["fit"]["batch_size"] == 64


# --- a store that lost its Zarr metadata -----------------------------------------------------------


@pytest.mark.parametrize(
    "lost", ["acts.zarr/group_01/acts/zarr.json", "acts.zarr/zarr.json", "acts.zarr/group_00/zarr.json"]
)
def test_lost_zarr_metadata_is_seen_by_info_and_repaired_by_one_harvest_rerun_keeping_every_shard(
    lost, fitted_run, harvested_template, small_cfg
):
    original = (fitted_run / lost).read_bytes()
    records = sorted(p.name for p in (fitted_run / "manifest").iterdir())
    (fitted_run / lost).unlink()
    r = cli(["info", "--json", fitted_run])
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert not info["complete"] and lost in info["store_problems"][0]
    r = cli(["verify", fitted_run])
    assert r.exit_code == 2 and "zarr.json is missing" in r.output and "ghsae harvest --run-dir" in r.output
    # the one repair command, as the messages say: the run's own settings, no --config, no --overwrite
    r = cli(["harvest", "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0 and "in 0 shards" in r.output, r.output
    assert (fitted_run / lost).read_bytes() == original
    assert sorted(p.name for p in (fitted_run / "manifest").iterdir()) == records
    assert store_bytes(fitted_run) == store_bytes(harvested_template)
    r = cli(["verify", fitted_run])
    assert r.exit_code == 0, r.output
    assert json.loads(cli(["info", "--json", fitted_run]).output)["complete"]


def test_a_store_whose_shard_records_were_deleted_by_the_old_rerun_is_completed_by_the_same_command(
    harvested_run, harvested_template
):
    (harvested_run / "acts.zarr" / "group_00" / "layer" / "zarr.json").unlink()
    for record in (harvested_run / "manifest").glob("shard-*"):
        record.unlink()  # what a re-run did before: every shard marked failed and forgotten
    r = cli(["harvest", "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 0 and "4/4 shards done" in r.output, r.output
    assert store_bytes(harvested_run) == store_bytes(harvested_template)


def test_the_shard_recheck_never_forgets_shards_for_a_store_wide_problem(harvested_run):
    from ghsae.harvest.steps import recheck_done_shards

    (harvested_run / "acts.zarr" / "group_01" / "pos" / "zarr.json").unlink()
    run = Run.open(harvested_run)
    with pytest.raises(StoreError, match="zarr.json is missing or damaged; re-run `ghsae harvest --run-dir"):
        recheck_done_shards(run, list(range(run.plan.n_shards)))
    assert run.done_shards() == list(range(run.plan.n_shards))
