"""`ghsae report` end to end on tiny runs: the page holds every section with its figures, the
numbers are consistent with the metric definitions, and bad input is refused with the reason."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config
from ghsae.analysis import plots
from ghsae.analysis.evals import EvalTarget, evaluate
from ghsae.analysis.page import SECTIONS
from ghsae.cli import main
from ghsae.config import to_toml
from ghsae.errors import ConfigError, StoreError
from ghsae.lm import load_model
from ghsae.pipeline import fit, harvest
from ghsae.pipeline import report as write_report
from ghsae.sae import SAEConfig, build_sae

FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 128, "fit.tokens": 1024, "fit.lr": 3e-3}
REPORT = {"report.ce_tokens": 128, "report.latents_shown": 2, "report.examples_per_latent": 2}


@pytest.fixture(scope="module")
def fitted_runs(tmp_path_factory, tiny_llama, text_dataset, tiny_lm):
    """A grouped run (0-2, 3-5) and a per-layer baseline of the same model and data, both fitted."""
    root = tmp_path_factory.mktemp("report")
    runs = {}
    for name, groups in (("grouped", [[0, 2], [3, 5]]), ("per_layer", "per-layer")):
        cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": groups, **FIT, **REPORT})
        harvest(cfg, root / name, progress=False, lm=tiny_lm)
        fit(cfg, root / name, progress=False)
        runs[name] = (cfg, root / name)
    return runs


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: dict[str, int] = {}  # section id -> inline images in it
        self.current = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs["id"]
            self.sections[self.current] = 0
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), "images must be embedded"
            assert len(attrs["src"]) > 2000
            self.sections[self.current] += 1

    def handle_data(self, data):
        self.text.append(data)


def test_report_with_a_baseline_holds_every_section_and_figure(fitted_runs, tiny_lm, monkeypatch):
    cfg, run = fitted_runs["grouped"]
    _, base = fitted_runs["per_layer"]
    drawn: list = []  # every figure of the page, kept open to read its axes (plots closes each after saving)
    monkeypatch.setattr(plots.plt, "close", drawn.append)
    out = write_report(cfg, run, baseline=base, progress=False, lm=tiny_lm)
    html = (out / "report.html").read_text()
    page = _Page()
    page.feed(html)
    assert list(page.sections) == [sid for sid, _ in SECTIONS]
    images = page.sections
    assert images["evals"] >= 5 and images["baseline"] == 1 and images["latents-density"] == 2
    # figures in grids, the headline table first, no offset text on any axis, no L0 line for TopK SAEs
    summary_html = html.split('<section id="summary">')[1]
    assert summary_html.index("<table") < summary_html.index("<p")
    assert html.count('<div class="figures">') >= 3 and 'alt="L0 per layer"' not in html
    assert "L0 = k = 4 for every token" in html
    assert drawn and all(
        not axis.get_offset_text().get_text() for fig in drawn for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
    )
    assert images["clustering"] == 3 and images["training"] == 1
    text = " ".join(page.text)
    assert "complete linkage" in text and "A + G·T" in text and "latent " in text
    assert "no shard of either run harvested one of those contexts" in text and "ratio per-layer / group 1.000" in text
    assert "--allow-unmatched" not in text and "group − per-layer" in text
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    # one row per (SAE, layer): 2 group SAEs over 6 layers, 6 per-layer SAEs
    assert sorted((r["kind"], r["layer"]) for r in rows) == sorted(
        [("group", x) for x in range(6)] + [("baseline", x) for x in range(6)]
    )
    for r in rows:
        assert 0 <= r["fvu"] < 1.5 and r["l0"] <= 4 + 1e-9  # (a random model: zeroing may not hurt)
        assert r["delta_ce"] == pytest.approx(r["ce_spliced"] - r["ce_clean"])
        assert r["kl"] >= -1e-6
        # every CE figure rests on the first report.ce_tokens positions' predictions (2 contexts of 64)
        assert r["ce_contexts"] == 2 and r["ce_predictions"] == 2 * 63 and r["eval_contexts"] == 4
        for k in ("fvu", "delta_ce", "delta_ce_pct", "ce_score", "kl"):
            assert r[f"{k}_se"] > 0 and r[f"{k}_se"] < float("inf")
    summary = (out / "summary.md").read_text()
    assert "per-layer SAEs" in summary and "A + G·T" in summary
    monkeypatch.undo()
    for fig in drawn:
        plots.plt.close(fig)


def test_delta_ce_is_zero_for_an_exact_reconstruction_and_large_for_zero(tiny_llama):
    """An SAE that reconstructs exactly splices in with zero delta CE and KL; one that outputs 0 is the ablation."""
    # A random model barely depends on its input; sharpen its unembedding and evaluate it on its own greedy
    # continuations, so the clean CE is low and destroying a layer shows.
    lm = load_model(str(tiny_llama), "cpu", "float32")
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(40.0)
        ids = torch.randint(4, 300, (4, 8))
        while ids.shape[1] < 32:
            ids = torch.cat([ids, lm.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    contexts = ids.numpy()
    contexts[:, 0] = 1  # a BOS, never replaced
    d = lm.d_model
    identity = build_sae(SAEConfig(architecture="relu", d_model=d, n_latents=2 * d, layers=[2]))
    zero = build_sae(SAEConfig(architecture="relu", d_model=d, n_latents=2 * d, layers=[2]))
    with torch.no_grad():
        # latents [relu(x), relu(-x)] decode back to x exactly
        identity.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=1))
        identity.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=0))
        zero.W_dec.zero_()
        zero.W_enc.zero_()
    result = evaluate(
        lm,
        contexts,
        [EvalTarget("identity", "group", identity), EvalTarget("zero", "group", zero)],
        special_ids=[0, 1, 2, 3],
        ce_contexts=4,
        batch_contexts=2,
        progress=False,
    )
    by = {r["sae"]: r for r in result.rows}
    assert by["identity"]["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert by["identity"]["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert by["identity"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert by["identity"]["ce_score"] == pytest.approx(1.0, abs=1e-4)
    assert by["zero"]["ce_spliced"] == pytest.approx(by["zero"]["ce_zero_ablation"], rel=1e-6)
    assert by["zero"]["ce_score"] == pytest.approx(0.0, abs=1e-6)
    assert by["zero"]["delta_ce"] > 1.0 and by["zero"]["kl"] > 1.0, by["zero"]
    assert by["zero"]["fvu"] > 0.9 and by["zero"]["dead_pct"] == 100.0
    # the zeroed SAE's delta CE per context, by hand: its standard error is their spread / sqrt(4)
    assert by["zero"]["ce_contexts"] == 4 and by["zero"]["ce_predictions"] == 4 * 31
    z, i = ("zero", 2), ("identity", 2)
    per_context = result.influence[z]["delta_ce"] * 4 + by["zero"]["delta_ce"]  # influence = (d_s - mean) / S
    assert by["zero"]["delta_ce_se"] == pytest.approx(per_context.std(ddof=1) / 2, rel=1e-9)
    # a difference of two SAEs on the same contexts is paired: zero minus identity has the zero's spread
    diff, se = result.difference_with_se([z], [i], "delta_ce")
    assert diff == pytest.approx(by["zero"]["delta_ce"] - by["identity"]["delta_ce"])
    assert se == pytest.approx(by["zero"]["delta_ce_se"], rel=1e-3)
    assert result.difference_with_se([z], [z], "delta_ce") == (0.0, 0.0)


def test_missing_saes_are_named_and_allow_partial_reports_the_rest(fitted_runs, tmp_path, tiny_lm):
    cfg, run = fitted_runs["grouped"]
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "saes" / "group_01")
    shutil.rmtree(partial / "report", ignore_errors=True)
    result = CliRunner().invoke(main, ["report", "--run-dir", str(partial)])
    assert result.exit_code == 2
    assert "no trained SAE for group_01" in result.output and "--allow-partial" in result.output
    out = write_report(cfg, partial, allow_partial=True, progress=False, lm=tiny_lm)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert sorted(r["layer"] for r in rows) == [0, 1, 2]
    assert "Partial report: no SAE for group_01" in (out / "report.html").read_text()


def test_a_mismatched_baseline_is_refused_with_the_reason(fitted_runs, tmp_path, tiny_models, text_dataset):
    cfg, run = fitted_runs["grouped"]
    # a grouped run is not a per-layer baseline (a copy: the run itself is refused as itself)
    grouped = tmp_path / "grouped"
    shutil.copytree(run, grouped, ignore=shutil.ignore_patterns("saes"))
    with pytest.raises(ConfigError, match="not per-layer"):
        write_report(cfg, run, baseline=grouped, progress=False)
    # another model
    other_cfg = tiny_config(tiny_models["neox"], text_dataset, **{"grouping.groups": "per-layer", **FIT})
    harvest(other_cfg, tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="its model is"):
        write_report(cfg, run, baseline=tmp_path / "other", progress=False)
    # a baseline with no SAEs at all
    _, base = fitted_runs["per_layer"]
    bare = tmp_path / "bare"
    shutil.copytree(base, bare, ignore=shutil.ignore_patterns("saes"))
    with pytest.raises(StoreError, match="baseline run .* has no trained SAE"):
        write_report(cfg, run, baseline=bare, progress=False)


def test_ghsae_run_chains_harvest_fit_and_report(tiny_llama, text_dataset, tmp_path):
    config = tmp_path / "pipeline.toml"
    settings = {"grouping.groups": 2, "compare.spot_layers": [0, 4], **FIT, **REPORT}
    config.write_text(to_toml(tiny_config(tiny_llama, text_dataset, **settings)))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--run-dir", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    starts = [line.split(" ")[0] for line in lines]
    assert starts.index("harvested") < starts.index("group_00") < starts.index("group_01") < starts.index("report:")
    assert (run / "report" / "report.html").is_file() and (run / "saes" / "group_01" / "sae.safetensors").is_file()
    # report.ce_layers = auto: the group SAEs are spliced where a per-layer spot check pairs them, only
    rows = pq.read_table(run / "report" / "metrics.parquet").to_pylist()
    spot = {r["layer"] for r in rows if r["kind"] == "baseline"}
    spliced = {r["layer"] for r in rows if r["kind"] == "group" and r.get("delta_ce") is not None}
    assert spot == {0, 4} and spliced == spot
    # a second run resumes everything: nothing harvested or trained again
    again = CliRunner().invoke(main, ["run", "--config", str(config), "--run-dir", str(run), "--no-progress"])
    assert again.exit_code == 0 and "in 0 shards" in again.output


def test_the_report_command_loads_the_run_model_itself(fitted_runs, tmp_path):
    cfg, run = fitted_runs["grouped"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    config = tmp_path / "pipeline.toml"
    config.write_text(to_toml(cfg))
    result = CliRunner().invoke(main, ["report", "--config", str(config), "--run-dir", str(copy), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (copy / "report" / "report.html").is_file() and "report:" in result.output


def _harvest_baseline(tmp_path, name, model, dataset, lm=None, **overrides):
    cfg = tiny_config(model, dataset, **{"grouping.groups": "per-layer", **FIT, **REPORT, **overrides})
    harvest(cfg, tmp_path / name, progress=False, lm=lm)
    return cfg, tmp_path / name


def test_a_baseline_that_harvested_the_runs_eval_contexts_is_refused(
    fitted_runs, tmp_path, tiny_llama, text_dataset, tiny_lm
):
    cfg, run = fitted_runs["grouped"]
    # 2,560 positions: contexts 0-39 harvested, while the run evaluates on its contexts 32-35
    _, longer = _harvest_baseline(tmp_path, "longer", tiny_llama, text_dataset, lm=tiny_lm, **{"harvest.tokens": 2560})
    with pytest.raises(
        ConfigError, match=r"the baseline harvested contexts 32-39, which include the eval contexts 32-35"
    ):
        write_report(cfg, run, baseline=longer, progress=False, lm=tiny_lm)


def test_a_baseline_from_another_dataset_is_refused(fitted_runs, tmp_path, tiny_llama, tiny_lm):
    import json

    from conftest import generate_documents

    cfg, run = fitted_runs["grouped"]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in generate_documents(600, seed=5)))
    _, base = _harvest_baseline(tmp_path, "otherdata", tiny_llama, other, lm=tiny_lm)
    with pytest.raises(ConfigError, match="harvested from dataset .*other.jsonl"):
        write_report(cfg, run, baseline=base, progress=False, lm=tiny_lm)


def test_unequal_tokens_per_sae_are_refused_unless_allowed_and_then_shown(fitted_runs, tmp_path, tiny_lm):
    cfg, run = fitted_runs["grouped"]
    _, base = fitted_runs["per_layer"]
    shorter = tmp_path / "shorter"
    shutil.copytree(base, shorter, ignore=shutil.ignore_patterns("saes", "report"))
    short_cfg = tiny_config(
        cfg.model.path, cfg.data.dataset, **{"grouping.groups": "per-layer", **FIT, **REPORT, "fit.tokens": 512}
    )
    fit(short_cfg, shorter, progress=False)
    with pytest.raises(
        ConfigError, match=r"trained on 512 tokens each, this run's on 1,024 \(ratio 0.500\).*--allow-unmatched"
    ):
        write_report(cfg, run, baseline=shorter, progress=False, lm=tiny_lm)
    out = write_report(cfg, run, baseline=shorter, progress=False, lm=tiny_lm, allow_unmatched=True)
    page = (out / "report.html").read_text()
    assert "Unequal training tokens per SAE (ratio 0.500)" in page and "--allow-unmatched" in page


def test_the_reports_dashboards_from_the_evaluation_pass_equal_a_pass_of_their_own(tiny_lm):
    """The report tallies its dashboards from the evaluation's latents (no second pass); they must be
    what collect(), the rating kit's own pass, finds for the same latents."""
    from ghsae.analysis.dashboards import ViewCollector, collect

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="relu", d_model=tiny_lm.d_model, n_latents=64, layers=[1, 2])).eval()
    contexts = torch.randint(4, 300, (6, 16)).numpy()
    contexts[:, 0] = 1  # BOS: special, never tallied
    special = [0, 1, 2, 3]
    views = ViewCollector({"g": sae}, per_latent=2)
    result = evaluate(
        tiny_lm, contexts, [EvalTarget("g", "group", sae)], special, ce_contexts=0, batch_contexts=4,
        latents_sampled=8, progress=False, observe=views.add,
    )  # fmt: skip
    sampled = result.examples["g"].latents.tolist()
    from_eval = views.views(tiny_lm)
    own = collect(tiny_lm, contexts, special, {"g": (sae, {1: sampled, 2: sampled})}, per_latent=2, batch_contexts=4)
    assert set(from_eval) == set(own) == {("g", 1), ("g", 2)}
    for key in own:
        for a, b in zip(from_eval[key], own[key], strict=True):
            assert (a.latent, a.layer, a.fired, a.tokens_seen) == (b.latent, b.layer, b.fired, b.tokens_seen)
            assert a.tokens_seen == 6 * 15
            assert a.histogram[0] == b.histogram[0] and a.histogram[1] == pytest.approx(b.histogram[1], rel=1e-5)
            assert [(c, p) for _, c, p in a.contexts] == [(c, p) for _, c, p in b.contexts]
            assert a.promoted == b.promoted
    # shown: only the latents asked for, of the SAE asked for
    some = views.views(tiny_lm, {"g": sampled[:2]})
    assert {v.latent for vs in some.values() for v in vs} == set(sampled[:2])
    assert any(v.fired for vs in from_eval.values() for v in vs)  # the comparison saw firings
