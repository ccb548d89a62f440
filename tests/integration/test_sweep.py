"""`ghsae sweep` on the tiny model: two groupings and per-layer from one harvest, at equal tokens per
SAE, on one page with a figure per metric and a row per grouping, and one parquet of every row."""

from __future__ import annotations

from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from runs import cli, small_config, write_config

from ghsae.run import Run

FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 512, "fit.checkpoint_tokens": 512}
REPORT = {"report.ce_tokens": 128}
# AMAD at G = 1, 2 of the tiny model's layers 0..4 (layer-centred): 0.109, 0.062; 0.08 puts the rule's G at 2
GROUPING = {"grouping.amad_threshold": 0.08}


class Page(HTMLParser):
    """The figures' alt texts and the sweep table's first cells."""

    def __init__(self):
        super().__init__()
        self.alts: list[str] = []
        self.rows: list[str] = []
        self._in_sweep_table = self._first_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.alts.append(a.get("alt", ""))
        if tag == "table" and "sweep" in (a.get("class") or ""):
            self._in_sweep_table = True
        if tag == "tr" and self._in_sweep_table:
            self._first_cell = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_sweep_table = False

    def handle_data(self, data):
        if self._first_cell and data.strip():
            self.rows.append(data.strip())
            self._first_cell = False


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama, text_dataset):
    root = tmp_path_factory.mktemp("sweep")
    cfg = small_config(tiny_llama, text_dataset, **FIT, **REPORT, **GROUPING)
    args = ["sweep", "--config", write_config(root, cfg), "--run-dir", root / "sweep", "--no-progress"]
    r = cli([*args, "--groups", "2,3,per-layer", "--transfer", "G2"])
    assert r.exit_code == 0, r.output
    return root / "sweep", r.output


def test_a_sweep_builds_its_page_with_a_figure_per_metric_and_a_row_per_grouping(swept):
    sweep_dir, output = swept
    page = Page()
    page.feed((sweep_dir / "report" / "sweep.html").read_text())
    # every figure over typical tokens and over all tokens
    for metric in ("FVU (typical tokens)", "FVU (all tokens)", "ΔCE % (typical)", "ΔCE % (all)", "KL nats (typical)", "KL nats (all)"):
        assert f"{metric} against G and compute" in page.alts
        assert f"{metric} per layer" in page.alts
    assert "transfer G2" in page.alts
    # after the header row; the tiny model's probe makes the AMAD rule pick G = 2
    # a transfer variant has per-layer SAEs trained with transfer beside it (equal total compute)
    assert page.rows[1:] == ["G2 ★ (AMAD rule)", "G2-transfer", "G3", "per-layer", "per-layer-transfer"], page.rows
    assert "derived G2" in output and "derived G3" in output
    for key in ("fvu", "delta_ce_pct", "kl"):  # each figure also as a PNG beside the page, for docs to quote
        assert (sweep_dir / "report" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_sweeps_parquet_holds_every_grouping_sae_and_layer(swept):
    sweep_dir, _ = swept
    rows = pq.read_table(sweep_dir / "report" / "metrics.parquet").to_pylist()
    keys = {(r["grouping"], r["group"], r["layer"]) for r in rows}
    assert len(keys) == len(rows) == 5 * 6  # five groupings, each covering all 6 layers once
    assert {r["grouping"] for r in rows} == {"G2", "G3", "G2-transfer", "per-layer", "per-layer-transfer"}
    assert {r["n_groups"] for r in rows if r["grouping"] == "per-layer"} == {6}
    assert all(r["fvu"] > 0 and r["total_seconds"] > 0 for r in rows)


def test_every_grouping_trains_its_saes_on_the_same_tokens_per_sae(swept):
    sweep_dir, _ = swept
    tokens = set()
    for name in ("G2", "G3", "G2-transfer", "per-layer"):
        run = Run.open(sweep_dir / name)
        tokens |= {run.sae_record(g).tokens for g in run.plan.group_names}
    assert tokens == {512}


def test_a_transfer_variant_starts_each_group_from_the_previous_one(swept):
    sweep_dir, _ = swept
    run = Run.open(sweep_dir / "G2-transfer")
    assert "init_from" not in run.sae_record("group_00").sae["extra"]
    assert run.sae_record("group_01").sae["extra"]["init_from"] == str(run.layout.sae_dir("group_00"))
    # the transfer variant reads the G2 run's store through hard links: no bytes copied
    a = (sweep_dir / "G2" / "acts.zarr" / "zarr.json").stat()
    b = (sweep_dir / "G2-transfer" / "acts.zarr" / "zarr.json").stat()
    assert a.st_ino == b.st_ino


def test_the_cli_default_groupings_are_the_sweeps():
    from ghsae.cli import sweep as sweep_command
    from ghsae.sweep import DEFAULT_GROUPINGS

    default = next(p.default for p in sweep_command.params if p.name == "groupings")
    assert default == DEFAULT_GROUPINGS


def test_a_sweep_refuses_bad_groupings_before_harvesting_any_shard(tmp_path, tiny_llama, text_dataset):
    cfg = small_config(tiny_llama, text_dataset, **FIT, **REPORT, **GROUPING)
    args = ["sweep", "--config", write_config(tmp_path, cfg), "--run-dir", tmp_path / "s", "--no-progress"]
    r = cli([*args, "--groups", "2,40"])
    assert r.exit_code == 2 and "(--groups) is 40 but only 6 layers are harvested" in r.output
    assert not list((tmp_path / "s" / "per-layer" / "manifest").glob("shard-*.json"))
    r = cli([*args, "--groups", "2,3", "--transfer", "G4"])
    assert r.exit_code == 2 and "--transfer names 'G4', which is not in this sweep; it has G2, G3" in r.output
    r = cli([*args, "--groups", "2,seven"])
    assert r.exit_code == 2 and "--groups names 'seven'" in r.output


def test_a_finished_sweep_re_renders_from_its_evaluation_and_refuses_other_fit_settings(
    swept, tiny_llama, text_dataset, monkeypatch, tmp_path
):
    sweep_dir, _ = swept
    cfg = small_config(tiny_llama, text_dataset, **FIT, **REPORT, **GROUPING)
    from ghsae.analysis import sweep as gathering

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished sweep must read its evaluation back, not evaluate again")

    monkeypatch.setattr(gathering, "evaluate", no_evaluation)
    args = ["sweep", "--config", write_config(sweep_dir.parent, cfg), "--run-dir", sweep_dir, "--no-progress"]
    r = cli([*args, "--groups", "2,3,per-layer", "--transfer", "G2"])
    assert r.exit_code == 0, r.output
    other = small_config(tiny_llama, text_dataset, **{**FIT, "fit.lr": 0.01}, **REPORT, **GROUPING)
    config = write_config(tmp_path, other)
    r = cli(["sweep", "--config", config, "--run-dir", sweep_dir, "--no-progress", "--groups", "2,3,per-layer"])
    assert r.exit_code == 2 and "train with other fit settings; pass --overwrite" in r.output
