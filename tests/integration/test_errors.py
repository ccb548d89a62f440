"""Bad input gets a clear error (exit 2, one line saying what and how to fix) and writes nothing misleading."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import tiny_config
from ghsae.cli import main
from ghsae.config import to_toml
from ghsae.layout import RunLayout


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def write_config(tmp_path, cfg):
    path = tmp_path / "pipeline.toml"
    path.write_text(to_toml(cfg))
    return path


def assert_refused(result, message: str, run=None):
    assert result.exit_code == 2, result.output
    assert "ghsae: error:" in result.output and message in result.output, result.output
    if run is not None:
        layout = RunLayout(run)
        assert not layout.config.exists() and not layout.plan.exists(), "a refused harvest must not leave a run behind"


def test_missing_model(tmp_path, text_dataset, tiny_llama):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    r = run_cli(
        ["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--model", str(tmp_path / "nope")]
    )
    assert_refused(r, "not found", tmp_path / "run")


def test_missing_dataset(tmp_path, tiny_llama, text_dataset):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    r = run_cli(
        ["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "x.jsonl")]
    )
    assert_refused(r, "not found", tmp_path / "run")


def test_jsonl_without_the_text_field(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": "w1 w2"}) for _ in range(10)))
    cfg = write_config(tmp_path, tiny_config(tiny_llama, data))
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert_refused(r, "has no field 'text'; found body", tmp_path / "run")


def test_empty_dataset(tmp_path, tiny_llama):
    data = tmp_path / "d.txt"
    data.write_text("\n\n")
    cfg = write_config(tmp_path, tiny_config(tiny_llama, data))
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert_refused(r, "holds no text", tmp_path / "run")


def test_too_small_dataset_says_how_much_it_has(tmp_path, tiny_llama):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(["w1"] * 300))
    cfg = write_config(tmp_path, tiny_config(tiny_llama, data))
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert_refused(r, "lower --tokens or add data", tmp_path / "run")


def test_layers_out_of_range(tmp_path, tiny_llama, text_dataset):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset, **{"grouping.layers": [0, 9]}))
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert_refused(r, "grouping.layers is [0, 9] but the model has layers 0..5", tmp_path / "run")


def test_context_longer_than_the_model_allows(tmp_path, tiny_llama, text_dataset):
    cfg = tiny_config(
        tiny_llama,
        text_dataset,
        **{
            "data.context_length": 256,
            "harvest.shard_tokens": 1024,
            "harvest.probe_tokens": 1024,
            "harvest.tokens": 2048,
        },
    )
    r = run_cli(["harvest", "--config", str(write_config(tmp_path, cfg)), "--run-dir", str(tmp_path / "run")])
    assert_refused(r, "allows at most 128 positions", tmp_path / "run")


def test_run_folder_with_a_different_config_is_refused_then_overwritten_on_request(tmp_path, tiny_llama, text_dataset):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    run = tmp_path / "run"
    assert run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]).exit_code == 0
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--seed", "7", "--no-progress"])
    assert_refused(r, "harvest.seed: 0 in the run, 7 now")
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--seed", "7", "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["identity"]["harvest"]["seed"] == 7


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path, tiny_llama, text_dataset):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(folder), "--overwrite"])
    assert_refused(r, "not a ghsae run folder")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("flag, value, message", [("--shard", "2/2", "0 <= i < n"), ("--groups", "x-y", "--groups")])
def test_malformed_flags(tmp_path, tiny_llama, text_dataset, flag, value, message):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), flag, value])
    assert_refused(r, message, tmp_path / "run")


def test_info_on_a_folder_without_a_plan(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli(["info", str(tmp_path / "empty")]), "has no plan")


def test_a_run_killed_before_config_json_resumes_and_refuses_other_configs(tmp_path, tiny_llama, text_dataset):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    run = tmp_path / "run"
    assert (
        run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--plan-only", "--no-progress"]).exit_code == 0
    )
    (run / "config.json").unlink()  # as if killed between the plan's rename and config.json
    for p in list(run.iterdir()):
        if p.name not in ("plan", "ghsae-run.json", ".locks"):
            shutil.rmtree(p)
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--seed", "9", "--no-progress"])
    assert_refused(r, "config hash")
    # the same config resumes from that plan
    r = run_cli(["harvest", "--config", str(cfg), "--run-dir", str(run), "--no-progress"])
    assert r.exit_code == 0, r.output
