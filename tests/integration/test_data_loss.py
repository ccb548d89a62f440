"""Nothing the user wrote is lost: `--overwrite` (harvest and sweep) removes only what ghsae wrote,
at every depth; a second rating page keeps the first page's key; a ratings CSV that cannot be
scored (empty, not UTF-8, conflicting rows) is refused before the earlier scores are touched."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from runs import assert_one_line_error, cli, small_config, write_config

from ghsae.analysis.rate import score
from ghsae.layout import RATING_KEY, RATING_SCORES, RUN_TREE, SWEEP_FIGURES, RunLayout, SweepLayout
from ghsae.records import RatingItem, RatingKey, load_record, save_record

# --- harvest --overwrite ----------------------------------------------------------------------------


def _harvest_again(run, tmp_path, cfg, *extra):
    config = write_config(tmp_path, cfg)
    return cli(["harvest", "--config", config, "--run-dir", run, "--seed", "5", "--overwrite", "--no-progress", *extra])


def test_harvest_overwrite_keeps_the_users_files_inside_saes_and_report(tmp_path, fitted_run, small_cfg, caplog):
    mine = {
        "saes/notes.txt": "about these SAEs",
        "saes/group_00/notes.txt": "latent 3 looks like code",
        "saes/my-probe/probe.pt": "weights of my own",
        "report/edited.html": "<p>my edit</p>",
    }
    (fitted_run / "report").mkdir(exist_ok=True)
    (fitted_run / "report" / "summary.md").write_text("a report ghsae wrote")
    for rel, text in mine.items():
        (fitted_run / rel).parent.mkdir(parents=True, exist_ok=True)
        (fitted_run / rel).write_text(text)
    with caplog.at_level(logging.WARNING):
        r = _harvest_again(fitted_run, tmp_path, small_cfg)
    assert r.exit_code == 0, r.output
    assert {rel: (fitted_run / rel).read_text() for rel in mine} == mine
    # what ghsae wrote there is gone: the old SAEs, their fit settings, the old report
    assert not (fitted_run / "saes" / "group_00" / "sae.safetensors").exists()
    assert not (fitted_run / "saes" / "group_00" / "cfg.json").exists()
    assert not (fitted_run / "saes" / "fit.json").exists()
    assert not (fitted_run / "saes" / "group_01").exists()  # nothing of the user's in it: removed whole
    assert not (fitted_run / "report" / "summary.md").exists()
    warning = " ".join(rec.getMessage() for rec in caplog.records if "kept" in rec.getMessage())
    for rel in ("saes/notes.txt", "saes/group_00/notes.txt", "saes/my-probe", "report/edited.html"):
        assert rel in warning, warning
    assert json.loads((fitted_run / "config.json").read_text())["identity"]["harvest"]["seed"] == 5


def test_harvest_overwrite_refuses_a_users_file_in_a_folder_it_rebuilds_whole_before_removing_anything(
    tmp_path, harvested_run, small_cfg
):
    (harvested_run / "plan" / "notes.txt").write_text("why I chose these layers")
    before = sorted(str(p.relative_to(harvested_run)) for p in harvested_run.rglob("*"))
    r = _harvest_again(harvested_run, tmp_path, small_cfg)
    assert r.exit_code == 2
    assert_one_line_error(r.output, "plan/notes.txt")
    assert "move them out of that folder" in r.output
    assert sorted(str(p.relative_to(harvested_run)) for p in harvested_run.rglob("*")) == before


@pytest.mark.parametrize("inner", ["seed1/plan", "seed2/acts.zarr", "per-layer/plan", "seed1/per-layer/acts.zarr"])
def test_overwrite_refuses_a_users_file_in_a_rebuilt_folder_of_a_run_nested_in_the_run(tmp_path, inner):
    from ghsae.errors import RunDirError
    from ghsae.harvest.rundir import refuse_rebuilt_user_files

    (tmp_path / inner).mkdir(parents=True)
    (tmp_path / inner / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=re.escape(f"{inner}/notes.txt")):
        refuse_rebuilt_user_files(tmp_path, RUN_TREE, "--overwrite")


def test_every_top_level_name_ghsae_writes_has_its_tree_and_the_sweep_figures_are_the_pages():
    from ghsae.analysis.metric_table import SWEEP
    from ghsae.analysis.sweep_page import BUDGET_FIGURE
    from ghsae.layout import OWNED_NAMES

    assert set(OWNED_NAMES) <= set(RUN_TREE)
    keys = [m.key for m in SWEEP] + [BUDGET_FIGURE]
    assert {SweepLayout(Path("SWEEP")).figure(key).name for key in keys} == set(SWEEP_FIGURES)


# --- sweep --overwrite ------------------------------------------------------------------------------

SWEEP_FIT = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 512, "fit.checkpoint_tokens": 512}


def test_sweep_overwrite_after_another_harvest_keeps_the_users_files_in_every_grouping(
    tmp_path, tiny_llama, text_dataset, caplog
):
    sweep_dir = tmp_path / "sweep"
    cfg = small_config(tiny_llama, text_dataset, **SWEEP_FIT, **{"report.ce_tokens": 128})
    args = ["sweep", "--run-dir", sweep_dir, "--no-progress", "--groups", "2", "--transfer", "G2"]
    r = cli([*args, "--config", write_config(tmp_path, cfg)])
    assert r.exit_code == 0, r.output
    mine = {
        "G2/notes.txt": "G2 is the one to look at",
        "G2/saes/group_00/notes.txt": "latent 3",
        "G2/report/mine.html": "<p>mine</p>",
        "G2-transfer/notes.txt": "transfer notes",
        "per-layer/manifest/why.txt": "a note in a ghsae folder",
        "report/figure-of-mine.png": "not a png",
        "README.md": "my sweep",
    }
    for rel, text in mine.items():
        (sweep_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (sweep_dir / rel).write_text(text)
    other = small_config(tiny_llama, text_dataset, **SWEEP_FIT, **{"report.ce_tokens": 128, "harvest.seed": 7})
    (tmp_path / "other").mkdir()
    with caplog.at_level(logging.WARNING):
        r = cli([*args, "--config", write_config(tmp_path / "other", other), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert {rel: (sweep_dir / rel).read_text() for rel in mine} == mine
    # the sweep started over around them: every grouping harvested, trained and linked again
    for run in ("per-layer", "G2", "G2-transfer"):
        assert json.loads((sweep_dir / run / "config.json").read_text())["identity"]["harvest"]["seed"] == 7, run
    assert RunLayout(sweep_dir / "G2").sae_trained("group_00") and RunLayout(sweep_dir / "G2-transfer").sae_trained("group_00")
    assert (sweep_dir / "report" / "sweep.html").is_file()
    warning = " ".join(rec.getMessage() for rec in caplog.records if "kept" in rec.getMessage())
    for rel in mine:
        assert rel in warning, warning
    assert "ghsae-run.json" not in warning


# --- the rating kit ---------------------------------------------------------------------------------


def _rate(run, tmp_path, *extra):
    r = cli(["rate", run, "--config", write_config(tmp_path, _cfg(run)), *extra])
    assert r.exit_code == 0, r.output
    kit = re.search(r"kit ([0-9a-f]+)", r.output).group(1)
    return load_record(RatingKey, RunLayout(run).rating_key(kit))


def _cfg(run):
    from ghsae.pipeline import settings_for

    return settings_for(run, None, {})


def _csv(path, key, pattern=("interpretable", "not", "unsure"), bom=False):
    lines = ["kit,item,rating,rated_at"]
    lines += [f"{key.kit},{it.item},{pattern[i % len(pattern)]},2025-01-01T00:00:00Z" for i, it in enumerate(key.items)]
    path.write_bytes(("\ufeff" if bom else "").encode() + ("\n".join(lines) + "\n").encode())
    return path


def _expected(key, pattern=("interpretable", "not", "unsure")):
    counts: dict = {}
    for i, it in enumerate(key.items):
        c = counts.setdefault((it.sae, it.layer), {"interpretable": 0, "not": 0, "unsure": 0})
        c[pattern[i % len(pattern)]] += 1
    return counts


def _counts(scores):
    return {(s.sae, s.layer): {"interpretable": s.interpretable, "not": s.not_interpretable, "unsure": s.unsure} for s in scores}


def test_a_second_rating_page_keeps_the_first_pages_key_and_both_csvs_score(tmp_path, fitted_run):
    first = _rate(fitted_run, tmp_path, "--latents", "2")
    second = _rate(fitted_run, tmp_path, "--latents", "3", "--out", tmp_path / "second.html")
    assert first.kit != second.kit
    assert _counts(score(fitted_run, _csv(tmp_path / "first.csv", first))) == _expected(first)
    assert _counts(score(fitted_run, _csv(tmp_path / "second.csv", second))) == _expected(second)
    r = cli(["rate", fitted_run, "--score", tmp_path / "first.csv"])
    assert r.exit_code == 0, r.output
    assert _scores(fitted_run).kit == first.kit


def _scores(run):
    from ghsae.records import RatingScores

    return load_record(RatingScores, run / "report" / RATING_SCORES)


def _fake_key(run, kit="0123456789ab", n=6) -> RatingKey:
    items = tuple(RatingItem(f"{i + 1:05d}", f"group_{i % 2:02d}", "group", i % 3, i) for i in range(n))
    return RatingKey(kit, str(run), None, 0, items)


@pytest.fixture
def rated(tmp_path):
    """A run folder holding one rating key (a page's) and no scores yet."""
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    key = _fake_key(run)
    save_record(RunLayout(run).rating_key(key.kit), key)
    return run, key


def test_a_run_rated_before_per_page_keys_still_scores_with_its_single_key(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    key = _fake_key(run)
    save_record(run / "report" / RATING_KEY, key)
    assert _counts(score(run, _csv(tmp_path / "r.csv", key))) == _expected(key)


def test_a_csv_whose_kit_has_no_key_names_the_kits_the_run_holds(rated, tmp_path):
    run, key = rated
    other = _fake_key(run, kit="fedcba987654")
    r = cli(["rate", run, "--score", _csv(tmp_path / "r.csv", other)])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "kit fedcba987654")
    assert key.kit in r.output


@pytest.mark.parametrize("content", [b"", b"kit,item,rating,rated_at\n", b"\xef\xbb\xbfkit,item,rating,rated_at\r\n"])
def test_an_empty_or_header_only_csv_is_refused_and_the_earlier_scores_stay(rated, tmp_path, content):
    run, key = rated
    score(run, _csv(tmp_path / "good.csv", key))
    before = (run / "report" / RATING_SCORES).read_bytes()
    empty = tmp_path / "empty.csv"
    empty.write_bytes(content)
    r = cli(["rate", run, "--score", empty])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "holds no ratings")
    assert "download ratings (CSV)" in r.output
    assert (run / "report" / RATING_SCORES).read_bytes() == before


