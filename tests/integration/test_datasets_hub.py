"""Datasets and Hub ids: `datasets` save_to_disk folders, and Hub datasets, models and SAEs that the
local Hugging Face cache holds, read offline (nothing is downloaded).

The cache entries are written here in the layout huggingface_hub reads (blobs named by their
SHA-256, snapshots/<commit>/ of links to them, refs/main naming the commit), under an HF_HOME in
tmp, with the Hub set offline; the dataset files are what the Hub serves (parquet written by
`datasets`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import assert_one_line_error, cli, write_config

from conftest import generate_documents, needs_module, tiny_config

COMMIT = "5f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2c3d4"
DOCS = generate_documents(80, seed=3)
SMALL_HARVEST = {
    "harvest.tokens": 512,
    "harvest.eval_tokens": 64,
    "harvest.probe_tokens": 512,
    "harvest.shard_tokens": 512,
    "grouping.groups": [[0, 5]],
}

needs_datasets = needs_module("datasets", "pip install datasets")


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, set offline the way users do it."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home


def place_in_hub_cache(home: Path, repo_type: str, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Put `files` ({path in the repo: local file}) into the hub cache as huggingface_hub stores a
    download; returns the snapshot folder."""
    repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def harvest_tokens(run: Path, model, dataset, lm=None) -> tuple[np.ndarray, dict]:
    """The packed token array of a small harvest of `dataset`, and its plan.json."""
    from ghsae.pipeline import harvest

    harvest(tiny_config(model, dataset, **SMALL_HARVEST), run, progress=False, lm=lm)
    return np.load(run / "plan" / "tokens.npy"), json.loads((run / "plan" / "plan.json").read_text())


@pytest.fixture(scope="module")
def jsonl_tokens(tiny_llama, tiny_lm, tmp_path_factory) -> np.ndarray:
    folder = tmp_path_factory.mktemp("jsonl")
    return harvest_tokens(folder / "run", tiny_llama, write_jsonl(folder / "docs.jsonl", DOCS), tiny_lm)[0]


@needs_datasets
@pytest.mark.parametrize("split", [None, "train"])
def test_a_save_to_disk_folder_harvests_the_same_tokens_as_the_same_text_as_jsonl(
    split, tmp_path, tiny_llama, tiny_lm, jsonl_tokens
):
    import datasets

    docs = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    if split is None:  # several arrow shards, read in the dataset's order
        docs.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    else:  # a DatasetDict: its train split
        other = datasets.Dataset.from_dict({"text": ["w1 w2 w3"] * 50, "n": [0] * 50})
        datasets.DatasetDict({"test": other, "train": docs}).save_to_disk(str(tmp_path / "saved"))
    tokens, plan = harvest_tokens(tmp_path / "run", tiny_llama, tmp_path / "saved", tiny_lm)
    np.testing.assert_array_equal(tokens, jsonl_tokens)
    assert all(f.endswith(".arrow") for f, _ in plan["dataset"]["files"])


@needs_datasets
def test_a_hub_dataset_id_in_the_offline_cache_harvests_the_same_tokens_as_jsonl_and_records_its_commit(
    hf_home, tmp_path, tiny_llama, tiny_lm, jsonl_tokens
):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_dict({"text": ["w7 w8"] * 40}).to_parquet(str(tmp_path / "test.parquet"))
    files = {"data/train-00000-of-00001.parquet": tmp_path / "train.parquet"}
    files["data/test-00000-of-00001.parquet"] = tmp_path / "test.parquet"  # another split: not read
    place_in_hub_cache(hf_home, "dataset", "ghsae-test/docs", files)
    tokens, plan = harvest_tokens(tmp_path / "run", tiny_llama, "ghsae-test/docs", tiny_lm)
    np.testing.assert_array_equal(tokens, jsonl_tokens)
    assert plan["dataset"]["revision"] == COMMIT
    assert [Path(f).name for f, _ in plan["dataset"]["files"]] == ["train-00000-of-00001.parquet"]


@pytest.mark.parametrize(
    ("option", "kind", "download"),
    [
        ("--dataset", "dataset", "hf download --repo-type dataset ghsae-test/absent"),
        ("--model", "model", "hf download ghsae-test/absent"),
    ],
)
def test_an_id_the_hub_cache_lacks_is_a_one_line_error_naming_the_id_and_the_cache(
    option, kind, download, hf_home, tmp_path, tiny_llama, text_dataset
):
    cfg = write_config(tmp_path, tiny_config(tiny_llama, text_dataset))
    r = cli(["harvest", "--config", cfg, "--run-dir", tmp_path / "run", option, "ghsae-test/absent"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, f"the Hugging Face cache {hf_home / 'hub'} holds no {kind} ghsae-test/absent")
    assert download in r.output
    assert not (tmp_path / "run").exists()


def test_a_model_in_the_hub_cache_named_by_id_loads_and_its_commit_is_recorded(
    hf_home, tmp_path, tiny_llama, text_dataset
):
    from ghsae.lm import load_model

    place_in_hub_cache(hf_home, "model", "ghsae-test/tiny-llama", {p.name: p for p in tiny_llama.iterdir()})
    _, plan = harvest_tokens(tmp_path / "run", "ghsae-test/tiny-llama", text_dataset)
    local = load_model(str(tiny_llama), "cpu", "float32").identity
    assert plan["model"]["source"] == "ghsae-test/tiny-llama"
    assert plan["model"]["revision"] == COMMIT
    assert plan["model"]["fingerprint"] == local.fingerprint  # the same weights as the folder they came from
    assert "revision" not in local.to_json()


def test_load_sae_reads_an_sae_of_the_hub_cache_by_id_and_keeps_its_commit(hf_home, fitted_template):
    import ghsae

    folder = fitted_template / "saes" / "group_01"
    files = {f"group_01/{name}": folder / name for name in ("cfg.json", "sae.safetensors")}
    place_in_hub_cache(hf_home, "model", "ghsae-test/tiny-saes", files)
    sae, local = ghsae.load_sae("ghsae-test/tiny-saes/group_01"), ghsae.load_sae(folder)
    for name, tensor in local.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert sae.cfg.extra["hub"] == {"id": "ghsae-test/tiny-saes/group_01", "revision": COMMIT}


def test_load_sae_of_an_id_the_cache_lacks_names_the_id_and_the_cache(hf_home):
    import ghsae
    from ghsae.sae import SAELoadError

    with pytest.raises(SAELoadError, match="holds no model ghsae-test/absent .*hf download ghsae-test/absent"):
        ghsae.load_sae("ghsae-test/absent/group_00")


def test_a_hub_snapshot_is_read_as_its_train_split_and_a_plain_folder_whole(hf_home, tmp_path):
    from ghsae.harvest.text import resolve_files

    names = ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl", "data/validation.jsonl"]
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS[:3])
    snapshot = place_in_hub_cache(hf_home, "dataset", "ghsae-test/split", dict.fromkeys(names, source))
    assert resolve_files("ghsae-test/split") == [snapshot / n for n in names[:2]]
    shutil.copytree(snapshot, tmp_path / "local", symlinks=False)
    assert [p.name for p in resolve_files(str(tmp_path / "local"))] == [Path(n).name for n in names]
