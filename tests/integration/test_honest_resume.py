"""A re-fit continues only what was begun with the same settings on the same store; anything else is
refused with the differing keys, or started over with --overwrite. Checkpoints load weights-only."""

from __future__ import annotations

import shutil

import torch
from runs import assert_one_line_error, cli, small_config, write_config
from safetensors.torch import load_file

from ghsae.harvest.steps import ShardSlice
from ghsae.pipeline import fit, harvest

GROUP = "group_00"


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "saes" / GROUP / "sae.safetensors"))


def test_a_refit_with_another_lr_is_refused_then_started_over_on_request(tmp_path, fitted_run, small_cfg):
    config = write_config(tmp_path, small_cfg)
    args = ["fit", "--config", config, "--run-dir", fitted_run, "--group", GROUP, "--no-progress"]
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace("lr = 0.003", "lr = 0.01"))
    r = cli([*args[:2], other, *args[3:]])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "saes/fit.json: this run's SAEs are trained with other fit settings (fit.lr: 0.003 in the run, 0.01 now)")
    # a run from before saes/fit.json existed: its trained SAEs' records stand in for it, and the
    # refused fit writes no fit.json (it would record settings no SAE was trained with)
    (fitted_run / "saes" / "fit.json").unlink()
    r = cli([*args[:2], other, *args[3:]])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.lr: 0.003 in the trained SAE group_00, 0.01 now")
    assert not (fitted_run / "saes" / "fit.json").exists()
    # and beneath both, each checkpoint (a fit killed before any SAE was finished)
    for folder in (fitted_run / "saes").iterdir():
        (folder / "sae.safetensors").unlink()
    r = cli([*args[:2], other, *args[3:]])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.lr: 0.003 in the checkpoint, 0.01 now")
    r = cli([*args[:2], other, *args[3:], "--overwrite"])
    assert r.exit_code == 0, r.output
    # started over: the same weights as a fresh fit with lr 0.01
    fresh = tmp_path / "fresh"
    shutil.copytree(fitted_run, fresh)
    shutil.rmtree(fresh / "saes")
    fit(small_config(*_model_and_data(small_cfg), **{"fit.lr": 0.01}), fresh, groups=[GROUP], progress=False)
    for name, tensor in weights(fresh).items():
        assert torch.equal(tensor, weights(fitted_run)[name]), name


def _model_and_data(cfg):
    from pathlib import Path

    return Path(cfg.model.path), Path(cfg.data.dataset)


def test_a_fit_begun_with_allow_partial_is_not_continued_on_the_completed_store(
    tmp_path, small_cfg, tiny_lm, fitted_run
):
    run = tmp_path / "partial"
    harvest(small_cfg, run, shards=ShardSlice(0, 2), progress=False, lm=tiny_lm)
    fit(small_cfg, run, groups=[GROUP], allow_partial=True, progress=False)
    harvest(small_cfg, run, shards=ShardSlice(1, 2), progress=False, lm=tiny_lm)
    config = write_config(tmp_path, small_cfg)
    r = cli(["fit", "--config", config, "--run-dir", run, "--group", GROUP, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "store.shards: [0, 2] in the trained SAE, [0, 1, 2, 3] now")
    assert "--allow-partial" in r.output
    r = cli(["fit", "--config", config, "--run-dir", run, "--group", GROUP, "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    # the result is that of a clean fit on the complete store
    for name, tensor in weights(fitted_run).items():
        assert torch.equal(tensor, weights(run)[name]), name


def test_a_fit_with_nothing_to_do_writes_nothing(tmp_path, fitted_run, small_cfg):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in fitted_run.rglob("*")}
    r = cli(["fit", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "nothing to do" in r.output
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in fitted_run.rglob("*")} == before


def test_a_checkpoint_is_loaded_weights_only(tmp_path, fitted_run, small_cfg, caplog):
    """A checkpoint that would run code when unpickled is treated as damaged (the SAE trains from the
    start, with a warning), and the code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (fitted_run / "saes" / GROUP / "sae.safetensors").unlink()
    torch.save({"sae": Payload()}, fitted_run / "saes" / GROUP / "checkpoint.pt")
    r = cli(["fit", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--group", GROUP])
    assert r.exit_code == 0, r.output
    assert "checkpoint.pt is damaged (not a readable ghsae checkpoint" in caplog.text
    assert "training this SAE from the start" in caplog.text
    assert not marker.exists()
