"""Latent dashboards: the logit read-out is the decoder row in the layer's raw units times W_U, and
the histogram and top contexts count what the latent actually did on the tokens given."""

from __future__ import annotations

import numpy as np
import torch
from circuit_fixtures import linear_lm

from ghsae.analysis.dashboards import collect, logit_tokens
from ghsae.sae import SAEConfig, build_sae


def _sae(lm, layers):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("relu", lm.d_model, 8, layers))
    sae.set_normalisation(torch.tensor([0.5, 2.0])[: len(layers)])
    return sae.eval()


def test_promoted_and_suppressed_tokens_are_the_decoder_row_times_the_unembedding_in_each_layers_units():
    lm = linear_lm(n_layers=2)
    W_U = lm.model.get_output_embeddings().weight.detach()
    sae = _sae(lm, [0, 1])
    with torch.no_grad():
        sae.W_dec[3] = W_U[40] - W_U[41]
    expected = (sae.W_dec[3].detach() @ W_U.T).numpy()
    for layer, scale in ((0, 0.5), (1, 2.0)):
        ((up, down),) = logit_tokens(sae, layer, [3], W_U, lm.tokenizer, k=3)
        order = np.argsort(-expected)
        assert [t for t, _ in up] == [lm.tokenizer.decode([int(i)]) for i in order[:3]]
        assert [t for t, _ in down] == [lm.tokenizer.decode([int(i)]) for i in order[::-1][:3]]
        # raw units: the layer's normalisation x_norm = x * scale is undone, so values scale by 1 / scale
        assert abs(up[0][1] - expected[order[0]] / scale) < 1e-4
        assert abs(down[0][1] - expected[order[-1]] / scale) < 1e-4


def test_histogram_and_top_contexts_count_every_firing_of_the_latent():
    lm = linear_lm(n_layers=2)
    sae = _sae(lm, [1])
    rng = np.random.default_rng(0)
    contexts = rng.integers(4, 300, size=(6, 12)).astype(np.int32)
    views = collect(lm, contexts, [0, 1, 2, 3], {"s": (sae, {1: [0, 5]})}, per_latent=3, batch_contexts=4)
    # the same latents computed directly
    resid = {}
    h = lm.model.embed(torch.from_numpy(contexts).long())
    for i, block in enumerate(lm.model.layers):
        h = block(h)
        resid[i] = h
    z = sae.encode(resid[1].reshape(-1, lm.d_model), 1).detach()
    for view in views[("s", 1)]:
        col = z[:, view.latent]
        assert view.fired == int((col > 0).sum()) and view.tokens_seen == contexts.size
        assert sum(view.histogram[0]) == view.fired
        assert abs(view.histogram[1] - float(col.max())) < 1e-4
        top = sorted(col.tolist(), reverse=True)[: len(view.contexts)]
        assert [round(a, 4) for a, _, _ in view.contexts] == [round(t, 4) for t in top]
        for act, ctx, pos in view.contexts:
            assert abs(float(col.view(6, 12)[ctx, pos]) - act) < 1e-4
