"""Every record's JSON is pinned: the bytes each writes, what each reads from older files, its errors.

tests/assets/records.json holds, per example below, the exact text `json.dumps(record.to_json())`
gives (keys, their order, keys left out, float formatting), and for each older or minimal JSON
object the repr of what `from_json` reads from it. A change that means to alter a record's JSON
records them again and says so:

    GHSAE_RECORD_RECORDS=1 .venv/bin/python -m pytest tests/unit/core/test_records_roundtrip.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from ghsae import records as rec
from ghsae.errors import DamagedFileError

ASSET = Path(__file__).resolve().parents[2] / "assets" / "records.json"
RECORD = bool(os.environ.get("GHSAE_RECORD_RECORDS"))


def _model(revision: str | None) -> rec.ModelIdentity:
    return rec.ModelIdentity("builtin:tiny-llama", "ab12" * 8, "LlamaForCausalLM", revision)


def _tokenizer(bos: int | None) -> rec.TokenizerIdentity:
    return rec.TokenizerIdentity("cd34" * 8, bos, 2 if bos is not None else None, (0, 1, 2) if bos is not None else ())


def _grouping(last_layer: str) -> rec.GroupingRecord:
    return rec.GroupingRecord(
        distance="layer-centred",
        method="dp",
        threshold=0.2,
        objective="layer-mean",
        curve=(0.5, 0.25, 1e-05, 0.0),
        objective_curve=(1.5, 0.75, 0.1, 0.0),
        chosen_groups=2,
        chosen_amad=0.1 + 0.2,  # 0.30000000000000004: every digit of the float is written
        last_layer=last_layer,
    )


def _group_rows(files: bool) -> rec.GroupRows:
    return rec.GroupRows(
        rows=1000,
        layer_counts={0: 480, 1: 520},
        checksums={"acts": "ff" * 16, "layer": "ee" * 16},
        files={"acts": 65536, "layer": 2048} if files else {},
    )


def _layer_stats(norms: bool) -> rec.LayerStats:
    summary = rec.NormSummary(median_norm=3.5, q99_norm=12.25, q999_norm=40.0, max_norm=1234.5, outliers=3.0)
    return rec.LayerStats(count=2000, mean_norm=4.0, mean_sq_norm=17.5, scale=2.0, norms=summary if norms else None)


def _provenance() -> rec.Provenance:
    store = rec.StoreState(config_hash="9f" * 8, shards=(0, 1, 2), n_shards=4, rows_digest="aa" * 16)
    return rec.Provenance(fit={"lr": 0.003, "k": 32, "architecture": "topk", "layers": None}, store=store)


def examples() -> dict[str, Any]:
    """A representative instance of every record: nested ones filled in, optional fields set and unset."""
    plan_args: dict[str, Any] = dict(
        config_hash="0123456789abcdef",
        model=_model("rev0"),
        tokenizer=_tokenizer(1),
        dataset=rec.DatasetIdentity(
            "docs.jsonl", "ef" * 16, (("docs.jsonl", 12345), ("more.jsonl", 6)), "3.11.2", "dsrev"
        ),
        n_layers_model=4,
        d_model=64,
        layers=(0, 1, 2, 3),
        groups=((0, 1), (2,), (3,)),
        group_names=("group_00", "group_01", "group_02"),
        context_length=128,
        n_contexts_harvest=40,
        n_contexts_eval=8,
        contexts_per_shard=10,
        n_shards=4,
        shard_rows=1280,
        grouping=_grouping("own"),
        probe_tokens=4096,
    )
    shard = rec.ShardRecord(
        shard=3,
        config_hash="0123456789abcdef",
        contexts=(30, 40),
        stored_tokens=1000,
        groups={"group_00": _group_rows(True), "group_01": _group_rows(False)},
        layer_stats={0: rec.LayerSums(480, 1920.5, 8000.25), 1: rec.LayerSums(520, 2080.0, 9000.0)},
        seconds=1.75,
        written_at=1700000000.123456,
    )
    key_items = (
        rec.RatingItem("i00", "group_00", "group", 0, 17),
        rec.RatingItem("i01", "layer_00", "baseline", 0, 3),
    )
    score = rec.Score("group_00", "group", 0, 7, 2, 1, 7 / 9, 0.45, 0.94)
    return {
        "RunMarker": rec.RunMarker("ghsae-run", 1, 1700000000.5),
        "RunConfig": rec.RunConfig({"model": {"path": "m"}, "seed": 0}, {"model": {"path": "m"}, "batch": 8}, "feed"),
        "ModelIdentity": _model("rev0"),
        "ModelIdentity-local": _model(None),
        "TokenizerIdentity": _tokenizer(1),
        "TokenizerIdentity-no-bos": _tokenizer(None),
        "DatasetIdentity": plan_args["dataset"],
        "DatasetIdentity-minimal": rec.DatasetIdentity("builtin:python-docs", "ef" * 16),
        "GroupingRecord-own": _grouping("own"),
        "GroupingRecord-grouped": _grouping("grouped"),
        "Plan": rec.Plan(**plan_args, seconds=12.5, stats_from=rec.STATS_FROM_STORED, hookpoint="mlp_out"),
        "Plan-defaults": rec.Plan(**{**plan_args, "model": _model(None), "grouping": _grouping("grouped")}),
        "GroupRows": _group_rows(True),
        "GroupRows-no-files": _group_rows(False),
        "LayerSums": rec.LayerSums(480, 1920.5, 8000.25),
        "ShardRecord": shard,
        "ShardRecord-unmeasured": dataclasses.replace(shard, seconds=None, written_at=None),
        "NormSummary": _layer_stats(True).norms,
        "LayerStats": _layer_stats(True),
        "LayerStats-no-norms": _layer_stats(False),
        "RunStats": rec.RunStats("0123", 64, 8.0, {0: _layer_stats(True), 3: _layer_stats(False)}, 10.0),
        "RunStats-no-factor": rec.RunStats("0123", 64, 8.0, {0: _layer_stats(False)}),
        "StoreState": _provenance().store,
        "Provenance": _provenance(),
        "WeightsDigest": rec.WeightsDigest.of(b"weights"),
        "SAERecord": rec.SAERecord(
            sae={"architecture": "topk", "layers": [0, 1], "k": 32},
            fit={"lr": 0.003, "seed": 0},
            provenance=_provenance(),
            tokens=65536,
            steps=128,
            seconds=4.25,
            weights=rec.WeightsDigest.of(b"weights"),
        ),
        "SAERecord-defaults": rec.SAERecord(sae={"architecture": "relu", "layers": [2]}),
        "SAERecord-old": rec.SAERecord(sae={"architecture": "relu", "layers": [2]}, format=None, version=None),
        "FitSettings": rec.FitSettings({"lr": 0.003, "seed": 0, "outliers": "keep"}),
        "ReportSettings": rec.ReportSettings({"ce_tokens": 4096}, 0, {"dtype": "float32"}, "../per-layer"),
        "ReportSettings-no-baseline": rec.ReportSettings({"ce_tokens": 4096}, 1, {"dtype": "float32"}),
        "DerivedFrom": rec.DerivedFrom("../per-layer", "0123"),
        "SweepRecord": rec.SweepRecord(
            "ghsae-sweep", 1, ("2", "auto", "per-layer"), "0123", 1700000000.25, "fe", (4096, 8192), 16384
        ),
        "SweepRecord-old": rec.SweepRecord("ghsae-sweep", 1, ("3",), "0123", 1700000000.25),
        "LrChoiceRecord": rec.LrChoiceRecord(
            grid=(0.001, 0.003, 0.01),
            budget=4096,
            validation_contexts=(40, 44),
            eval_contexts=(44, 48),
            metric="fvu",
            scores={"G2": (0.5, 0.25, 0.75), "per-layer": (0.4, 0.2, 0.6)},
            chosen={"G2": 0.003, "per-layer": 0.003},
        ),
        "RatingItem": key_items[0],
        "RatingKey": rec.RatingKey("kit0", "/runs/a", "/runs/b", 0, key_items),
        "RatingKey-no-baseline": rec.RatingKey("kit1", "/runs/a", None, 3, ()),
        "Score": score,
        "Score-unrated": rec.Score("layer_00", "baseline", 0, 0, 0, 4, math.nan, 0.0, 1.0),
        "RatingScores": rec.RatingScores("kit0", (score,)),
    }


def legacy_objects() -> dict[str, tuple[type, Any]]:
    """JSON objects as older ghsae wrote them (or the fewest keys a reader accepts): what each reads as."""
    grouping = {"distance": "centred", "threshold": 0.2, "chosen_groups": 2, "chosen_amad": 0.3}
    plan = {
        "config_hash": "0123",
        "model": {"source": "m", "fingerprint": "ab"},
        "tokenizer": {"fingerprint": "cd"},
        "dataset": {"spec": "docs.jsonl"},
        "n_layers_model": 2,
        "d_model": 8,
        "layers": [0, 1],
        "groups": [[0, 1]],
        "group_names": ["group_00"],
        "context_length": 16,
        "n_contexts_harvest": 4,
        "contexts_per_shard": 2,
        "n_shards": 2,
        "shard_rows": 32,
        "amad": grouping,
    }
    layer_stats = {"count": 3, "mean_norm": 1.5, "mean_sq_norm": 2.5, "scale": 2}
    return {
        "RunMarker-not-an-object": (rec.RunMarker, ["ghsae-run"]),
        "RunMarker-empty": (rec.RunMarker, {}),
        "RunConfig-empty": (rec.RunConfig, {}),
        "ModelIdentity": (rec.ModelIdentity, {"source": "m", "fingerprint": "ab"}),
        "TokenizerIdentity": (rec.TokenizerIdentity, {"fingerprint": "cd"}),
        "DatasetIdentity": (rec.DatasetIdentity, {"spec": "docs.jsonl"}),
        "GroupingRecord": (rec.GroupingRecord, grouping),
        "Plan": (rec.Plan, plan),
        "Plan-version-1": (rec.Plan, {**plan, "version": 1}),
        "GroupRows": (rec.GroupRows, {"rows": 5, "layer_counts": {"0": 5}, "checksums": {"acts": "ff"}}),
        "ShardRecord": (
            rec.ShardRecord,
            {
                "shard": 0,
                "config_hash": "0123",
                "contexts": [0, 2],
                "stored_tokens": 5,
                "groups": {"group_00": {"rows": 5, "layer_counts": {"0": 5}, "checksums": {}}},
                "layer_stats": {"0": {"count": 5, "sum_norm": 10, "sum_sq_norm": 20.5}},
            },
        ),
        "LayerStats": (rec.LayerStats, layer_stats),
        "RunStats": (
            rec.RunStats,
            {"config_hash": "0123", "d_model": 8, "target_norm": 3, "layers": {"1": layer_stats}},
        ),
        "StoreState": (rec.StoreState, {"config_hash": "0123", "shards": [0], "n_shards": 1, "rows_digest": "aa"}),
        "SAERecord": (rec.SAERecord, {"sae": {"architecture": "topk", "layers": [0]}}),
        "SAERecord-nulls": (
            rec.SAERecord,
            {"sae": {"architecture": "topk"}, "provenance": None, "weights": None, "seconds": None, "tokens": 8},
        ),
        "FitSettings": (rec.FitSettings, {"fit": {}}),
        "ReportSettings": (rec.ReportSettings, {"report": {}, "seed": 0, "model": {}}),
        "DerivedFrom": (rec.DerivedFrom, {"source": "..", "source_config_hash": "0123"}),
        "SweepRecord": (
            rec.SweepRecord,
            {"format": "ghsae-sweep", "version": 1, "groupings": ["2"], "config_hash": "0123", "created": 5},
        ),
        "RatingKey": (rec.RatingKey, {"kit": "k", "run": "r", "seed": 0, "items": []}),
    }


# (class, JSON object, what the error must say): a newer version, another format, a missing key, a wrong type
MALFORMED: dict[str, tuple[type, Any, str]] = {
    "newer-version": (rec.Plan, {"version": 2}, "plan.json has record version 2"),
    "not-an-object": (rec.ShardRecord, [1, 2], "the shard record is not a JSON object"),
    "sparsify": (rec.SAERecord, {"d_in": 64, "k": 32}, "sparsify SAE folder"),
    "other-format": (rec.SAERecord, {"sae": {}, "format": "other"}, "its format is 'other'"),
    "missing": (rec.Plan, {"layers": [0]}, "not a Plan record (config_hash is missing; expected a string)"),
    "nested-missing": (
        rec.RatingScores,
        {"kit": "k", "scores": [{"sae": "s"}]},
        "not a RatingScores record (scores[0].kind is missing; expected a string)",
    ),
    "wrong-type": (
        rec.ShardRecord,
        {"shard": "3"},
        'not a Shard record (shard is "3"; expected an integer)',
    ),
    "true-is-no-integer": (rec.LayerSums, {"count": True}, "count is true; expected an integer"),
    "null": (rec.ModelIdentity, {"source": None}, "source is null; expected a string"),
    "short-list": (
        rec.LrChoiceRecord,
        {"grid": [], "budget": 1, "validation_contexts": [4]},
        "validation_contexts is [4]; expected a list of 2: an integer, an integer",
    ),
    "nested-wrong-type": (
        rec.RunStats,
        {"config_hash": "0", "d_model": 8, "target_norm": 1.0, "layers": {"3": {"count": 1, "mean_norm": "x"}}},
        'layers["3"].mean_norm is "x"; expected a number',
    ),
    "layer-key": (
        rec.GroupRows,
        {"rows": 1, "layer_counts": {"a": 1}},
        'a key of layer_counts is "a"; expected an integer',
    ),
    "not-a-record": (rec.Plan, {"config_hash": "0", "model": []}, "model is []; expected an object (ModelIdentity)"),
}


def _dump(record: Any) -> str:
    return json.dumps(record.to_json(), sort_keys=False)


def _describe(value: Any) -> str:
    """repr, with a record's fields in name order (so the pin is of the values read, not of the fields' order)."""
    if dataclasses.is_dataclass(value):
        fields = sorted(f.name for f in dataclasses.fields(value))
        return f"{type(value).__name__}({', '.join(f'{n}={_describe(getattr(value, n))}' for n in fields)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + "".join(f"{_describe(v)}, " for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return repr(value)


def _read(name: str) -> str:
    """What the legacy object `name` reads as, and the JSON that record writes."""
    cls, obj = legacy_objects()[name]
    record = cls.from_json(json.loads(json.dumps(obj)))
    return f"{_describe(record)} -> {_dump(record)}"


def _actual() -> dict[str, dict[str, str]]:
    return {
        "written": {name: _dump(r) for name, r in examples().items()},
        "read": {name: _read(name) for name in legacy_objects()},
    }


@pytest.fixture(scope="module")
def expected() -> dict[str, dict[str, str]]:
    if RECORD:
        ASSET.write_text(json.dumps(_actual(), indent=1) + "\n")
    return json.loads(ASSET.read_text())


def test_every_record_class_has_an_example():
    classes = {
        name
        for name, obj in vars(rec).items()
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == rec.__name__
    }
    assert classes == {name.split("-")[0] for name in examples()}


@pytest.mark.parametrize("name", sorted(examples()))
def test_written_json_is_pinned(name, expected):
    assert _dump(examples()[name]) == expected["written"][name]


@pytest.mark.parametrize("name", sorted(examples()))
def test_read_back_is_the_same_record(name):
    record = examples()[name]
    text = _dump(record)
    back = type(record).from_json(json.loads(text))
    assert _dump(back) == text
    if name != "Score-unrated":  # nan != nan
        assert back == record


@pytest.mark.parametrize("name", sorted(legacy_objects()))
def test_older_json_reads_as_pinned(name, expected):
    assert _read(name) == expected["read"][name]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_record_is_refused_with_its_reason(name):
    cls, obj, says = MALFORMED[name]
    with pytest.raises(DamagedFileError) as info:
        cls.from_json(obj)
    assert says in str(info.value)


def test_load_record_names_the_file_what_is_wrong_and_the_fix(tmp_path):
    path = tmp_path / "plan.json"
    plan = json.loads(_dump(examples()["Plan"]))
    path.write_text(json.dumps({**plan, "model": {**plan["model"], "fingerprint": 7}}))
    with pytest.raises(DamagedFileError) as info:
        rec.load_record(rec.Plan, path, fix="re-run it")
    expected = f"{path} is damaged: not a Plan record (model.fingerprint is 7; expected a string); re-run it"
    assert str(info.value) == expected


def test_a_whole_float_reads_into_an_int_field_and_a_float_field_keeps_an_int():
    stats = rec.LayerStats.from_json({"count": 3.0, "mean_norm": 2, "mean_sq_norm": 4.5, "scale": 1})
    assert stats.count == 3 and isinstance(stats.count, int)
    assert _dump(stats) == '{"count": 3, "mean_norm": 2, "mean_sq_norm": 4.5, "scale": 1}'


def test_a_missing_key_reads_as_a_fresh_value_never_one_shared_between_records():
    a, b = (rec.GroupRows.from_json({"rows": 1, "layer_counts": {}, "checksums": {}}) for _ in range(2))
    assert a.files == {} and a.files is not b.files
