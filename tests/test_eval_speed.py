"""The evals' fast paths measure what the plain ones did: edits of one layer stacked into one spliced
pass, CE and KL from a log-sum-exp, and spliced CE at chosen layers only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ghsae.analysis.evals as evals
from ghsae.analysis.evals import EvalTarget, evaluate
from ghsae.analysis.metrics import token_ce_and_kl
from ghsae.analysis.splice import Splicer
from ghsae.sae import SAEConfig, build_sae

SPECIAL = [0, 1, 2, 3]


def _setup(lm, hookpoint: str = "resid_post"):
    torch.manual_seed(0)
    contexts = torch.randint(4, 300, (5, 16)).numpy()
    contexts[:, 0] = 1  # a BOS, never replaced
    d = lm.d_model
    saes = {
        "group": build_sae(SAEConfig(architecture="topk", d_model=d, n_latents=4 * d, layers=[1, 2], k=8)),
        "per-layer 1": build_sae(SAEConfig(architecture="relu", d_model=d, n_latents=2 * d, layers=[1])),
        "per-layer 2": build_sae(SAEConfig(architecture="topk", d_model=d, n_latents=2 * d, layers=[2], k=4)),
    }
    # a threshold that makes some but not all held-out rows outliers: both views differ
    acts, _ = Splicer(lm, hookpoint).clean(torch.from_numpy(contexts).long())
    thresholds = {layer: float(acts[layer][:, 1:].norm(dim=-1).quantile(0.8)) for layer in (1, 2)}
    return contexts, saes, thresholds


def _targets(saes, ce_layers=None):
    return [
        EvalTarget(name, "group" if name == "group" else "baseline", sae, ce_layers=ce_layers)
        for name, sae in saes.items()
    ]


def _run(lm, contexts, targets, thresholds, hookpoint="resid_post"):
    return evaluate(
        lm, contexts, targets, SPECIAL, ce_contexts=3, batch_contexts=2, progress=False,
        outlier_threshold=thresholds, hookpoint=hookpoint,
    )


def _by(result):
    return {(r["sae"], r["layer"]): r for r in result.rows}


@pytest.mark.parametrize("hookpoint", ["resid_post", "mlp_out"])
def test_stacked_spliced_passes_give_every_metric_of_one_pass_per_sae(tiny_lm, monkeypatch, hookpoint):
    contexts, saes, thresholds = _setup(tiny_lm, hookpoint)
    stacked = _run(tiny_lm, contexts, _targets(saes), thresholds, hookpoint)
    monkeypatch.setattr(evals, "SPLICE_PREDICTIONS", {"cuda": 1, "cpu": 1})  # one edit per spliced pass
    single = _run(tiny_lm, contexts, _targets(saes), thresholds, hookpoint)
    a, b = _by(stacked), _by(single)
    assert a.keys() == b.keys() and len(a) == 4
    assert any(r["outliers"] > 0 for r in a.values())
    for key, row in a.items():
        assert row.keys() == b[key].keys()
        assert "kl_typical" in row and row["kl_typical"] != pytest.approx(row["kl"], rel=1e-3), key
        for metric, value in row.items():
            if isinstance(value, float) and math.isfinite(value):
                assert value == pytest.approx(b[key][metric], rel=1e-4, abs=1e-6), (key, metric)


def test_spliced_ce_and_kl_equal_a_full_log_softmax_of_the_spliced_pass(tiny_lm):
    """The log-sum-exp CE and KL of a stacked pass equal metrics.token_ce_and_kl on one plain pass."""
    contexts, saes, thresholds = _setup(tiny_lm)
    result = _by(_run(tiny_lm, contexts, _targets(saes), thresholds))
    ids = torch.from_numpy(contexts[:3]).long()
    splicer = Splicer(tiny_lm)
    with torch.inference_mode():
        acts, logits = splicer.clean(ids)
        keep = ~torch.isin(ids, torch.tensor(SPECIAL))
        targets = ids[:, 1:].reshape(-1)
        clean_lp = torch.log_softmax(logits[:, :-1].reshape(targets.numel(), -1).float(), -1)
        sae, layer = saes["group"], 2
        x = acts[layer][keep]
        recon = sae.decode(sae.encode(x, layer), layer)
        outlier = x.norm(dim=1) > thresholds[layer]
        for values, suffix in ((recon, ""), (torch.where(outlier[:, None], x, recon), "_typical")):
            new = acts[layer].clone()
            new[keep] = values
            out = splicer.spliced(ids, layer, new)[:, :-1].reshape(targets.numel(), -1)
            ce, kl = token_ce_and_kl(clean_lp, out, targets)
            row = result[("group", layer)]
            clean_ce = float(-clean_lp.gather(-1, targets[:, None]).mean())
            assert row["ce_clean"] == pytest.approx(clean_ce, rel=1e-5)
            assert row[f"delta_ce{suffix}"] == pytest.approx(float(ce.mean()) - clean_ce, rel=1e-4, abs=1e-6)
            assert row[f"kl{suffix}"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)


def test_spliced_ce_is_measured_at_the_chosen_layers_only_with_the_same_values(tiny_lm):
    contexts, saes, thresholds = _setup(tiny_lm)
    every = _by(_run(tiny_lm, contexts, _targets(saes), thresholds))
    chosen = _by(_run(tiny_lm, contexts, _targets(saes, ce_layers=frozenset({2})), thresholds))
    assert "delta_ce" not in chosen[("group", 1)] and "delta_ce" not in chosen[("per-layer 1", 1)]
    assert chosen[("group", 1)]["fvu"] == pytest.approx(every[("group", 1)]["fvu"], rel=1e-9)
    for key in (("group", 2), ("per-layer 2", 2)):
        for metric in ("delta_ce", "delta_ce_typical", "kl", "kl_typical", "ce_score", "delta_ce_se"):
            assert chosen[key][metric] == pytest.approx(every[key][metric], rel=1e-5, abs=1e-7), (key, metric)
    assert np.isfinite(chosen[("group", 2)]["ce_score"])


def _sides(group_layers, spot):
    from types import SimpleNamespace

    from ghsae.analysis.report import SeedSides

    def target(name, layers):
        return EvalTarget(name, "x", SimpleNamespace(cfg=SimpleNamespace(layers=layers)))  # type: ignore[arg-type]

    side = SimpleNamespace(targets=[target("group", group_layers)])
    base = SimpleNamespace(targets=[target(f"per-layer {x}", [x]) for x in spot]) if spot else None
    return [SeedSides(0, side, base)]  # type: ignore[arg-type]


def test_ce_layers_auto_splices_group_saes_at_the_spot_layers_only_when_they_are_the_runs_own():
    from ghsae.analysis.report import choose_ce_layers
    from ghsae.config import ReportConfig

    sides = _sides([0, 1, 2, 3], [0, 3])
    choose_ce_layers(ReportConfig(), sides, spot_checks=True, layers=[0, 1, 2, 3])
    assert sides[0].side.targets[0].ce_layers == {0, 3}
    assert all(t.ce_layers is None for t in sides[0].base.targets)  # per-layer SAEs: at their own layer
    sides = _sides([0, 1, 2, 3], [0, 3])
    choose_ce_layers(ReportConfig(), sides, spot_checks=False, layers=[0, 1, 2, 3])  # an outside baseline: all
    assert sides[0].side.targets[0].ce_layers is None
    choose_ce_layers(ReportConfig(ce_layers=[1, 2]), sides, spot_checks=True, layers=[0, 1, 2, 3])
    assert all(t.ce_layers == {1, 2} for t in sides[0].targets)


def test_ce_layers_that_cannot_be_met_are_refused_with_the_fix():
    from ghsae.analysis.report import choose_ce_layers
    from ghsae.config import ReportConfig
    from ghsae.errors import ConfigError

    with pytest.raises(ConfigError, match=r'report.ce_layers is "spot".*ce_layers = "all"'):
        choose_ce_layers(ReportConfig(ce_layers="spot"), _sides([0, 1], []), spot_checks=False, layers=[0, 1])
    with pytest.raises(ConfigError, match=r"layers \[7\].*layers 0..1"):
        choose_ce_layers(ReportConfig(ce_layers=[1, 7]), _sides([0, 1], []), spot_checks=False, layers=[0, 1])
    with pytest.raises(ConfigError, match=r"report.ce_layers is 'some'; expected auto, all, spot"):
        ReportConfig(ce_layers="some")
