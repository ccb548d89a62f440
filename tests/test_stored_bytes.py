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
    "config.json": "b41a809844c507c6",
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
    "saes/fit.json": "164d9fdab4dbebcd",  # new in issue 11: the fit settings the run's SAEs are trained with
    "saes/group_00/cfg.json": "4898af1ff38c2a47",
    "saes/group_00/checkpoint.pt": "e63bfd9e41dea1d9",
    "saes/group_00/metrics.parquet": "adec4b70eb140131",
    "saes/group_00/sae.safetensors": "d87c57eb7ee68e95",
    "saes/group_01/cfg.json": "0c73dd10f1a05640",
    "saes/group_01/checkpoint.pt": "30f085956fe34cb7",
    "saes/group_01/metrics.parquet": "77c922ed371eede9",
    "saes/group_01/sae.safetensors": "a13a15fd2edfe0e3",
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


def test_a_tiny_run_stores_exactly_the_bytes_it_stored_before_the_reshape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = run_digests(build_tiny_run(tmp_path))
    changed = {k: (EXPECTED.get(k), v) for k, v in got.items() if EXPECTED.get(k) != v}
    gone = sorted(set(EXPECTED) - set(got))
    assert not changed and not gone, f"stored bytes changed: {changed}; files gone: {gone}"
