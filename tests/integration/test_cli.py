from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import tiny_config
from ghsae.cli import main
from ghsae.config import to_toml


def test_harvest_flags_override_pipeline_toml_and_info_prints_one_json_object(tmp_path, tiny_models, text_dataset):
    # the file names the llama model and auto grouping; the flags ask for GPT-2, per-layer, 1024 tokens, seed 3
    cfg_path = tmp_path / "pipeline.toml"
    cfg_path.write_text(to_toml(tiny_config(tiny_models["llama"], tmp_path / "missing.jsonl")))
    run = tmp_path / "run"
    args = [
        "harvest",
        "--config",
        str(cfg_path),
        "--run-dir",
        str(run),
        "--model",
        str(tiny_models["gpt2"]),
        "--dataset",
        str(text_dataset),
        "--tokens",
        "1024",
        "--seed",
        "3",
        "--groups",
        "per-layer",
        "--no-progress",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "harvested 1,024 token positions" in result.output
    plan = json.loads((run / "plan" / "plan.json").read_text())
    assert plan["model"]["class"] == "GPT2LMHeadModel"
    assert plan["groups"] == [[i] for i in range(6)]
    assert plan["n_contexts_harvest"] == 1024 // 64
    assert json.loads((run / "config.json").read_text())["identity"]["harvest"]["seed"] == 3

    info = CliRunner().invoke(main, ["info", str(run), "--json"], catch_exceptions=False)
    data = json.loads(info.output)
    assert data["groups"] == [[i] for i in range(6)] and data["shards_done"] == data["shards_total"] == 2
    assert data["bytes_per_token"] > 0 and data["per_layer_bytes_per_token"] > 0


def test_plan_only_writes_the_plan_and_no_shard(tmp_path, tiny_llama, text_dataset):
    cfg_path = tmp_path / "pipeline.toml"
    cfg_path.write_text(to_toml(tiny_config(tiny_llama, text_dataset)))
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["harvest", "--config", str(cfg_path), "--run-dir", str(run), "--plan-only", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (run / "plan" / "plan.json").is_file() and (run / "acts.zarr").is_dir()
    assert not list((run / "manifest").glob("shard-*.json"))
    info = json.loads(CliRunner().invoke(main, ["info", str(run), "--json"]).output)
    assert info["shards_missing"] == [0, 1, 2, 3]
