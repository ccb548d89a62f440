"""The report's metric functions against values worked out by hand, and the spliced forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from ghsae.analysis.metrics import (
    ReconstructionSums,
    ce_loss_score,
    mmcs,
    token_ce_and_kl,
)
from ghsae.analysis.splice import Splicer
from ghsae.lm import load_model
from ghsae.sae import Latents


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0); total squared deviation 2
    r = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # errors (0,0), (1,0): SSE 1
    z = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])  # L0 1 and 2; latent 2 never fires
    sums = ReconstructionSums(d_model=2)
    sums.add(x[:1], r[:1], Latents.from_dense(z[:1]))  # in two batches: the sums must not care
    sums.add(x[1:], r[1:], Latents.from_dense(z[1:]))
    m = sums.finish()
    assert m["rows"] == 2 and m["l0"] == 1.5
    assert m["mse"] == pytest.approx(1 / 4)  # SSE / (rows * d)
    assert m["fvu"] == pytest.approx(0.5)  # 1 / 2
    # errors have mean (0.5, 0): residual variance 2 * 0.25 = 0.5, explained variance 1 - 0.5/2
    assert m["explained_variance"] == pytest.approx(0.75)
    assert m["cosine"] == pytest.approx(1.0)  # reconstructions are parallel to x
    assert m["dead_pct"] == pytest.approx(100 / 3)
    assert sums.density().tolist() == [1.0, 0.5, 0.0]


def test_cross_entropy_kl_and_ce_score_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    clean = torch.log_softmax(logits, -1)
    ce, kl = token_ce_and_kl(clean, logits, torch.tensor([1]))
    assert ce.item() == pytest.approx(math.log(4))
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    other = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p/q)
    ce, kl = token_ce_and_kl(clean, other, torch.tensor([1]))
    assert ce.item() == pytest.approx(math.log(2)) and kl.item() == pytest.approx(expected)
    # the shared clean probabilities give the same KL
    assert token_ce_and_kl(clean, other, torch.tensor([1]), clean.exp())[1].item() == pytest.approx(expected)
    assert ce_loss_score(clean_ce=2.0, spliced_ce=2.0, zero_ce=6.0) == 1.0
    assert ce_loss_score(clean_ce=2.0, spliced_ce=6.0, zero_ce=6.0) == 0.0
    assert ce_loss_score(clean_ce=2.0, spliced_ce=3.0, zero_ce=6.0) == 0.75


def test_mmcs_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # row 1 best matches (1,1) at cos 1/sqrt2; row 2 also (1,1) at 1/sqrt2 ((0,-1) is -1)
    assert mmcs(a, b) == pytest.approx(1 / math.sqrt(2))
    assert mmcs(a, a) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_a_spliced_pass_equals_a_full_pass_with_the_layer_replaced(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]), "cpu", "float32")
    ids = torch.randint(4, 300, (2, 24))
    splicer = Splicer(lm)
    resid, clean_logits = splicer.clean(ids)
    assert sorted(resid) == list(range(lm.n_layers))
    for layer in (0, 2, lm.n_layers - 1):
        # replaying the clean state reproduces the clean logits without running blocks 0..layer
        torch.testing.assert_close(splicer.spliced(ids, layer, resid[layer]), clean_logits, rtol=1e-5, atol=1e-5)
        # a perturbed state gives what a full forward with that block's output overwritten gives
        new = resid[layer] * 0.5 + 1.0

        def overwrite(module, args, output, new=new):
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = lm.blocks[layer].register_forward_hook(overwrite)
        try:
            with torch.inference_mode():
                expected = lm.model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        got = splicer.spliced(ids, layer, new)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, clean_logits, atol=1e-3), "the splice must change the output"
    # the blocks are restored afterwards
    assert all(type(b).__name__ != "_StandIn" for b in lm.blocks)


def test_standard_error_of_a_mean_over_equal_contexts_is_the_textbook_one():
    # With the same number of predictions per context, sum(num) / sum(den) is the mean of the
    # per-context means, and its error must be their sample standard deviation / sqrt(S).
    import numpy as np

    from ghsae.analysis.metrics import ratio_influence, standard_error

    rng = np.random.default_rng(0)
    per_context_mean = rng.normal(0.3, 0.1, size=12)
    n = np.full(12, 255.0)
    se = standard_error(ratio_influence(per_context_mean * n, n))
    assert se == pytest.approx(per_context_mean.std(ddof=1) / np.sqrt(12), rel=1e-12)


def test_standard_error_of_a_ratio_matches_a_bootstrap_over_contexts():
    import numpy as np

    from ghsae.analysis.metrics import ratio_influence, standard_error

    rng = np.random.default_rng(1)
    den = rng.uniform(500, 800, size=40)  # e.g. clean CE summed per context
    num = 0.05 * den + rng.normal(0, 5, size=40)  # e.g. delta CE summed per context
    se = standard_error(ratio_influence(num, den))
    boot = []
    for _ in range(4000):
        i = rng.integers(0, 40, size=40)
        boot.append(num[i].sum() / den[i].sum())
    assert se == pytest.approx(np.std(boot), rel=0.1)
    assert np.isnan(standard_error(ratio_influence(num[:1], den[:1])))  # one context: no error bar
