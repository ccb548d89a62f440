"""`ghsae export --format sparsify`: sparsify's own loader opens each layer's folder, named as
sparsify names the hooked module, and reconstructs like ghsae."""

from __future__ import annotations

import pytest
import torch
from runs import assert_one_line_error, cli, small_config
from test_export import LAYERS, raw_activations, relative, trained_looking_sae

from conftest import build_model, needs_module
from ghsae.errors import GhsaeError
from ghsae.sae import load_sae
from ghsae.train.export import sparsify_hookpoint, write_sparsify_folder

pytestmark = needs_module("sparsify", "pip install --no-deps eai-sparsify natsort schedulefree (setup.cfg [sparsify])")


def sparsify_reconstruct(coder, x):
    with torch.no_grad():
        return coder(x).sae_out


@pytest.mark.parametrize("unit_decoder", [False, True])
def test_sparsify_loads_the_export_and_reconstructs_like_ghsae(tmp_path, unit_decoder):
    from sparsify import SparseCoder

    sae = trained_looking_sae("topk")
    for i, layer in enumerate(LAYERS):
        folder = tmp_path / f"layers.{layer}"
        write_sparsify_folder(sae, layer, folder, unit_decoder=unit_decoder)
        coder = SparseCoder.load_from_disk(folder)
        assert (coder.d_in, coder.num_latents, coder.cfg.k) == (24, 96, 7)
        x = raw_activations(sae, i)
        with torch.no_grad():
            ours = sae.encode(x, layer)
            top = coder.encode(x)
        assert relative(sparsify_reconstruct(coder, x), sae.reconstruct(x, layer)) < 1e-5, f"layer {layer}"
        theirs = torch.zeros_like(ours).scatter(-1, top.top_indices, top.top_acts)
        scale = float(sae.norm_scale[i]) if unit_decoder else 1.0  # unit rows: latents are ghsae's / s
        torch.testing.assert_close(theirs * scale, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
        if unit_decoder:
            assert float((coder.W_dec.detach().norm(dim=1) - 1).abs().max()) < 1e-5


def test_export_command_writes_folders_sparsify_loads_by_hookpoint(tmp_path, fitted_run):
    from sparsify import SparseCoder

    out = tmp_path / "sparsify"
    result = cli(["export", fitted_run, out, "--format", "sparsify"])
    assert result.exit_code == 0, result.output
    coders = SparseCoder.load_many(str(out), local=True)
    assert list(coders) == [f"layers.{i}" for i in range(6)]
    native = load_sae(fitted_run / "saes" / "group_00")
    torch.manual_seed(0)
    for i, layer in enumerate(native.cfg.layers):
        x = raw_activations(native, i)
        assert relative(sparsify_reconstruct(coders[f"layers.{layer}"], x), native.reconstruct(x, layer)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_folder_names_are_the_modules_sparsify_hooks(arch):
    """resid_post is the block sparsify's trainer picks for a layer; mlp_out and attn_out are modules
    of the base model whose output is the MLP's and the attention's."""
    from sparsify.utils import get_layer_list

    model = build_model(arch, n_layers=2)
    blocks, _ = get_layer_list(model)
    cls = type(model).__name__
    assert sparsify_hookpoint(1, "resid_post", cls) == f"{blocks}.1"
    block = model.base_model.get_submodule(f"{blocks}.1")
    mlp = model.base_model.get_submodule(sparsify_hookpoint(1, "mlp_out", cls))
    attn = model.base_model.get_submodule(sparsify_hookpoint(1, "attn_out", cls))
    assert "MLP" in type(mlp).__name__ and "Attention" in type(attn).__name__
    assert any(m is mlp for m in block.children()) and any(m is attn for m in block.children())


def test_resid_mid_has_no_sparsify_name_and_says_what_to_use():
    from ghsae.errors import ConfigError

    with pytest.raises(ConfigError, match="export with --format saelens"):
        sparsify_hookpoint(1, "resid_mid", "LlamaForCausalLM")


def test_a_run_of_another_architecture_is_refused_before_any_folder(
    tmp_path, tiny_llama, text_dataset, harvested_run
):
    from ghsae.pipeline import fit

    fit(small_config(tiny_llama, text_dataset, **{"fit.architecture": "relu"}), harvested_run, progress=False)
    out = tmp_path / "out"
    result = cli(["export", harvested_run, out, "--format", "sparsify"])
    assert result.exit_code == 2
    assert_one_line_error(result.output, "sparsify's SparseCoder has TopK latents only, and this run's SAEs are relu")
    assert not out.exists()


def test_ghsae_refuses_a_sparsify_folder_naming_what_it_is(tmp_path):
    folder = tmp_path / "layers.4"
    write_sparsify_folder(trained_looking_sae("topk"), 4, folder)
    with pytest.raises(GhsaeError, match="it is a sparsify SAE folder"):
        load_sae(folder)
