"""Every byte a tiny run stores is pinned: a refactor that changes one fails here, naming the file.

The digests below were recorded from the code before the structural reshape (issue 11) and must not
move unless a change means to alter what is stored (then say so in the commit, and bump the run
format where old runs would be misread). Paths are relative (the run is built inside tmp_path), so
the config hash does not depend on where the test runs. Values that are measured, not computed,
are zeroed before hashing: the wall-clock fields of the JSON records, the checkpoint's and
metrics' seconds and tokens/s. Everything else is hashed as stored, formatting included.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import torch
from runs import small_config

from conftest import generate_documents, save_tiny_model

# Fields whose values are wall-clock measurements (seconds taken, time written).
_VOLATILE_JSON = re.compile(rb'("(?:created|seconds|written_at)": )-?[0-9][0-9.e+-]*')
_VOLATILE_COLUMNS = ("tokens_per_s",)

EXPECTED = {  # recorded on main at 0ed3b33, before issue 11's reshape
    "acts.zarr/group_00/acts": "6bf0165386a45252",
    "acts.zarr/group_00/layer": "8cf23fd28debbcb5",
    "acts.zarr/group_00/pos": "bcf680414a8da173",
    "acts.zarr/group_00/seq": "cbb676fc1389710d",
    "acts.zarr/group_00/token": "e9561dfde2f18fea",
    "acts.zarr/group_00/zarr.json": "36615682d5be9646",
    "acts.zarr/group_01/acts": "b2ef7e4341aff2c6",
    "acts.zarr/group_01/layer": "45d0d298850ee8c4",
    "acts.zarr/group_01/pos": "bcf680414a8da173",
    "acts.zarr/group_01/seq": "cbb676fc1389710d",
    "acts.zarr/group_01/token": "e9561dfde2f18fea",
    "acts.zarr/group_01/zarr.json": "36615682d5be9646",
    "acts.zarr/zarr.json": "fe420b1b98976222",
    # config.json, saes/fit.json and the SAEs' cfg.json hold the resolved settings: they gained [compare] and
    # fit.transfer in issue 13 (the identity, the config hash and every other byte did not change)
    "config.json": "a8aa17e79304d14c",
    "ghsae-run.json": "ead602351bd5f4c2",
    "manifest/shard-00000.json": "9940ad7d3a3f7f25",
    "manifest/shard-00000.npz": "3467e59a69a2b60b",
    "manifest/shard-00001.json": "db63f4fc12802c33",
    "manifest/shard-00001.npz": "9f15d3db31496d89",
    "manifest/shard-00002.json": "afe073c81e4588cd",
    "manifest/shard-00002.npz": "21beabe387ed9c2f",
    "manifest/shard-00003.json": "ea95c43e5abbde3d",
    "manifest/shard-00003.npz": "4ad5ca5b0a142034",
    "manifest/stats.json": "9e62c49b52c5432a",
    "manifest/stats.npz": "899ef6fa3efcfb04",
    "plan/plan.json": "abbcfd7c505086a0",
    "plan/similarity.npz": "744f5b2dbbfca935",
    "plan/tokens.npy": "1a29492758c6f50f",
    "saes/fit.json": "7217d0a7aeddf321",  # new in issue 11: the fit settings the run's SAEs are trained with
    "saes/group_00/cfg.json": "c3086331172c8866",
    "saes/group_00/checkpoint.pt": "e63bfd9e41dea1d9",
    "saes/group_00/metrics.parquet": "adec4b70eb140131",
    "saes/group_00/sae.safetensors": "d87c57eb7ee68e95",
    "saes/group_01/cfg.json": "c38ff6a500b76859",
    "saes/group_01/checkpoint.pt": "30f085956fe34cb7",
    "saes/group_01/metrics.parquet": "77c922ed371eede9",
    "saes/group_01/sae.safetensors": "a13a15fd2edfe0e3",
}


# Since issue 13 a plan records stats_from = "stored-rows": the shards' per-layer sums are of the
# rows as stored, so a store derived from an all-layers harvest equals a direct one in every byte.
# That changes the plan, the sums and statistics, and so (through the normalisation) the SAEs.
EXPECTED_NOW = {
    **EXPECTED,  # every other file as before: the store's arrays, config, marker, probe, tokens, fit settings, cfg.json
    "manifest/shard-00000.json": "f3501d2eb51ae579",
    "manifest/shard-00000.npz": "6c7a90299151fc8a",
    "manifest/shard-00001.json": "4045919fe6148187",
    "manifest/shard-00001.npz": "a8a9fd4add6aa18f",
    "manifest/shard-00002.json": "7eddae41bad17458",
    "manifest/shard-00002.npz": "ccb049b0a881a46e",
    "manifest/shard-00003.json": "d097469d252ad871",
    "manifest/shard-00003.npz": "dca80eca7828e347",
    "manifest/stats.json": "30acf1c1dedbec28",
    "manifest/stats.npz": "20f43e9256c084d5",
    "plan/plan.json": "691e413382457eb7",
    "saes/group_00/checkpoint.pt": "89b90da39565ab03",
    "saes/group_00/metrics.parquet": "f7f714a0e00552b7",
    "saes/group_00/sae.safetensors": "4086e7b2d25ed7fc",
    "saes/group_01/checkpoint.pt": "eb235fbe7b553602",
    "saes/group_01/metrics.parquet": "f9fc3cd1ede9d727",
    "saes/group_01/sae.safetensors": "0b02310a0746035c",
}


def _json_digest(data: bytes) -> str:
    return hashlib.sha256(_VOLATILE_JSON.sub(rb"\g<1>0", data)).hexdigest()


def _parquet_digest(path: Path) -> str:
    table = pq.read_table(path)
    table = table.drop_columns([c for c in _VOLATILE_COLUMNS if c in table.column_names])
    h = hashlib.sha256(str(table.schema).encode())
    for name in table.column_names:
        h.update(name.encode())
        h.update(table[name].to_numpy().tobytes())
    return h.hexdigest()


def _canonical(obj, h) -> None:
    """Feed a checkpoint's nested dicts / lists / tensors into a hash, in key order."""
    if isinstance(obj, torch.Tensor):
        h.update(f"tensor{obj.dtype}{list(obj.shape)}".encode())
        h.update(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if key in ("seconds", *_VOLATILE_COLUMNS):
                continue
            h.update(f"key:{key}".encode())
            _canonical(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"list{len(obj)}".encode())
        for item in obj:
            _canonical(item, h)
    else:
        h.update(repr(obj).encode())


def _checkpoint_digest(path: Path) -> str:
    h = hashlib.sha256()
    _canonical(torch.load(io.BytesIO(path.read_bytes()), weights_only=True), h)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    if path.suffix == ".json":
        return _json_digest(path.read_bytes())
    if path.suffix == ".parquet":
        return _parquet_digest(path)
    if path.suffix == ".pt":
        return _checkpoint_digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_digests(run: Path) -> dict[str, str]:
    """Per file of the run (the Zarr store's files folded into one digest per array), short digests."""
    out: dict[str, str] = {}
    arrays: dict[str, hashlib._Hash] = {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        if rel.startswith(".locks/"):
            continue  # empty lock files, no content
        digest = file_digest(path)
        parts = rel.split("/")
        if parts[0] == "acts.zarr" and len(parts) > 3:  # acts.zarr/<group>/<array>/...
            key = "/".join(parts[:3])
            arrays.setdefault(key, hashlib.sha256()).update(f"{'/'.join(parts[3:])}:{digest}".encode())
        else:
            out[rel] = digest[:16]
    out.update({k: h.hexdigest()[:16] for k, h in arrays.items()})
    return dict(sorted(out.items()))


def build_tiny_run(folder: Path) -> Path:
    """Harvest and fit the small two-group config, with paths relative to `folder` (the cwd)."""
    from ghsae.pipeline import fit, harvest

    save_tiny_model(Path("model"), "llama")
    with open("docs.jsonl", "w") as fh:
        for doc in generate_documents(600):
            fh.write(json.dumps({"text": doc}) + "\n")
    cfg = small_config(Path("model"), Path("docs.jsonl"))
    harvest(cfg, "run", progress=False)
    fit(cfg, "run", progress=False)
    return folder / "run"


def _compare(got: dict[str, str], expected: dict[str, str]) -> None:
    changed = {k: (expected.get(k), v) for k, v in got.items() if expected.get(k) != v}
    gone = sorted(set(expected) - set(got))
    assert not changed and not gone, f"stored bytes changed: {changed}; files gone: {gone}"


def test_a_run_planned_as_before_issue_13_stores_exactly_the_bytes_it_stored_before_the_reshape(
    tmp_path, monkeypatch
):
    """A plan without stats_from (every run made before issue 13) keeps its rules: a resumed old
    run writes what it always wrote."""
    from ghsae.harvest import plan
    from ghsae.records import STATS_FROM_MODEL

    monkeypatch.setattr(plan, "STATS_FROM", STATS_FROM_MODEL)
    monkeypatch.chdir(tmp_path)
    _compare(run_digests(build_tiny_run(tmp_path)), EXPECTED)


def test_a_new_run_stores_exactly_the_pinned_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = run_digests(build_tiny_run(tmp_path))
    _compare(got, EXPECTED_NOW)
