"""The native SAE folder's cfg.json says it is ghsae's ("format"), since sparsify names its files
alike (cfg.json + sae.safetensors) with another layout; folders from before the mark still load."""

from __future__ import annotations

import json

import pytest
from runs import cli

from ghsae.errors import GhsaeError
from ghsae.sae import load_sae

GROUP = "group_00"


def test_a_fitted_sae_folder_is_marked_as_ghsae_format(fitted_run):
    record = json.loads((fitted_run / "saes" / GROUP / "cfg.json").read_text())
    assert (record["format"], record["version"]) == ("ghsae-sae", 1)


def test_a_folder_written_before_the_format_mark_still_loads_and_verifies(fitted_run):
    cfg = fitted_run / "saes" / GROUP / "cfg.json"
    record = json.loads(cfg.read_text())
    del record["format"], record["version"]
    cfg.write_text(json.dumps(record))
    assert load_sae(cfg.parent).cfg.layers == [0, 1, 2]
    assert cli(["verify", fitted_run]).exit_code == 0


def test_a_folder_of_another_format_is_refused_naming_its_format(fitted_run):
    cfg = fitted_run / "saes" / GROUP / "cfg.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "format": "other-sae"}))
    with pytest.raises(GhsaeError, match="its format is 'other-sae', not a ghsae SAE folder"):
        load_sae(cfg.parent)
