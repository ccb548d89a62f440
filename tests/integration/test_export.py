"""`ghsae export --format saelens`: SAELens loads each layer's folder, named by its hook name, and
reconstructs like ghsae; `--unit-decoder` gives unit decoder rows with the same reconstructions."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from runs import assert_one_line_error, cli

from conftest import needs_module
from ghsae.cli import main
from ghsae.sae import SAEConfig, build_sae, load_sae
from ghsae.train.export import hook_name, write_saelens_folder

pytestmark = needs_module("sae_lens", "pip install -e '.[saelens]' (.ci/run installs it)")

LAYERS = [4, 5, 6]
RUN_LAYERS = [f"blocks.{i}.hook_resid_post" for i in range(6)]  # the fitted_run fixture's six layers


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


def raw_activations(sae, i: int, n: int = 64):
    """Activations of layer LAYERS[i]'s own magnitude and offset."""
    return torch.randn(n, sae.cfg.d_model) / sae.norm_scale[i] + sae.norm_mean[i]


def relative(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_loads_the_export_and_matches_ghsae_per_layer(tmp_path, arch):
    from sae_lens import SAE

    sae = trained_looking_sae(arch)
    for i, layer in enumerate(LAYERS):
        folder = tmp_path / hook_name(layer)
        write_saelens_folder(sae, layer, folder, {"model_name": "tiny"})
        loaded = SAE.load_from_disk(str(folder))
        assert loaded.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        x = raw_activations(sae, i)
        with torch.no_grad():
            ours_z, ours_x = sae.encode(x, layer), sae.reconstruct(x, layer)
            their_z = loaded.encode(x)
            their_x = loaded.decode(their_z)
        assert (ours_z > 0).sum() > 0, "the test must exercise active latents"
        assert torch.equal(ours_z > 0, their_z > 0), "the same latents must fire"
        torch.testing.assert_close(their_z, ours_z, rtol=1e-4, atol=1e-4 * float(ours_z.abs().max()))
        assert relative(their_x, ours_x) < 1e-5, f"layer {layer}"


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_a_unit_decoder_export_has_unit_rows_and_reconstructs_like_ghsae(tmp_path, arch):
    from sae_lens import SAE

    sae = trained_looking_sae(arch)
    for i, layer in enumerate(LAYERS):
        folder = tmp_path / hook_name(layer)
        write_saelens_folder(sae, layer, folder, {"model_name": "tiny"}, unit_decoder=True)
        loaded = SAE.load_from_disk(str(folder))
        norms = loaded.W_dec.detach().norm(dim=1)
        assert float((norms - 1).abs().max()) < 1e-5, f"layer {layer}: decoder row norms {norms.min()}..{norms.max()}"
        x = raw_activations(sae, i)
        with torch.no_grad():
            ours_z, ours_x = sae.encode(x, layer), sae.reconstruct(x, layer)
            their_z = loaded.encode(x)
            their_x = loaded.decode(their_z)
        assert torch.equal(ours_z > 0, their_z > 0), "the same latents must fire"
        assert relative(their_x, ours_x) < 1e-5, f"layer {layer}"
        # the layer's scale s moved into the latents: theirs are ghsae's / s
        s = float(sae.norm_scale[i])
        torch.testing.assert_close(their_z * s, ours_z, rtol=1e-4, atol=1e-4 * float(ours_z.abs().max()))


def test_hook_names_follow_saelens_for_every_hookpoint():
    assert [hook_name(3, h) for h in ("resid_post", "resid_mid", "mlp_out", "attn_out")] == [
        "blocks.3.hook_resid_post",
        "blocks.3.hook_resid_mid",
        "blocks.3.hook_mlp_out",
        "blocks.3.hook_attn_out",
    ]


def test_export_command_names_each_folder_by_its_hook_and_refuses_to_overwrite(tmp_path, fitted_run):
    from sae_lens import SAE

    out = tmp_path / "saelens"
    result = CliRunner().invoke(main, ["export", str(fitted_run), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(RUN_LAYERS)
    loaded = SAE.load_from_disk(str(out / "blocks.4.hook_resid_post"))
    meta = loaded.cfg.metadata
    assert meta.hook_name == "blocks.4.hook_resid_post"
    assert (meta.ghsae_group, meta.ghsae_group_layers, loaded.cfg.d_in) == ("group_01", [3, 4, 5], 32)
    again = CliRunner().invoke(main, ["export", str(fitted_run), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["export", str(fitted_run), str(out), "--overwrite"]).exit_code == 0


def test_the_exported_model_class_is_one_saelens_can_load_a_model_with(tmp_path, fitted_run):
    """SAELens's load_model takes HookedTransformer, HookedMamba or AutoModelForCausalLM, not a
    transformers class such as LlamaForCausalLM: with the exported class, an unknown model name
    is what fails (offline), not the class."""
    from sae_lens import SAE
    from sae_lens.load_model import load_model

    out = tmp_path / "saelens"
    assert cli(["export", fitted_run, out]).exit_code == 0
    meta = SAE.load_from_disk(str(out / "blocks.0.hook_resid_post")).cfg.metadata
    assert meta.model_class_name == "HookedTransformer"
    with pytest.raises(ValueError) as failure:
        load_model(meta.model_class_name, "ghsae-no-such-model", device="cpu")
    assert "Unknown model class" not in str(failure.value) and "ghsae-no-such-model" in str(failure.value)


def test_the_unit_decoder_flag_of_the_command_gives_unit_rows_with_unchanged_reconstructions(tmp_path, fitted_run):
    from sae_lens import SAE

    out = tmp_path / "saelens"
    assert cli(["export", fitted_run, out, "--unit-decoder"]).exit_code == 0
    native = load_sae(fitted_run / "saes" / "group_01")
    torch.manual_seed(0)
    for i, layer in enumerate(native.cfg.layers):
        loaded = SAE.load_from_disk(str(out / hook_name(layer)))
        norms = loaded.W_dec.detach().norm(dim=1)
        assert float((norms - 1).abs().max()) < 1e-5
        x = raw_activations(native, i)
        with torch.no_grad():
            assert relative(loaded.decode(loaded.encode(x)), native.reconstruct(x, layer)) < 1e-5


def test_export_of_a_run_without_trained_saes_is_refused(tmp_path, harvested_run):
    result = cli(["export", harvested_run, tmp_path / "out"])
    assert result.exit_code == 2
    assert_one_line_error(result.output, "no trained SAE for group_00, group_01")


def test_a_plan_that_is_not_a_plan_record_is_refused_as_damaged(tmp_path):
    run = tmp_path / "run"
    (run / "plan").mkdir(parents=True)
    (run / "plan" / "plan.json").write_text(json.dumps({"layers": [0, 1], "groups": [[0], [1]]}))
    result = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "plan.json is damaged: not a Plan record (config_hash is missing; expected a string)" in result.output


def test_an_unknown_format_is_refused_naming_the_formats(tmp_path, fitted_run):
    result = cli(["export", fitted_run, tmp_path / "out", "--format", "gguf"])
    assert result.exit_code == 2
    assert_one_line_error(result.output, "--format 'gguf' is not supported; expected one of saelens, sparsify")
