from __future__ import annotations

import pytest
import torch

from ghsae.config import ARCHITECTURES, AUXK_NORMALISATIONS
from ghsae.sae import AUXK_NORMALISATIONS as SAE_AUXK_NORMALISATIONS
from ghsae.sae import REGISTRY, SAEConfig, SAELoadError, build_sae, fvu, load_sae, register, save_sae


def planted_data(n_atoms=64, d=32, n=20000, active=3, seed=0):
    """Sparse non-negative combinations of a random unit-norm dictionary, scaled to E||x|| = sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    x = (coef[..., None] * atoms[idx]).sum(1)
    return atoms, x * (d**0.5 / x.norm(dim=1).mean())


ARCH_SETTINGS = {
    "topk": {},
    "batchtopk": {},
    "jumprelu": {"sparsity_coef": 0.1, "jump_init_threshold": 0.1, "jump_bandwidth": 0.05},
    "relu": {"sparsity_coef": 0.1},
}


def test_the_registry_holds_the_configured_architectures():
    assert set(REGISTRY) == set(ARCHITECTURES) == set(ARCH_SETTINGS)
    assert AUXK_NORMALISATIONS == SAE_AUXK_NORMALISATIONS


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register("topk")(type("Other", (REGISTRY["topk"],), {}))


@pytest.mark.parametrize("arch", list(ARCH_SETTINGS))
def test_each_architecture_recovers_a_planted_sparse_dictionary(arch):
    atoms, x = planted_data()
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch, 32, 128, [0], k=4, dead_tokens=5000, **ARCH_SETTINGS[arch]))
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(15):
        for batch in x[torch.randperm(len(x))].split(256):
            out = sae(batch)
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            opt.step()
            sae.normalise_decoder()
            sae.update_dead(out)
    sae.eval()
    decoder = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    found = ((atoms @ decoder.T).max(dim=1).values > 0.9).float().mean().item()
    assert found > 0.9, f"{arch} found {found:.0%} of the planted atoms"
    with torch.no_grad():
        assert fvu(x, sae.decode_normalised(sae.activate(sae.pre_acts(x)))) < 0.15


def test_topk_keeps_exactly_k_latents_and_auxk_uses_only_dead_ones():
    sae = build_sae(SAEConfig("topk", 16, 64, [0], k=5, dead_tokens=10))
    x = torch.randn(32, 16)
    out = sae(x)
    assert ((out.latents > 0).sum(-1) <= 5).all() and out.losses["auxk"] == 0  # nothing dead yet
    sae.tokens_since_fired[:10] = 100  # ten dead latents
    assert sae(x).losses["auxk"] > 0


def test_per_layer_normalisation_round_trips_raw_units():
    sae = build_sae(SAEConfig("relu", 8, 32, [3, 4, 5]))
    sae.set_normalisation(torch.tensor([2.0, 0.5, 4.0]), torch.randn(3, 8))
    x, layer = torch.randn(6, 8), torch.tensor([3, 4, 5, 5, 4, 3])
    torch.testing.assert_close(sae.denormalise(sae.normalise(x, layer), layer), x)
    torch.testing.assert_close(sae.normalise(x[:1], 4), (x[:1] - sae.norm_mean[1]) * 0.5)
    with pytest.raises(ValueError, match=r"serves layers \[3, 4, 5\]; got layer \[7\]"):
        sae.normalise(x[:1], 7)


@pytest.mark.parametrize("arch", list(ARCH_SETTINGS))
def test_save_and_load_round_trip_is_exact(tmp_path, arch):
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(arch, 16, 64, [2, 3], k=4))
    sae.set_normalisation(torch.tensor([1.5, 0.25]))
    save_sae(sae, tmp_path / "sae")
    again = load_sae(tmp_path / "sae")
    for name, value in sae.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    x = torch.randn(5, 16)
    sae.eval()
    torch.testing.assert_close(sae.reconstruct(x, 3), again.reconstruct(x, 3), rtol=0, atol=0)


def test_loading_weights_that_do_not_match_cfg_json_is_refused(tmp_path):
    save_sae(build_sae(SAEConfig("topk", 16, 64, [0], k=4)), tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"n_latents": 64', '"n_latents": 48'))
    with pytest.raises(SAELoadError, match=r"is \[64(, 16)?\] but cfg.json implies \[48"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "sae.safetensors").unlink()
    with pytest.raises(SAELoadError, match="is not an SAE folder"):
        load_sae(tmp_path / "sae")


def test_jumprelu_threshold_gradients_are_the_rectangle_kernels():
    """d/d log t of sum(z) and of L0, by hand: only pre within eps/2 of t contributes, each -pre/eps
    (z) or -1/eps (L0), times t for the chain through log t; z passes gradient where pre > t."""
    from ghsae.sae.jumprelu import _JumpReLU, _Step

    eps, t = 0.2, 1.0
    pre = torch.tensor([[0.5, 0.95, 1.05, 2.0], [1.08, 0.0, 1.5, 0.91]], requires_grad=True)
    log_t = torch.zeros(4, requires_grad=True)  # t = exp(0) = 1
    _JumpReLU.apply(pre, log_t, eps).sum().backward()
    near = (pre.detach() - t).abs() < eps / 2
    expected = -(t * near / eps).sum(0) * t
    assert torch.allclose(log_t.grad, expected)
    assert torch.equal(pre.grad, (pre.detach() > t).float())
    log_t.grad = None
    pre.grad = None
    _Step.apply(pre, log_t, eps).sum().backward()
    assert torch.allclose(log_t.grad, -(near / eps).sum(0) * t)
    assert torch.equal(pre.grad, torch.zeros_like(pre))
