from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import build_model
from ghsae.harvest.similarity import _angular_distance_sums
from ghsae.hooks import capture_layers
from ghsae.lm import find_blocks


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_hooks_capture_resid_post_and_stop_after_the_last_needed_block(arch):
    model = build_model(arch, n_layers=5).eval()
    blocks = find_blocks(model)
    ids = torch.randint(4, 300, (2, 16))
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, ..., final]
    got: dict[int, torch.Tensor] = {}
    calls: list[int] = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    capture_layers(model, blocks, ids, [1, 2], lambda layer, x: got.__setitem__(layer, x.clone()))
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2], "blocks after the last needed one must not run"
    for layer in (1, 2):
        torch.testing.assert_close(got[layer], reference[layer + 1])


def test_last_block_capture_is_before_the_final_norm():
    # output_hidden_states' last entry has the final norm applied in Llama-family models;
    # the hook sees the residual stream itself.
    model = build_model("llama", n_layers=3).eval()
    blocks = find_blocks(model)
    ids = torch.randint(4, 300, (1, 8))
    with torch.no_grad():
        final = model(ids, output_hidden_states=True).hidden_states[-1]
    got = {}
    capture_layers(model, blocks, ids, [2], lambda layer, x: got.__setitem__(layer, x.clone()))
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(got[2]), final)
    assert not torch.allclose(got[2], final)


def test_angular_distance_of_known_angles():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    x = torch.stack([torch.stack([e0, e0]), torch.stack([e1, -e0]), torch.stack([diag, e0 * 3])])  # [L=3, n=2, d=2]
    sums = _angular_distance_sums(x).numpy() / 2  # mean over the 2 tokens
    expected = np.array(
        [
            [0.0, (0.5 + 1.0) / 2, (0.25 + 0.0) / 2],
            [(0.5 + 1.0) / 2, 0.0, (0.25 + 1.0) / 2],
            [(0.25 + 0.0) / 2, (0.25 + 1.0) / 2, 0.0],
        ]
    )
    np.testing.assert_allclose(sums, expected, atol=1e-6)


def test_probe_distances_equal_a_direct_numpy_computation(tiny_lm):
    """raw: arccos of plain cosines; layer-centred: the same after subtracting each layer's mean over the
    probe's non-special tokens. Computed here from the hooked residuals with numpy, token by token."""
    from ghsae.harvest.similarity import distance_matrix, probe_similarity

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 300, (3, 12), generator=gen) for _ in range(2)]
    for b in batches:
        b[:, 0] = 1  # BOS: special, left out of every statistic
        b[0, 5] = 2  # an EOS inside a context
    layers = [0, 2, 3, 5]
    sim = probe_similarity(tiny_lm, lambda: iter(batches), layers)

    special = set(tiny_lm.special_ids)
    resid: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for b in batches:
        got: dict[int, torch.Tensor] = {}
        capture_layers(
            tiny_lm.model, tiny_lm.blocks, b, layers, lambda layer, x, got=got: got.__setitem__(layer, x.clone())
        )
        keep = np.array([t not in special for t in b.reshape(-1).tolist()])
        for layer in layers:
            resid[layer].append(got[layer].reshape(-1, got[layer].shape[-1]).double().numpy()[keep])
    X = np.stack([np.concatenate(resid[layer]) for layer in layers])  # [L, n, d]

    def mean_angle(x: np.ndarray) -> np.ndarray:
        u = x / np.linalg.norm(x, axis=-1, keepdims=True)
        cos = np.clip(np.einsum("ind,jnd->ijn", u, u), -1, 1)
        out = np.arccos(cos).mean(-1) / np.pi
        np.fill_diagonal(out, 0.0)
        return out

    assert sim.tokens == X.shape[1] == 2 * 3 * 11 - 2  # each batch: 3 BOS and one EOS left out
    np.testing.assert_allclose(distance_matrix(sim, "raw"), mean_angle(X), atol=2e-5)
    centred = mean_angle(X - X.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(distance_matrix(sim, "layer-centred"), centred, atol=2e-5)
    np.testing.assert_allclose(distance_matrix(sim, "centred"), centred, atol=2e-5)  # the old name reads the same
    assert not np.allclose(centred, mean_angle(X), atol=1e-3), "the two distances must differ on this data"
