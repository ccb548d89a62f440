"""Every exported folder, and the export as a whole, carries a README.md model card with Hub metadata."""

from __future__ import annotations

import pytest
from huggingface_hub import metadata_load
from runs import cli

from ghsae.atomic import write_parquet_atomic
from ghsae.layout import REPORT_METRICS, RunLayout
from ghsae.run import Run

FORMATS = [("saelens", "blocks.4.hook_resid_post"), ("sparsify", "layers.4")]


def export(fitted_run, out, fmt):
    result = cli(["export", fitted_run, out, "--format", fmt])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("fmt", "folder"), FORMATS)
def test_each_folder_has_a_card_naming_model_layer_hookpoint_architecture_and_tokens(tmp_path, fitted_run, fmt, folder):
    out = tmp_path / "out"
    export(fitted_run, out, fmt)
    run = Run.open(fitted_run)
    card = (out / folder / "README.md").read_text()
    meta = metadata_load(out / folder / "README.md")
    assert meta is not None and {"sparse-autoencoder", "ghsae", fmt} <= set(meta["tags"])
    assert meta.get("library_name") == ("saelens" if fmt == "saelens" else None)
    assert "base_model" not in meta, "a model folder is no Hub id"
    tokens = run.sae_record("group_01").tokens
    for fact in (run.plan.model.source, "resid_post", "layer 4", "topk, k = 4, d_in = 32, d_sae = 64", f"{tokens:,}"):
        assert fact in card, fact
    assert "None: the run had no report" in card
    whole = (out / "README.md").read_text()
    assert "layers 0-5" in whole and metadata_load(out / "README.md")["tags"] == meta["tags"]


def test_the_card_shows_the_report_figures_of_each_layer(tmp_path, fitted_run):
    rows = [
        {"kind": kind, "seed": 0, "layer": layer, "sae": "x", "fvu": 0.1 + layer / 100 + bump, "l0": 4.0, "kl": float("nan")}
        for layer in range(6)
        for kind, bump in (("group", 0.0), ("baseline", 0.5))
    ]
    path = RunLayout(fitted_run).report_file(REPORT_METRICS)
    path.parent.mkdir(exist_ok=True)
    write_parquet_atomic(path, rows)
    out = tmp_path / "out"
    export(fitted_run, out, "saelens")
    card = (out / "blocks.4.hook_resid_post" / "README.md").read_text()
    assert "| layer | FVU | L0 |" in card and "| 4 | 0.140 | 4.0 |" in card
    assert "0.640" not in card, "the per-layer baseline's figures are not this SAE's"
    assert "| 5 | 0.150 | 4.0 |" in (out / "README.md").read_text()


def test_a_hub_model_id_becomes_the_cards_base_model():
    from ghsae.train.model_card import ExportFacts, front_matter

    facts = ExportFacts("saelens", "HuggingFaceTB/SmolLM2-135M", "LlamaForCausalLM", "resid_post", "d", 64, "h", "r", False)
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M"' in front_matter(facts)
