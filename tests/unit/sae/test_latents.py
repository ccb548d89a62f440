"""encode_latents / decode_latents: a TopK SAE's sparse latents answer every question the evaluation
asks (decode, per-latent firing counts, sampled columns) with the dense path's numbers."""

from __future__ import annotations

import pytest
import torch

from ghsae.sae import Latents, SAEConfig, build_sae


def _sae(architecture: str):
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=architecture, d_model=16, n_latents=96, layers=[3, 4], k=8)
    sae = build_sae(cfg).eval()
    sae.set_normalisation(torch.tensor([0.5, 2.0]), torch.randn(2, 16))
    return sae


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_encode_latents_agrees_with_the_dense_encode(architecture):
    sae = _sae(architecture)
    x = torch.randn(300, 16) * 3
    x[:5] = -50.0  # rows whose k largest pre-activations include non-positive ones: zeros in the codes
    with torch.inference_mode():
        for layer in (3, 4):
            dense = sae.encode(x, layer)
            lat = sae.encode_latents(x, layer)
            assert (lat.dense_z is None) == (architecture == "topk")  # TopK never builds [n, m]
            assert lat.n_rows == 300
            torch.testing.assert_close(lat.dense(), dense)
            assert torch.equal(lat.fired_counts(), Latents.from_dense(dense).fired_counts())
            assert int(lat.fired_counts().sum()) == int((dense != 0).sum())
            ids = torch.tensor([95, 0, 7, 42, 8])
            torch.testing.assert_close(lat.columns(ids), dense[:, ids])
            torch.testing.assert_close(sae.decode_latents(lat, layer), sae.decode(dense, layer), rtol=1e-5, atol=1e-5)


def test_topk_codes_hold_k_entries_a_row_and_count_only_the_positive_ones():
    sae = _sae("topk")
    x = torch.randn(40, 16)
    with torch.no_grad():
        # shift so that 5 % of pre-activations are positive: rows whose k (8 %) largest include zeros after the ReLU
        sae.b_enc -= sae.pre_acts(sae.normalise(x, 3)).quantile(0.95)
    with torch.inference_mode():
        lat = sae.encode_latents(x, 3)
    codes = lat.codes
    assert codes is not None and codes.values.shape == (40 * 8,) and codes.crow.tolist() == list(range(0, 41 * 8, 8))
    assert bool((codes.values >= 0).all())
    assert 0 < int(lat.fired_counts().sum()) == int((codes.values > 0).sum()) < 40 * 8
