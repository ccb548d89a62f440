"""Massive activations: a planted high-norm token is counted as an outlier by the harvest, left out
of the typical-token FVU, kept clean in the typical spliced CE, and trained on as fit.outliers says."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SPECIALS, WORDS, build_model, build_tokenizer, tiny_config
from ghsae.cache.norms import N_BINS, NormCounter, NormDistribution, add_up, bin_of, lower_edge
from ghsae.pipeline import fit, harvest
from ghsae.pipeline import report as write_report
from ghsae.run import Run

PLANTED = "w10"  # about 1.4 % of the Zipf-like text: a few dozen rows, far from the median
SCALE = 100.0
FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 128, "fit.tokens": 1024}
REPORT = {"report.ce_tokens": 256, "report.latents_shown": 1, "report.examples_per_latent": 1}


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory) -> Path:
    """The tiny Llama with one word's embedding scaled by 100: its residual stays massive at every layer."""
    folder = tmp_path_factory.mktemp("planted")
    model = build_model("llama")
    token = (SPECIALS + WORDS).index(PLANTED)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] *= SCALE
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def planted_run(planted_model, text_dataset, tmp_path_factory):
    cfg = tiny_config(planted_model, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], **FIT, **REPORT})
    run = tmp_path_factory.mktemp("runs") / "planted"
    harvest(cfg, run, progress=False)
    fit(cfg, run, progress=False)
    write_report(cfg, run, progress=False)
    return cfg, Run.open(run)


def _planted_rows(run: Run) -> int:
    """Occurrences of the planted word among the stored rows of one group (one row per kept token)."""
    token = (SPECIALS + WORDS).index(PLANTED)
    group = run.plan.group_names[0]
    return int((run.store.array(group, "token")[:] == token).sum())


def test_the_harvest_counts_a_planted_massive_token_as_an_outlier_at_every_layer(planted_run):
    _, run = planted_run
    stats = run.run_stats()
    assert stats is not None and stats.outlier_factor == 10.0
    occurrences = _planted_rows(run)
    assert occurrences > 10
    for layer, ls in stats.layers.items():
        assert ls.norms is not None
        # each layer's stored rows are about a third of the tokens (one layer drawn per group of 3)
        assert 0 < ls.norms.outliers <= occurrences, (layer, ls.norms)
        assert ls.norms.max_norm > 10 * ls.norms.median_norm
        assert ls.norms.median_norm <= ls.norms.q99_norm <= ls.norms.q999_norm <= ls.norms.max_norm


def test_the_typical_fvu_leaves_the_planted_tokens_out_and_the_all_token_fvu_keeps_them(planted_run, text_dataset):
    _, run = planted_run
    table = pq.read_table(run.layout.report / "metrics.parquet").to_pylist()
    assert table, "no eval rows"
    for row in table:
        assert row["outliers"] > 0, row
        assert np.isfinite(row["fvu_typical"]) and np.isfinite(row["fvu_typical_se"])
        assert row["fvu_typical"] != pytest.approx(row["fvu"], rel=1e-3)
        assert np.isfinite(row["delta_ce_pct_typical"]) and np.isfinite(row["kl_typical"])
    # every held-out occurrence of the planted word is the outlier set, at every layer
    token = (SPECIALS + WORDS).index(PLANTED)
    contexts = run.eval_contexts()
    held_out = int((contexts == token).sum())
    assert {row["outliers"] for row in table} == {held_out}
    page = (run.layout.report / "report.html").read_text()
    assert 'id="outliers"' in page and "FVU typical" in page and "outliers in the held-out rows" in page


def test_an_ordinary_model_has_no_outliers_and_equal_views(tiny_llama, text_dataset, tmp_path, tiny_lm):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], **FIT, **REPORT})
    harvest(cfg, tmp_path / "run", progress=False, lm=tiny_lm)
    fit(cfg, tmp_path / "run", progress=False)
    write_report(cfg, tmp_path / "run", progress=False, lm=tiny_lm)
    table = pq.read_table(tmp_path / "run" / "report" / "metrics.parquet").to_pylist()
    for row in table:
        if row["outliers"] == 0:
            assert row["fvu_typical"] == pytest.approx(row["fvu"], rel=1e-9)
            assert row["delta_ce_pct_typical"] == pytest.approx(row["delta_ce_pct"], rel=1e-9)


