"""The run folder is the one source of a run's settings: later commands start from them, record what
they used, and refuse other fit settings unless asked to overwrite (issue 11)."""

from __future__ import annotations

import json
import tomllib

from runs import assert_one_line_error, cli

from ghsae.run import Run


def test_fit_without_config_trains_with_the_runs_fit_settings_not_the_default(harvested_run, small_cfg):
    # the run was harvested with a tiny [fit] (expansion 2, 512 tokens); the embedded default is x16
    r = cli(["fit", "--run-dir", harvested_run, "--group", "group_00", "--no-progress"])
    assert r.exit_code == 0, r.output
    record = Run.open(harvested_run).sae_record("group_00")
    assert record.sae["n_latents"] == small_cfg.fit.expansion * 32
    assert record.tokens >= small_cfg.fit.tokens
    saved = dict(Run.open(harvested_run).fit_settings().fit)
    # the device is the machine's (auto here), not the run's; every other setting is the run's
    assert saved.pop("device") == "auto"
    assert saved == {k: v for k, v in small_cfg.to_dict()["fit"].items() if k != "device"}


def test_a_flag_that_changes_the_runs_fit_settings_is_refused_with_the_key(fitted_run):
    r = cli(["fit", "--run-dir", fitted_run, "--tokens", "1024", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.tokens: 512 in the run, 1024 now")
    r = cli(["fit", "--run-dir", fitted_run, "--tokens", "1024", "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    run = Run.open(fitted_run)
    assert run.fit_settings().fit["tokens"] == 1024
    assert all(run.sae_record(g).tokens >= 1024 for g in run.plan.group_names)


def test_the_report_records_its_settings_and_takes_the_seed_from_the_runs_fit(tmp_path, fitted_run, small_cfg):
    # a --config for an existing run replaces [report] only: its [fit] seed is not the run's
    other = small_cfg.to_dict()
    other["fit"]["seed"] = 7
    other["report"]["ce_tokens"] = 64
    config = tmp_path / "other.toml"
    from ghsae.config import config_from_dict, to_toml

    config.write_text(to_toml(config_from_dict(other)))
    r = cli(["report", "--config", config, "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    saved = json.loads((fitted_run / "report" / "settings.json").read_text())
    assert saved["seed"] == small_cfg.fit.seed != 7
    assert saved["report"]["ce_tokens"] == 64
    assert saved["model"] == {"path": small_cfg.model.path, "device": "auto", "dtype": small_cfg.model.dtype}


def test_the_report_refuses_an_sae_trained_with_other_settings_than_the_runs(fitted_run):
    r = cli(["fit", "--run-dir", fitted_run, "--group", "group_01", "--tokens", "1024", "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    # the run now records tokens 1024, but group_00 was trained on 512
    r = cli(["report", "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "SAE group_00 was trained with other fit settings than the run's")
    assert "fit.tokens: 512 in the SAE, 1024 now" in r.output and "--group group_00 --overwrite" in r.output


def test_ghsae_config_prints_a_runs_settings_as_toml(fitted_run, small_cfg):
    r = cli(["config", fitted_run])
    assert r.exit_code == 0, r.output
    printed = tomllib.loads(r.output)
    assert printed["fit"]["tokens"] == small_cfg.fit.tokens
    assert printed["grouping"]["groups"] == small_cfg.grouping.groups
    default = tomllib.loads(cli(["config"]).output)
    assert default["fit"]["expansion"] == 16


def test_harvest_without_config_resumes_a_run_with_its_own_settings(harvested_run):
    (harvested_run / "manifest" / "shard-00003.json").unlink()
    r = cli(["harvest", "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 shards" in r.output and "4/4 shards done" in r.output
