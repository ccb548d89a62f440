"""A careless or hostile user's input gets one line (exit 2) naming the value and the fix, never a
traceback; and what used to pass silently (a folder that is not a run, --workers 1000, 1e10 passes,
a task the model cannot do) is refused or said out loud."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
from runs import assert_one_line_error, cli, ghsae, write_config
from test_concurrency import finish, start, wait_stopped

from ghsae import faults
from ghsae.errors import ConfigError, DatasetError
from ghsae.faults import FAULT_ENV
from ghsae.harvest.text import iter_documents


def refused(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    for word in words:
        assert_one_line_error(r.output, word)


# --- item 13: tracebacks that become one line ---------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "mps", "meta", ""])
def test_fit_refuses_a_device_ghsae_cannot_run_on(harvested_run, device):
    r = cli(["fit", "--run-dir", harvested_run, "--device", device, "--no-progress"])
    refused(r, f"fit.device (--device) is {device!r}; expected auto, cpu, cuda or cuda:N")


@pytest.mark.parametrize("device", ["gpu", "mps", "meta", "", "cuda:x"])
def test_report_refuses_a_device_ghsae_cannot_run_on(fitted_run, device):
    r = cli(["report", "--run-dir", fitted_run, "--device", device, "--no-progress"])
    refused(r, f"report.device (--device) is {device!r}; expected auto, cpu, cuda or cuda:N")


def test_report_on_a_missing_cuda_device_names_the_report_option(fitted_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = cli(["report", "--run-dir", fitted_run, "--device", "cuda", "--no-progress"])
    refused(r, "report.device (--device) is cuda but torch sees no CUDA device")


@pytest.mark.parametrize("address", ["garbage", "tcp://", "http://localhost:8786"])
def test_a_scheduler_address_dask_cannot_parse_is_named(harvested_run, address):
    r = cli(["fit", "--run-dir", harvested_run, "--scheduler", address, "--no-progress"])
    refused(r, f"--scheduler is {address!r}, not a dask scheduler address", "tcp://host:8786")


@pytest.mark.parametrize("command", ["harvest", "run", "sweep"])
def test_a_dangling_symlink_as_run_dir_is_named_and_its_target_not_created(tmp_path, small_cfg, command):
    link, target = tmp_path / "link", tmp_path / "gone"
    link.symlink_to(target)
    r = cli([command, "--config", write_config(tmp_path, small_cfg), "--run-dir", link, "--no-progress"])
    refused(r, f"--run-dir {link} is a symbolic link to {target}, which does not exist")
    assert not target.exists()


@pytest.mark.parametrize("command", ["harvest", "run", "sweep"])
def test_more_tokens_than_the_disk_holds_are_refused_before_any_folder_is_made(tmp_path, small_cfg, command):
    run = tmp_path / "run"
    r = cli([command, "--config", write_config(tmp_path, small_cfg), "--run-dir", run, "--tokens", 999999999999999])
    refused(r, "harvest.tokens (--tokens) is 999,999,999,999,999: its token array alone needs", "lower --tokens")
    assert not run.exists()


@pytest.mark.parametrize(
    "line, message",
    [("lr = nan", "fit.lr is nan; expected a finite number"), ("lr = inf", "fit.lr is inf; expected a finite number"),
     ("lr = -0.5", "fit.lr is -0.5; expected 0 or more"), ("grad_clip = -1.0", "fit.grad_clip is -1.0; expected 0 or more"),
     ("decay_fraction = nan", "fit.decay_fraction is nan")],
)  # fmt: skip
def test_a_learning_setting_that_is_not_a_finite_number_is_refused(tmp_path, small_cfg, harvested_run, line, message):
    config = write_config(tmp_path, small_cfg)
    text = config.read_text()
    key = line.split(" = ")[0]
    at = text.index("[fit]")
    config.write_text(text[:at] + text[at:].replace(f"\n{key} = ", f"\n{line}\n#", 1))
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--no-progress"])
    refused(r, message)


@pytest.fixture
def fault_env(monkeypatch):
    def arm(value: str) -> None:
        monkeypatch.setenv(FAULT_ENV, value)
        faults.reload()

    yield arm
    monkeypatch.delenv(FAULT_ENV, raising=False)
    faults.reload()


@pytest.mark.parametrize("value", ["boom", "kill", "explode@shard-00000/claimed", "kill@", "kill@x,@y"])
def test_a_malformed_fault_spec_is_refused_up_front_and_at_every_point(fitted_run, fault_env, value):
    fault_env(value)
    r = cli(["info", fitted_run])
    refused(r, f"{FAULT_ENV} holds", "expected ACTION@POINT")
    with pytest.raises(ConfigError, match="expected ACTION@POINT"):
        faults.point("shard-00000/claimed")


def test_a_well_formed_fault_spec_is_accepted(fitted_run, fault_env):
    fault_env("kill@nowhere,stop@nowhere-else")
    assert cli(["info", fitted_run]).exit_code == 0


# --- item 14: what used to pass silently or point the wrong way ----------------------------------


def test_config_of_a_folder_that_is_not_a_run_is_refused_not_the_defaults(tmp_path, text_dataset):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("x")
    r = cli(["config", folder])
    refused(r, f"{folder} is not a ghsae run")


def test_config_of_a_run_prints_its_settings(fitted_run, small_cfg):
    r = cli(["config", fitted_run])
    assert r.exit_code == 0 and f'path = "{small_cfg.model.path}"' in r.output


@pytest.mark.parametrize("command", [["info"], ["verify"], ["config"], ["report", "--device", "cpu", "--run-dir"]])
def test_a_model_folder_given_as_a_run_is_named_a_model_folder(tiny_llama, command):
    r = cli([*command, tiny_llama])
    refused(r, f"{tiny_llama} is a model folder (model.safetensors), not a run", f"--model {tiny_llama}")


def test_a_model_folder_given_as_baseline_is_named_a_model_folder(fitted_run, tiny_llama):
    r = cli(["report", "--run-dir", fitted_run, "--baseline", tiny_llama, "--device", "cpu", "--no-progress"])
    refused(r, f"{tiny_llama} is a model folder")


@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_sweep_folder_given_as_a_run_names_its_runs(tmp_path, fitted_run, command):
    import shutil

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "ghsae-sweep.json").write_text("{}")
    shutil.copytree(fitted_run, sweep / "G2")
    r = cli([command, sweep])
    refused(r, f"{sweep} is a sweep folder, not a run; pass one of its runs: {sweep / 'G2'}")


def test_an_sae_folder_given_as_a_run_names_its_run(fitted_run):
    r = cli(["verify", fitted_run / "saes" / "group_00"])
    refused(r, "is an SAE folder, not a run; pass the run folder it belongs to")


def test_more_workers_than_cores_are_capped_with_a_warning(monkeypatch, caplog):
    import dask.distributed

    from ghsae import executors

    started = {}

    class FakeCluster:
        def __init__(self, n_workers, **kwargs):
            started["workers"] = n_workers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(executors, "usable_cores", lambda: 2)
    monkeypatch.setattr(dask.distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(executors, "DaskCluster", lambda client, progress: "cluster")
    monkeypatch.setattr(dask.distributed, "Client", lambda cluster: cluster)
    with caplog.at_level(logging.WARNING), executors.open_executor(workers=1000):
        pass
    assert started["workers"] == 2
    assert "--workers 1000 is more than the 2 cores" in caplog.text and "starting 2 workers" in caplog.text


def test_fit_tokens_of_absurdly_many_passes_are_refused_with_the_number(harvested_run):
    r = cli(["fit", "--run-dir", harvested_run, "--tokens", 99999999999999, "--no-progress"])
    refused(r, "fit.tokens (--tokens) is 99,999,999,999,999:", "passes over the", "rows stored for group_00")
    assert not (harvested_run / "saes" / "group_00").exists()


def test_a_text_file_as_model_is_named_not_a_model(tmp_path, small_cfg):
    model = tmp_path / "model.txt"
    model.write_text("hello\n")
    r = cli(["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", tmp_path / "run", "--model", model])
    refused(r, f"model {model} is a file (text, 6 bytes, starting b'hello\\n'), not a model")
    assert "network" not in r.output


def test_a_fake_gguf_is_named_not_a_gguf_file(tmp_path, small_cfg):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"\x00\x01 not a gguf")
    r = cli(["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", tmp_path / "run", "--model", model])
    refused(r, f"model file {model} is not a GGUF file (binary", "starts with b'GGUF'")
    assert "network" not in r.output


def test_a_model_folder_without_tokenizer_files_says_which_are_missing(tmp_path, small_cfg, tiny_llama):
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, model / name)
    r = cli(["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", tmp_path / "run", "--model", model])
    refused(r, f"model folder {model} has no tokenizer files (none of tokenizer.json, tokenizer.model")
    assert "network" not in r.output


def test_fit_config_reads_only_its_own_section(tmp_path, small_cfg, harvested_run):
    config = write_config(tmp_path, small_cfg)
    text = config.read_text()
    config.write_text(text.replace("\ntokens = 2048\n", "\ntokens = -5\n", 1))  # [harvest] tokens
    assert "tokens = -5" in config.read_text()
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--group", "group_00", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "harvest.tokens" not in r.output


def test_a_circuit_task_the_model_cannot_do_is_warned_about(tmp_path_factory, caplog):
    import torch
    from circuit_fixtures import save_task_llama
    from test_circuits import _relabelled, _sae

    from ghsae.analysis import tasks as T
    from ghsae.analysis.circuits import CircuitTarget, TaskRunner, run_task
    from ghsae.lm import load_model

    lm = load_model(str(save_task_llama(tmp_path_factory.mktemp("taskllama"))), "cpu", "float32")
    task = T.make_task("ioi", lm.tokenizer, 8, 2)
    runner = TaskRunner(lm, task, [1], batch_prompts=8)
    target = [CircuitTarget("group_00", "group", _sae([1], lm.d_model, m=8))]
    with caplog.at_level(logging.WARNING), torch.no_grad():
        result = run_task(lm, _relabelled(task, runner, False), target, grid=[0, 8])
    assert not result.check.solved
    assert "ioi: the model gets 0% of its 8 prompts right, under report.task_min_accuracy (70%)" in caplog.text


def test_sweep_groupings_beyond_the_models_layers_are_refused_before_tokenising(tmp_path, small_cfg, monkeypatch):
    import ghsae.harvest.plan as plan_mod

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised before checking --groups")

    monkeypatch.setattr(plan_mod, "write_contexts", no_tokenising)
    sweep = tmp_path / "sweep"
    r = cli(["sweep", "--config", write_config(tmp_path, small_cfg), "--run-dir", sweep, "--groups", "2,99", "--no-progress"])
    refused(r, "--groups) is 99 but only 6 layers are harvested", "expected at most 5 groups of layers 0..4")
    assert not sweep.exists()


def test_a_sweep_grouping_of_every_layer_is_refused_before_tokenising_when_the_last_has_its_own_sae(
    tmp_path, small_cfg, monkeypatch
):
    import ghsae.harvest.plan as plan_mod

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised before checking --groups")

    monkeypatch.setattr(plan_mod, "write_contexts", no_tokenising)
    assert small_cfg.grouping.last_layer == "own"  # G counts the groups of layers 0..4
    sweep = tmp_path / "sweep"
    r = cli(["sweep", "--config", write_config(tmp_path, small_cfg), "--run-dir", sweep, "--groups", "2,6", "--no-progress"])
    refused(r, "--groups) is 6 but only 6 layers are harvested", "expected at most 5 groups", "grouping.last_layer")
    assert not sweep.exists()


def test_a_second_overwrite_under_a_live_one_says_a_process_holds_the_run_lock(tmp_path, small_cfg, harvested_run):
    args = ["harvest", "--config", write_config(tmp_path, small_cfg), "--run-dir", harvested_run, "--no-progress"]
    with open(tmp_path / "a.log", "w") as la:
        a = start([*args, "--seed", "7", "--overwrite"], "stop@shard-00001/claimed", la)
        wait_stopped(a)
        b = ghsae([*args, "--seed", "8", "--overwrite"])
        os.kill(a.pid, signal.SIGCONT)
        assert finish(a) == 0
    assert b.returncode == 2
    assert_one_line_error(b.stderr, "holds its run lock); wait for it to finish (or stop it), then re-run this command")
    assert "re-run with --overwrite" not in b.stderr


@pytest.mark.parametrize("block_lines", [3, 30_000])  # a bad line in pyarrow's first block, and past it
def test_a_bad_jsonl_line_is_named_by_its_line_number_from_one(tmp_path, block_lines):
    path = tmp_path / "docs.jsonl"
    good = json.dumps({"text": "a sentence of some length to fill the block " * 2}) + "\n"
    path.write_text(good * (block_lines - 1) + "not json\n" + good)
    with pytest.raises(DatasetError, match=f"docs.jsonl line {block_lines} is not valid JSON"):
        list(iter_documents(str(path), "text", "input_ids"))


def test_a_jsonl_text_field_of_another_type_is_named_by_its_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "hello"}\n{"text": 5}\n')
    with pytest.raises(DatasetError, match="docs.jsonl line 2: 'text' holds 5 \\(int\\), not a string"):
        list(iter_documents(str(path), "text", "input_ids"))