@pytest.mark.parametrize("handling", ["drop", "clip"])
def test_fit_outliers_changes_what_the_sae_trains_on(planted_run, handling, tmp_path):
    cfg, run = planted_run
    from ghsae.train.fit import group_loader

    group = run.plan.group_names[0]
    keep_fit = dataclasses.replace(cfg.fit, outliers="keep")  # the default clips: keep is the contrast
    keep = group_loader(run, keep_fit, group, run.done_shards(), torch.device("cpu"))
    other_fit = dataclasses.replace(cfg.fit, outliers=handling)
    other = group_loader(run, other_fit, group, run.done_shards(), torch.device("cpu"))
    kept_rows = sum(b.x.shape[0] for b in keep.loader.batches(0))
    other_rows = sum(b.x.shape[0] for b in other.loader.batches(0))
    largest_keep = max(float(b.x.norm(dim=1).max()) for b in keep.loader.batches(0))
    largest_other = max(float(b.x.norm(dim=1).max()) for b in other.loader.batches(0))
    assert largest_other < largest_keep / 5  # the massive rows are gone or clipped
    if handling == "drop":
        assert 0 < kept_rows - other_rows <= _planted_rows(run)
    else:
        assert other_rows == kept_rows


def test_norm_histograms_add_up_over_shards_and_read_quantiles_within_a_bin():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(3.0, 0.5, size=20_000))
    parts = []
    for chunk in np.array_split(norms, 4):
        counter = NormCounter(1, torch.device("cpu"))
        counter.add(0, torch.from_numpy(chunk))
        parts.append(counter.arrays())
    dist = add_up([7], parts)
    assert isinstance(dist, NormDistribution) and dist.hist.sum() == norms.size and dist.hist.shape == (1, N_BINS)
    assert dist.max_norm[0] == pytest.approx(norms.max())
    for q in (0.5, 0.99, 0.999):
        assert dist.quantile(q)[0] == pytest.approx(np.quantile(norms, q), rel=0.045)
    threshold = np.array([3.0 * np.median(norms)])
    assert dist.count_above(threshold)[0] == pytest.approx((norms > threshold[0]).sum(), abs=3)
    edges = lower_edge(np.arange(N_BINS))
    index = bin_of(torch.tensor([edges[100] * 1.01]))
    assert int(index[0]) == 100


def test_stats_json_reads_back(planted_run):
    _, run = planted_run
    data = json.loads(run.layout.stats.read_text())
    assert "norms" in data["layers"]["0"] and "outlier_factor" in data


def test_the_typical_view_splices_only_the_contexts_that_hold_an_outlier(planted_run, planted_model, monkeypatch):
    """In a context without an outlier the two views are the same pass: the second (outliers kept clean)
    runs on the contexts holding one only, and its figures equal those of evaluating one context a batch."""
    from ghsae.analysis import splice
    from ghsae.analysis.evals import EvalTarget, evaluate, outlier_thresholds
    from ghsae.lm import load_model
    from ghsae.sae import SAEConfig, build_sae

    _, run = planted_run
    lm = load_model(str(planted_model), "cpu", "float32")
    contexts = run.eval_contexts()
    n = contexts.shape[0]
    token = (SPECIALS + WORDS).index(PLANTED)
    holding = int((contexts == token).any(axis=1).sum())
    assert n >= 2 and 0 < holding < n, "the test needs CE contexts with and without the planted word"
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_model=lm.d_model, n_latents=64, layers=[2], k=4)).eval()
    spliced_contexts = []
    original = splice.Splicer.spliced

    def counting(self, input_ids, layer, new_resid, logits_to_keep=0, repeats=1):
        spliced_contexts.append(input_ids.shape[0] * repeats)
        return original(self, input_ids, layer, new_resid, logits_to_keep, repeats)

    monkeypatch.setattr(splice.Splicer, "spliced", counting)
    kwargs = dict(special_ids=list(run.plan.tokenizer.special_ids), ce_contexts=n, progress=False,
                  outlier_threshold=outlier_thresholds(run, 10.0))  # fmt: skip
    by_batch = evaluate(lm, contexts, [EvalTarget("g", "group", sae)], batch_contexts=n, **kwargs)
    # every context once with the reconstruction, once zero-ablated; the outlier-holding ones once more
    assert sum(spliced_contexts) == n + n + holding
    one_a_batch = evaluate(lm, contexts, [EvalTarget("g", "group", sae)], batch_contexts=1, **kwargs)
    (a,), (b,) = by_batch.rows, one_a_batch.rows
    assert a["outliers"] > 0 and a["kl_typical"] != pytest.approx(a["kl"], rel=1e-3)
    for metric in ("delta_ce", "kl", "delta_ce_typical", "kl_typical", "ce_score"):
        assert a[metric] == pytest.approx(b[metric], rel=1e-4, abs=1e-6), metric
