"""`ghsae export --format saelens`: SAELens loads each layer's folder and reconstructs like ghsae."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_fit import harvested

from conftest import needs_module
from ghsae.cli import main
from ghsae.pipeline import fit
from ghsae.sae import SAEConfig, build_sae
from ghsae.train.export import write_saelens_folder

pytestmark = needs_module("sae_lens", "pip install -e '.[saelens]' (.ci/run installs it)")

LAYERS = [4, 5, 6]


def trained_looking_sae(arch: str, d: int = 24, m: int = 96):
    """An SAE with random weights and non-trivial per-layer normalisation (scale and mean)."""
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(architecture=arch, d_model=d, n_latents=m, layers=LAYERS, k=7))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(m).uniform_(-3, 0))
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    sae.set_normalisation(torch.tensor([0.05, 0.2, 3.0]), torch.randn(len(LAYERS), d) * 4)
    return sae.eval()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_loads_the_export_and_matches_ghsae_per_layer(tmp_path, arch):
    from sae_lens import SAE

    sae = trained_looking_sae(arch)
    for i, layer in enumerate(LAYERS):
        folder = tmp_path / f"layer_{layer}"
        write_saelens_folder(sae, layer, folder, {"model_name": "tiny"})
        loaded = SAE.load_from_disk(str(folder))
        assert loaded.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        # raw activations of the layer's own magnitude and offset
        x = torch.randn(64, 24) / sae.norm_scale[i] + sae.norm_mean[i]
        with torch.no_grad():
            ours_z, ours_x = sae.encode(x, layer), sae.reconstruct(x, layer)
            their_z = loaded.encode(x)
            their_x = loaded.decode(their_z)
        assert (ours_z > 0).sum() > 0, "the test must exercise active latents"
        assert torch.equal(ours_z > 0, their_z > 0), "the same latents must fire"
        torch.testing.assert_close(their_z, ours_z, rtol=1e-4, atol=1e-4 * float(ours_z.abs().max()))
        rel = (their_x - ours_x).norm() / ours_x.norm()
        assert rel < 1e-4, f"layer {layer}: relative reconstruction difference {rel:.2e}"


def test_export_command_writes_one_folder_per_layer_and_refuses_to_overwrite(
    tmp_path, tiny_llama, text_dataset, tiny_lm
):
    from sae_lens import SAE

    cfg, layout = harvested(
        tmp_path, tiny_llama, text_dataset, tiny_lm, **{"fit.expansion": 2, "fit.k": 4, "fit.tokens": 1024}
    )
    fit(cfg, layout.root, progress=False)
    out = tmp_path / "saelens"
    result = CliRunner().invoke(main, ["export", str(layout.root), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"layer_{i}" for i in range(6)]
    loaded = SAE.load_from_disk(str(out / "layer_4"))
    meta = loaded.cfg.metadata
    assert (meta.ghsae_group, meta.ghsae_group_layers, loaded.cfg.d_in) == ("group_01", [3, 4, 5], 32)
    again = CliRunner().invoke(main, ["export", str(layout.root), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["export", str(layout.root), str(out), "--overwrite"]).exit_code == 0


def test_export_of_a_run_without_trained_saes_is_refused(tmp_path, tiny_llama, text_dataset, tiny_lm):
    _, layout = harvested(tmp_path, tiny_llama, text_dataset, tiny_lm)
    result = CliRunner().invoke(main, ["export", str(layout.root), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no trained SAE for group_00, group_01" in result.output


def test_a_plan_that_is_not_a_plan_record_is_refused_as_damaged(tmp_path):
    run = tmp_path / "run"
    (run / "plan").mkdir(parents=True)
    (run / "plan" / "plan.json").write_text(json.dumps({"layers": [0, 1], "groups": [[0], [1]]}))
    result = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "plan.json is damaged: not a Plan record (KeyError: 'config_hash')" in result.output