@pytest.mark.parametrize(
    "content, found",
    [
        ("kit,item,rating,note\n{kit},00001,not,café\n".encode("latin-1"), "byte 0xe9"),
        (bytes(range(256)) * 4, "byte 0x80"),
    ],
    ids=["latin-1", "binary"],
)
def test_a_csv_that_is_not_utf8_is_a_one_line_error(rated, tmp_path, content, found):
    run, key = rated
    path = tmp_path / "bad.csv"
    path.write_bytes(content.replace(b"{kit}", key.kit.encode()))
    r = cli(["rate", run, "--score", path])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "is not UTF-8 text")
    assert found in r.output and "CSV UTF-8" in r.output


def test_a_csv_with_a_byte_order_mark_scores_like_one_without(rated, tmp_path):
    run, key = rated
    plain = _counts(score(run, _csv(tmp_path / "plain.csv", key)))
    r = cli(["rate", run, "--score", _csv(tmp_path / "bom.csv", key, bom=True)])
    assert r.exit_code == 0, r.output
    assert _counts(_scores(run).scores) == plain == _expected(key)


def test_an_item_rated_twice_differently_is_refused_naming_both_rows(rated, tmp_path):
    run, key = rated
    path = _csv(tmp_path / "r.csv", key)
    with open(path, "a") as fh:  # item 00002 is on row 3 (header row 1); again on row 8, rated otherwise
        fh.write(f"{key.kit},00002,interpretable,2025-01-02T00:00:00Z\n")
    r = cli(["rate", run, "--score", path])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "rates item 00002 twice, differently: row 3 says 'not', row 8 says 'interpretable'")
    assert not (run / "report" / RATING_SCORES).exists()


