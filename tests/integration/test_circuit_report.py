"""The report's circuit section and latent dashboards, and the blind rating kit, end to end on tiny
runs whose tokenizer can express the tasks; the rating page is driven in a real headless browser."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
import time

import pyarrow.parquet as pq
import pytest
from circuit_fixtures import save_task_llama
from click.testing import CliRunner

from conftest import tiny_config
from ghsae.analysis.rate import RatingError, score, wilson
from ghsae.cli import main
from ghsae.config import to_toml
from ghsae.layout import RunLayout
from ghsae.lm import load_model
from ghsae.pipeline import fit, harvest
from ghsae.records import RatingKey, load_record

FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 128, "fit.tokens": 1024, "fit.lr": 3e-3}
REPORT = {"report.ce_tokens": 128, "report.latents_shown": 2, "report.examples_per_latent": 2}
TASKS = {"report.task_prompts": 8, "report.task_kept": [0, 4, 64], "report.task_layers": [4]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset):
    root = tmp_path_factory.mktemp("circ")
    model = save_task_llama(root / "model", n_layers=6)
    lm = load_model(str(model), "cpu", "float32")
    out = {}
    for name, groups in (("grouped", [[0, 2], [3, 5]]), ("per_layer", "per-layer")):
        cfg = tiny_config(model, text_dataset, **{"grouping.groups": groups, **FIT, **REPORT, **TASKS})
        harvest(cfg, root / name, progress=False, lm=lm)
        fit(cfg, root / name, progress=False)
        out[name] = (cfg, root / name)
    return out


def _with_min_accuracy(cfg, share: float):
    return dataclasses.replace(cfg, report=dataclasses.replace(cfg.report, task_min_accuracy=share))


def _config_file(tmp_path, cfg):
    path = tmp_path / "pipeline.toml"
    path.write_text(to_toml(cfg))
    return path


def test_report_with_tasks_draws_every_curve_with_controls_and_dashboards(runs, tmp_path):
    cfg, run = runs["grouped"]
    _, base = runs["per_layer"]
    cfg = _with_min_accuracy(cfg, 0.0)  # a random tiny model solves nothing: measure anyway
    res = CliRunner().invoke(
        main,
        ["report", "--config", str(_config_file(tmp_path, cfg)), "--run-dir", str(run), "--baseline", str(base)]
        + ["--tasks", "ioi,greater-than,sva", "--no-progress"],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    page = (run / "report" / "report.html").read_text()
    section = page.split('<section id="circuits">')[1].split("</section>")[0]
    assert section.count("<img") == 9  # 3 tasks x 3 measures
    for task in ("ioi", "greater-than", "sva"):
        assert f"<h3>{task}</h3>" in section
    table = pq.read_table(run / "report" / "circuits.parquet").to_pylist()
    kinds = {(r["task"], r["kind"], r["layer"]) for r in table}
    for task in ("ioi", "greater-than", "sva"):
        for layer in (4,):
            assert {k for t, k, x in kinds if t == task and x == layer} == {"group", "baseline", "random", "zero"}
    assert {r["n"] for r in table if r["kind"] == "group"} == {0, 4, 64}
    # the shown latents carry a histogram and their promoted / suppressed tokens
    latents = page.split('<section id="latents">')[1]
    assert latents.count('<svg class="hist"') >= 2 and "promotes" in latents and "suppresses" in latents


def test_an_unsolved_task_is_flagged_in_the_report_not_measured(runs, tmp_path):
    cfg, run = runs["grouped"]
    cfg = _with_min_accuracy(cfg, 1.0)  # a random model does not get every prompt right
    res = CliRunner().invoke(
        main,
        ["report", "--config", str(_config_file(tmp_path, cfg)), "--run-dir", str(run), "--tasks", "sva"]
        + ["--no-progress"],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    section = (run / "report" / "report.html").read_text().split('<section id="circuits">')[1].split("</section>")[0]
    assert "not solved" in section and "<img" not in section


def test_an_unknown_task_is_a_one_line_error():
    res = CliRunner().invoke(main, ["report", "--run-dir", ".", "--tasks", "ioi,docstring"])
    assert res.exit_code == 2 and "docstring" in res.output and "greater-than" in res.output


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


# --- the rating kit -------------------------------------------------------------------------------

BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip():
    """Skip where no browser is installed, except under GHSAE_REQUIRE_OPTIONAL (CI installs one)."""
    import importlib.util

    missing = [p for p in (BROWSER, DRIVER) if not os.path.exists(p)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if missing:
        why = f"needs {', '.join(missing)}: apt-get install -y chromium chromium-driver; pip install selenium"
        if os.environ.get("GHSAE_REQUIRE_OPTIONAL"):
            pytest.fail(f"GHSAE_REQUIRE_OPTIONAL is set: {why}")
        pytest.skip(why)


def _kit(runs, tmp_path, latents=3):
    cfg, run = runs["grouped"]
    _, base = runs["per_layer"]
    out = tmp_path / "kit" / "rate.html"
    res = CliRunner().invoke(
        main,
        ["rate", str(run), "--config", str(_config_file(tmp_path, cfg)), "--baseline", str(base)]
        + ["--latents", str(latents), "--out", str(out)],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    kit = re.search(r"kit ([0-9a-f]+)", res.output).group(1)
    return run, out, load_record(RatingKey, RunLayout(run).rating_key(kit))


def test_rating_page_is_blind_and_samples_per_sae_and_layer(runs, tmp_path):
    run, page, key = _kit(runs, tmp_path)
    text = page.read_text()
    for leak in ("group_0", "per-layer", "baseline", "layer 1", "layer 3"):
        assert leak not in text
    assert not re.search(r"https?://", text)  # self-contained: nothing to fetch
    per = {}
    for it in key.items:
        per.setdefault((it.sae, it.layer), []).append(it.latent)
    assert {layer for (_, layer) in per} == set(range(6))
    assert {kind for kind in (it.kind for it in key.items)} == {"group", "baseline"}
    assert all(len(v) == len(set(v)) and 1 <= len(v) <= 3 for v in per.values())
    order = [(it.sae, it.layer) for it in key.items]
    assert order != sorted(order)  # shuffled, not grouped by SAE
    assert [f'data-id="{it.item}"' in text for it in key.items] == [True] * len(key.items)


def test_scoring_refuses_a_csv_from_another_kit(runs, tmp_path):
    run, _, key = _kit(runs, tmp_path)
    bad = tmp_path / "other.csv"
    bad.write_text(f"kit,item,rating,rated_at\nffffffffffff,{key.items[0].item},not,x\n")
    with pytest.raises(RatingError, match="kit ffffffffffff"):
        score(run, bad)
    res = CliRunner().invoke(main, ["rate", str(run), "--score", str(bad)])
    assert res.exit_code == 2 and "ffffffffffff" in res.output


def test_rating_in_a_real_headless_browser_downloads_a_csv_that_scores(runs, tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    run, page, key = _kit(runs, tmp_path, latents=2)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        driver.get(page.as_uri())
        pattern = ["interpretable", "not", "unsure"]
        clicked = {}
        for i in range(len(key.items)):
            visible = [e for e in driver.find_elements(By.CSS_SELECTOR, ".item") if e.is_displayed()]
            assert len(visible) == 1
            item = visible[0].get_attribute("data-id")
            rating = pattern[i % 3]
            driver.find_element(By.ID, f"rate-{rating}").click()
            clicked[item] = rating
        assert set(clicked) == {it.item for it in key.items}
        # ratings live in the browser: a reload keeps them. Chromium commits localStorage to its store
        # asynchronously, so a reload issued within milliseconds of the last click may not see it yet
        # (a person never rates that fast): reload until it does, failing after 20 tries.
        want = f"{len(key.items)} rated"
        for _ in range(20):
            driver.refresh()
            if want in driver.find_element(By.ID, "progress").text:
                break
            time.sleep(0.25)
        assert want in driver.find_element(By.ID, "progress").text
        driver.find_element(By.ID, "download").click()
        deadline = time.monotonic() + 60
        files: list = []
        while time.monotonic() < deadline:
            files = [p for p in downloads.glob("*.csv")]
            if files and not list(downloads.glob("*.crdownload")):
                break
            time.sleep(0.2)
        assert files, "the page's download produced no CSV"
    finally:
        driver.quit()
    with open(files[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["item"]: r["rating"] for r in rows} == clicked
    scores = score(run, files[0])
    by_item = {it.item: it for it in key.items}
    for s in scores:
        mine = [clicked[i] for i, it in by_item.items() if (it.sae, it.layer) == (s.sae, s.layer)]
        assert (s.interpretable, s.not_interpretable, s.unsure) == tuple(mine.count(r) for r in pattern)
    res = CliRunner().invoke(main, ["rate", str(run), "--score", str(files[0])])
    assert res.exit_code == 0 and "Wilson" in res.output
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
