"""An SAE's weights are checked against the checksum its cfg.json records, and a fit's checkpoint
against the digest it carries: a damaged file is refused by every reader (one line naming it and
the fix), retrained by fit, and never resumed. Settings an SAE cannot have, and an export into the
run itself, are refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from runs import assert_one_line_error, cli, ghsae, write_config
from safetensors.torch import load_file

import ghsae as api
from ghsae.config import config_from_dict
from ghsae.errors import GhsaeError
from ghsae.run import Run
from ghsae.sae import SAELoadError, load_sae
from ghsae.train.fit import fit_group

GROUP = "group_00"
DAMAGES = ("flipped-byte", "truncated", "empty", "corrupt-header")


def weights_path(run: Path, group: str = GROUP) -> Path:
    return run / "saes" / group / "sae.safetensors"


def damage(path: Path, how: str) -> None:
    """Damage a safetensors file: one byte flipped inside the tensors' data (the header still parses
    and every shape matches), cut in half, emptied, or its header overwritten."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    if how == "flipped-byte":
        data[8 + header + (len(data) - 8 - header) // 2] ^= 0x40
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    else:
        data[8 : 8 + 16] = b"#" * 16
    path.write_bytes(bytes(data))


def tensors(run: Path, group: str = GROUP) -> dict[str, torch.Tensor]:
    return load_file(str(weights_path(run, group)))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name


def fix_of(run: Path, group: str = GROUP) -> str:
    return f"train it again with `ghsae fit --run-dir {run} --group {group}`"


# --- checksums of the SAE's weights ------------------------------------------------------------


def test_fit_records_the_size_and_sha256_of_each_sae_weights_file(fitted_run):
    for group in ("group_00", "group_01"):
        data = weights_path(fitted_run, group).read_bytes()
        record = json.loads((fitted_run / "saes" / group / "cfg.json").read_text())
        assert record["weights"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_sae_file_is_refused_by_verify_export_and_the_loaders_naming_it_and_the_fix(
    tmp_path, fitted_run, how
):
    damage(weights_path(fitted_run), how)
    expected = f"{weights_path(fitted_run)} is damaged"
    r = cli(["verify", fitted_run])
    assert r.exit_code == 2
    assert expected in r.output and fix_of(fitted_run) in r.output
    r = cli(["export", fitted_run, tmp_path / "export"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, expected)
    assert fix_of(fitted_run) in r.output
    assert not (tmp_path / "export").exists()  # refused before any folder is written
    for load in (lambda: load_sae(fitted_run / "saes" / GROUP), lambda: api.open_run(fitted_run).sae(GROUP)):
        with pytest.raises(SAELoadError, match="is damaged") as e:
            load()
        assert str(weights_path(fitted_run)) in str(e.value) and fix_of(fitted_run) in str(e.value)


@pytest.mark.parametrize("command", ["report", "rate"])
def test_report_and_rate_refuse_a_damaged_sae_file_in_one_line(tmp_path, fitted_run, small_cfg, command):
    damage(weights_path(fitted_run, "group_01"), "flipped-byte")
    config = write_config(tmp_path, small_cfg)
    args = ["report", "--config", config, "--run-dir", fitted_run, "--no-progress", "--tasks", ""]
    if command == "rate":
        args = ["rate", fitted_run, "--config", config, "--latents", 2]
    r = cli(args)
    assert r.exit_code == 2
    assert_one_line_error(r.output, f"{weights_path(fitted_run, 'group_01')} is damaged")
    assert fix_of(fitted_run, "group_01") in r.output


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("flags", [[], ["--group", GROUP], ["--group", GROUP, "--overwrite"]])
def test_fit_trains_a_damaged_sae_again_instead_of_calling_it_trained(
    tmp_path, fitted_run, fitted_template, small_cfg, caplog, how, flags
):
    damage(weights_path(fitted_run), how)
    r = cli(["fit", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress", *flags])
    assert r.exit_code == 0, r.output
    assert f"{GROUP}: already trained" not in r.output
    assert f"{weights_path(fitted_run)} is damaged" in caplog.text and "fit trains it again" in caplog.text
    assert_close(tensors(fitted_run), tensors(fitted_template))
    assert cli(["verify", fitted_run]).exit_code == 0


def test_fit_trains_a_damaged_sae_without_its_checkpoint_from_the_start_to_the_same_weights(
    tmp_path, fitted_run, fitted_template, small_cfg
):
    damage(weights_path(fitted_run), "flipped-byte")
    (fitted_run / "saes" / GROUP / "checkpoint.pt").unlink()
    r = cli(["fit", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"{GROUP} (layers 0-2):" in r.output  # trained, with a final batch FVU
    assert_close(tensors(fitted_run), tensors(fitted_template))


def test_a_damaged_cfg_json_makes_fit_train_the_sae_again(tmp_path, fitted_run, fitted_template, small_cfg):
    (fitted_run / "saes" / GROUP / "cfg.json").write_text("{")
    r = cli(["fit", "--config", write_config(tmp_path, small_cfg), "--run-dir", fitted_run, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"{GROUP}: already trained" not in r.output
    assert_close(tensors(fitted_run), tensors(fitted_template))
    assert cli(["verify", fitted_run]).exit_code == 0


def test_an_sae_folder_without_a_checksum_still_loads_and_verify_calls_it_unchecked(fitted_run, caplog):
    """Folders written before cfg.json recorded the checksum: nothing to check them with."""
    cfg = fitted_run / "saes" / GROUP / "cfg.json"
    record = json.loads(cfg.read_text())
    del record["weights"]
    cfg.write_text(json.dumps(record))
    assert load_sae(cfg.parent).cfg.layers == [0, 1, 2]
    assert Run.open(fitted_run).sae(GROUP).cfg.layers == [0, 1, 2]
    r = cli(["verify", fitted_run])
    assert r.exit_code == 0, r.output
    assert "records no checksum" in caplog.text and "unchecked" in caplog.text


def test_the_public_loader_reads_a_bare_folder_and_refuses_it_damaged(tmp_path, fitted_run):
    bare = tmp_path / "bare"
    shutil.copytree(fitted_run / "saes" / GROUP, bare)
    assert_close(api.load_sae(bare).state_dict(), load_sae(fitted_run / "saes" / GROUP).state_dict())
    record = json.loads((bare / "cfg.json").read_text())
    (bare / "cfg.json").write_text(json.dumps({"sae": record["sae"]}))  # a hand-made folder: no checksum
    assert api.load_sae(bare).cfg.n_latents == record["sae"]["n_latents"]
    damage(bare / "sae.safetensors", "corrupt-header")
    with pytest.raises(SAELoadError, match="sae.safetensors is damaged: not a safetensors file .*restore the folder"):
        api.load_sae(bare)


# --- checkpoints ---------------------------------------------------------------------------------


def flip_inside_largest_tensor(checkpoint: Path) -> None:
    """Flip exponent bits in the middle of the checkpoint's largest tensor (its data, not the header)."""
    with zipfile.ZipFile(checkpoint) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(checkpoint.read_bytes())
    local = entry.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + name_len + extra_len
    for offset in range(start + 3, start + entry.file_size, 64):  # the high byte of every 16th float32
        data[offset] ^= 0x20
    checkpoint.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_of_a_killed_fit_is_not_resumed_and_the_fit_starts_over(
    tmp_path, harvested_run, fitted_template, small_cfg
):
    config = write_config(tmp_path, small_cfg)
    args = ["fit", "--config", config, "--run-dir", harvested_run, "--group", GROUP, "--no-progress"]
    killed = ghsae(args, env={**os.environ, "GHSAE_FAULT": "kill@fit/step-5"})
    checkpoint = harvested_run / "saes" / GROUP / "checkpoint.pt"
    assert killed.returncode != 0 and checkpoint.is_file() and not weights_path(harvested_run).exists()
    flip_inside_largest_tensor(checkpoint)
    resumed = ghsae(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{checkpoint} is damaged (its contents differ from the digest" in resumed.stderr
    assert "training this SAE from the start" in resumed.stderr
    assert_close(tensors(harvested_run), tensors(fitted_template))


def test_a_checkpoint_without_its_digest_is_refused_unless_it_is_an_older_ghsaes(
    tmp_path, fitted_run, small_cfg, caplog
):
    """An older ghsae's checkpoint (its own keys, no digest) is resumed unchecked; one whose digest
    key itself was damaged away is not."""
    checkpoint = fitted_run / "saes" / GROUP / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["digest"]
    weights_path(fitted_run).unlink()
    torch.save(payload, checkpoint)
    config = write_config(tmp_path, small_cfg)
    r = cli(["fit", "--config", config, "--run-dir", fitted_run, "--group", GROUP, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "carries no digest (an older ghsae wrote it); resumed unchecked" in caplog.text
    caplog.clear()
    weights_path(fitted_run).unlink()
    torch.save({**payload, "digesT": "0" * 64}, checkpoint)
    r = cli(["fit", "--config", config, "--run-dir", fitted_run, "--group", GROUP, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "is damaged (its digest is missing); training this SAE from the start" in caplog.text


# --- settings an SAE cannot have, and an export into the run -------------------------------------


def test_a_k_above_the_number_of_latents_is_refused_before_any_training(tmp_path, harvested_run, small_cfg):
    config = write_config(tmp_path, small_cfg)
    config.write_text(config.read_text().replace("\nk = 4\n", "\nk = 5000\n"))
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.k is 5000 but this run's SAEs have 64 latents (fit.expansion 2 x d_model 32)")
    assert "expected fit.k from 1 to 64" in r.output
    assert not (harvested_run / "saes").exists()
    raw = small_cfg.to_dict()
    raw["fit"]["k"] = 5000
    run = Run.open(harvested_run)
    with pytest.raises(GhsaeError, match="fit.k is 5000"):  # a group's own task checks it too
        fit_group(run, config_from_dict(raw), GROUP, run.done_shards(), progress=False)
    assert not (harvested_run / "saes").exists()


@pytest.mark.parametrize("inside", ["saes", ".", "report/saelens"])
def test_an_export_into_the_run_folder_is_refused(fitted_run, inside):
    before = sorted(p.relative_to(fitted_run) for p in fitted_run.rglob("*"))
    r = cli(["export", fitted_run, fitted_run / inside])
    assert r.exit_code == 2
    expected = f"the export destination {fitted_run / inside} is inside the run folder {fitted_run}"
    assert_one_line_error(r.output, expected)
    assert sorted(p.relative_to(fitted_run) for p in fitted_run.rglob("*")) == before
    assert cli(["verify", fitted_run]).exit_code == 0
