"""--overwrite removes only what ghsae wrote, and never touches a folder that is not a ghsae run."""

from __future__ import annotations

import json

from runs import assert_one_line_error, cli, files, write_config


def test_overwrite_on_a_model_folder_leaves_it_untouched(tmp_path, tiny_models, small_cfg):
    model = tiny_models["gpt2"]
    before = files(model)
    config = write_config(tmp_path, small_cfg)
    # the model folder as the run folder, and as the model: it must be neither wiped nor written into
    r = cli(["harvest", "--config", config, "--run-dir", model, "--model", model, "--overwrite", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "not a ghsae run folder")
    assert files(model) == before


def test_overwrite_keeps_the_users_own_files_in_a_run_folder(tmp_path, harvested_run, small_cfg):
    (harvested_run / "NOTES.md").write_text("my notes")
    (harvested_run / "analysis").mkdir()
    (harvested_run / "analysis" / "nb.ipynb").write_text("{}")
    config = write_config(tmp_path, small_cfg)
    r = cli(["harvest", "--config", config, "--run-dir", harvested_run, "--seed", "5", "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (harvested_run / "NOTES.md").read_text() == "my notes"
    assert (harvested_run / "analysis" / "nb.ipynb").read_text() == "{}"
    assert json.loads((harvested_run / "config.json").read_text())["identity"]["harvest"]["seed"] == 5
    assert json.loads((harvested_run / "ghsae-run.json").read_text())["format"] == "ghsae-run"


def test_a_ghsae_looking_config_json_alone_does_not_make_a_run_folder(tmp_path, small_cfg):
    folder = tmp_path / "notarun"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"identity": {}, "resolved": {}, "hash": "x"}))
    config = write_config(tmp_path, small_cfg)
    r = cli(["harvest", "--config", config, "--run-dir", folder, "--overwrite", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "not a ghsae run folder")
    assert [p.name for p in folder.iterdir()] == ["config.json"]


def test_a_run_made_before_the_marker_is_still_recognised_and_resumes(tmp_path, harvested_run, small_cfg):
    (harvested_run / "ghsae-run.json").unlink()
    config = write_config(tmp_path, small_cfg)
    r = cli(["harvest", "--config", config, "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "in 0 shards" in r.output and (harvested_run / "ghsae-run.json").is_file()