def test_an_item_rated_twice_the_same_way_counts_once_with_a_warning(rated, tmp_path, caplog):
    run, key = rated
    path = _csv(tmp_path / "r.csv", key)
    with open(path, "a") as fh:
        fh.write(f"{key.kit},00002,not,2025-01-02T00:00:00Z\n")
    with caplog.at_level(logging.WARNING):
        assert _counts(score(run, path)) == _expected(key)
    assert "00002 (rows 3 and 8)" in caplog.text


def test_a_csv_mixing_two_pages_is_refused(rated, tmp_path):
    run, key = rated
    path = _csv(tmp_path / "r.csv", key)
    with open(path, "a") as fh:
        fh.write("fedcba987654,00001,not,x\n")
    r = cli(["rate", run, "--score", path])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "mixes rows of 2 rating pages")


def test_a_kit_id_that_is_not_one_never_reaches_a_path(rated, tmp_path):
    run, key = rated
    path = tmp_path / "r.csv"
    path.write_text("kit,item,rating,rated_at\n../../etc/passwd,00001,not,x\n")
    r = cli(["rate", run, "--score", path])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "is not a rating kit id")


def test_a_sweep_that_no_longer_fits_the_disk_keeps_the_users_files_in_its_per_layer_run(
    tmp_path, tiny_llama, text_dataset, caplog
):
    sweep_dir = tmp_path / "sweep"
    cfg = small_config(tiny_llama, text_dataset, **SWEEP_FIT, **{"report.ce_tokens": 128})
    args = ["sweep", "--run-dir", sweep_dir, "--no-progress", "--groups", "2"]
    assert cli([*args, "--config", write_config(tmp_path, cfg)]).exit_code == 0
    (sweep_dir / "per-layer" / "notes.txt").write_text("layer 3 is odd")
    small = small_config(tiny_llama, text_dataset, **SWEEP_FIT, **{"report.ce_tokens": 128, "compare.max_source_bytes": 1})
    (tmp_path / "small").mkdir()
    with caplog.at_level(logging.WARNING):
        r = cli([*args, "--config", write_config(tmp_path / "small", small)])
    assert r.exit_code == 0 and "harvesting each grouping directly instead" in r.output, r.output
    assert (sweep_dir / "per-layer" / "notes.txt").read_text() == "layer 3 is odd"
    assert not (sweep_dir / "per-layer" / "acts.zarr").exists()
    assert "per-layer/notes.txt" in caplog.text
