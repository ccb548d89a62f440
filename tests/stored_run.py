"""What a tiny run stores, reduced to a form that two machines can compare.

A run's files mix two kinds of content. Integers, text and structure (token ids, layer draws,
positions, array metadata, settings, the partition) are the same on every machine, and are pinned
exactly. Floats computed by the model or by training (activations, sums, statistics, distances,
SAE weights, losses) differ in their last bits between CPUs, because torch and MKL choose other
kernels on other vector units (AVX2, AVX-512, AMX): those are compared to a stored reference within
a tolerance. A digest of float bytes (a shard's `acts` checksum, an SAE's `rows_digest`) changes
with them, so it is not pinned; the run's own verification checks it against the data instead.

`snapshot(run)` walks the run and returns {file: entry}; each entry is either
{"digest": sha256} for a file pinned exactly, or a tree whose leaves are exact values or
{"floats": key} pointing into a dict of float arrays. `compare(got, expected)` returns the list
of differences, each naming the file, the place in it and what changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import zarr
from safetensors.numpy import load_file

# Fields that are wall-clock measurements: never compared.
VOLATILE_KEYS = {"created", "seconds", "written_at", "tokens_per_s"}

# JSON fields holding digests of float bytes (they move with the floats; Run.verify checks them).
FLOAT_DIGEST_FIELDS = (
    "manifest/shard-*.json:groups.*.checksums.acts",
    "saes/*/cfg.json:provenance.store.rows_digest",
    "saes/*/checkpoint.pt:provenance.store.rows_digest",
    "saes/*/checkpoint.pt:digest",
    "saes/*/cfg.json:weights.sha256",
)


# Values read off a histogram of float norms (cache/norms.py): a norm on a bin's edge lands in the
# next bin on another CPU, so counts move by one between neighbouring bins and the quantiles and
# outlier counts read off them by a fraction of a bin (4.4 %).
BINNED = ("manifest/*.npz::norm_hist", "manifest/stats.json::layers.*.norms.*")


def _is_binned(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) for pat in BINNED)


def _binned_difference(got: np.ndarray, expected: np.ndarray) -> str | None:
    """Histograms [L, B]: the same totals, cumulative counts within 1 % of the total (and 2 rows);
    values read off them: within a bin's width (5 %) or 2 (counts)."""
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    if got.ndim == 2:
        if not np.array_equal(got.sum(axis=1), expected.sum(axis=1)):
            return f"histogram totals {got.sum(axis=1)} where {expected.sum(axis=1)} were stored"
        slack = np.maximum(2.0, 0.01 * expected.sum(axis=1))[:, None]
        worst = np.abs(np.cumsum(got, axis=1) - np.cumsum(expected, axis=1)) - slack
        return f"cumulative counts moved by {worst.max() + slack.max():.0f}" if worst.max() > 0 else None
    if np.all(np.abs(got - expected) <= np.maximum(0.05 * np.abs(expected), 2.0 * (expected == np.round(expected)))):
        return None
    return f"{got.tolist()} where {expected.tolist()} was stored (beyond a bin's width)"


@dataclass(frozen=True)
class Tolerance:
    """How far a float may move between machines, relative to the largest magnitude of its array.

    Activations are computed in float32 and stored in float16: a kernel's last-bit difference
    moves a value by at most one float16 step (2^-10 relative), so 4e-3 of the array's largest
    value is a few steps of slack and still catches any real change (another layer, another row,
    another scale moves values by tens of percent). Trained weights integrate many steps of such
    differences and a TopK selection can flip on a near-tie, so they get more room; a wrong seed,
    learning rate or data order moves them by far more than 1 %. Measured between AVX-512 kernels
    and the portable ones (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE) on the tiny run:
    2.5e-4 for activations, 1.3e-5 for trained tensors.
    """

    computed: float = 4e-3
    trained: float = 1e-2


TOLERANCE = Tolerance()


def _is_trained(file: str) -> bool:
    return file.startswith("saes/") and not file.endswith(".json")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Snapshot:
    """Entries per file plus the float arrays they point to."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.floats: dict[str, np.ndarray] = {}

    def float_leaf(self, file: str, where: str, value: np.ndarray) -> dict:
        key = f"{file}::{where}"
        self.floats[key] = np.asarray(value, dtype=np.float64) if np.ndim(value) == 0 else np.asarray(value)
        return {"floats": key, "shape": list(np.shape(value))}

    def array_leaf(self, file: str, where: str, value: np.ndarray) -> Any:
        """Integers and booleans exactly (by digest), floats by reference."""
        value = np.asarray(value)
        if value.dtype.kind in "fc" or _is_binned(f"{file}::{where}"):
            return self.float_leaf(file, where, value)
        return {"dtype": str(value.dtype), "shape": list(value.shape), "digest": _digest(value.tobytes())}


def _tree(snap: Snapshot, file: str, obj: Any, where: str = "") -> Any:
    """A JSON-like tree with its floats moved into the snapshot's arrays."""
    if isinstance(obj, dict):
        out = {}
        for key in sorted(obj, key=str):
            if str(key) in VOLATILE_KEYS:
                continue
            path = f"{where}.{key}" if where else str(key)
            if any(fnmatch.fnmatchcase(f"{file}:{path}", pat) for pat in FLOAT_DIGEST_FIELDS):
                out[str(key)] = "<digest of floats>"
            else:
                out[str(key)] = _tree(snap, file, obj[key], path)
        return out
    if isinstance(obj, (list, tuple)):
        return [_tree(snap, file, item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return snap.array_leaf(file, where, tensor.numpy())
    if isinstance(obj, np.ndarray):
        return snap.array_leaf(file, where, obj)
    if isinstance(obj, float):
        return snap.float_leaf(file, where, np.float64(obj))
    return obj


def _zarr_arrays(snap: Snapshot, run: Path) -> None:
    """One entry per stored array (its values, not its chunk files' bytes) and per metadata file."""
    root = zarr.open_group(run / "acts.zarr", mode="r")
    for meta in sorted((run / "acts.zarr").rglob("zarr.json")):
        rel = meta.relative_to(run).as_posix()
        snap.entries[rel] = {"digest": _digest(meta.read_bytes())}
    for group_name in sorted(root.group_keys()):
        for array_name in sorted(root[group_name].array_keys()):
            array = root[group_name][array_name]
            values = np.asarray(array[:])
            if array.attrs.get("logical_dtype") == "bfloat16":  # kept as uint16 bits
                values = (values.astype(np.uint32) << 16).view(np.float32)
            rel = f"acts.zarr/{group_name}/{array_name}"
            snap.entries[rel] = snap.array_leaf(rel, "values", values)


def _file_entry(snap: Snapshot, run: Path, path: Path) -> Any:
    rel = path.relative_to(run).as_posix()
    if path.suffix == ".json":
        return _tree(snap, rel, json.loads(path.read_text()))
    if path.suffix == ".npz":
        with np.load(path) as npz:
            return {key: snap.array_leaf(rel, key, npz[key]) for key in sorted(npz.files)}
    if path.suffix == ".npy":
        return snap.array_leaf(rel, "values", np.load(path))
    if path.suffix == ".safetensors":
        tensors = load_file(path)
        return {key: snap.array_leaf(rel, key, tensors[key]) for key in sorted(tensors)}
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        columns = {"schema": str(table.schema)}
        for name in table.column_names:
            if name not in VOLATILE_KEYS:
                columns[name] = snap.array_leaf(rel, name, table[name].to_numpy())
        return columns
    if path.suffix == ".pt":
        return _tree(snap, rel, torch.load(io.BytesIO(path.read_bytes()), weights_only=True))
    return {"digest": _digest(path.read_bytes())}


def snapshot(run: Path) -> Snapshot:
    snap = Snapshot()
    _zarr_arrays(snap, run)
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        if rel.startswith((".locks/", "acts.zarr/")):
            continue  # lock files are empty; the store is read as arrays above
        snap.entries[rel] = _file_entry(snap, run, path)
    return snap


def _float_difference(key: str, got: np.ndarray, expected: np.ndarray) -> str | None:
    file = key.split("::")[0]
    if got.shape != expected.shape:
        return f"shape {list(got.shape)} where {list(expected.shape)} was stored"
    if _is_binned(key):
        return _binned_difference(got, expected)
    if not np.all(np.isfinite(got) == np.isfinite(expected)):
        return "non-finite values where the reference has finite ones (or the reverse)"
    scale = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0)) or 1.0
    tol = TOLERANCE.trained if _is_trained(file) else TOLERANCE.computed
    worst = float(np.max(np.abs(np.nan_to_num(got.astype(np.float64) - expected.astype(np.float64))), initial=0.0))
    if worst > tol * scale:
        return f"moved by {worst:.3g}, over the tolerance {tol:g} x {scale:.3g} (the largest stored magnitude)"
    return None


def relative_movement(got: Snapshot, expected: Snapshot) -> dict[str, float]:
    """Per float array present in both: the largest change over the largest stored magnitude."""
    out = {}
    for key, ref in expected.floats.items():
        if key in got.floats and got.floats[key].shape == ref.shape:
            scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
            diff = np.abs(got.floats[key].astype(np.float64) - ref.astype(np.float64))
            out[key] = float(np.max(diff, initial=0.0)) / scale
    return out


def compare(got: Snapshot, expected: Snapshot) -> list[str]:
    problems: list[str] = []

    def walk(file: str, a: Any, b: Any, where: str) -> None:
        if isinstance(b, dict) and "floats" in b:
            if not (isinstance(a, dict) and "floats" in a):
                problems.append(f"{file} {where}: {a!r} where floats were stored")
                return
            problem = _float_difference(b["floats"], got.floats[a["floats"]], expected.floats[b["floats"]])
            if problem:
                problems.append(f"{file} {where or '(values)'}: {problem}")
        elif isinstance(b, dict) and isinstance(a, dict):
            for key in sorted(set(a) | set(b)):
                inner = f"{where}.{key}" if where else key
                if key not in a or key not in b:
                    problems.append(f"{file} {inner}: {'missing' if key not in a else 'new'}")
                else:
                    walk(file, a[key], b[key], inner)
        elif isinstance(b, list) and isinstance(a, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(file, x, y, f"{where}[{i}]")
        elif a != b:
            problems.append(f"{file} {where or '(file)'}: {a!r} where {b!r} was stored")

    for file in sorted(set(got.entries) | set(expected.entries)):
        if file not in got.entries:
            problems.append(f"{file}: gone")
        elif file not in expected.entries:
            problems.append(f"{file}: new file (not in the reference)")
        else:
            walk(file, got.entries[file], expected.entries[file], "")
    return problems


def _float_keys(entry: Any) -> list[str]:
    if isinstance(entry, dict):
        if "floats" in entry:
            return [entry["floats"]]
        return [k for value in entry.values() for k in _float_keys(value)]
    if isinstance(entry, list):
        return [k for value in entry for k in _float_keys(value)]
    return []


def save(snap: Snapshot, folder: Path, name: str, base: Snapshot | None = None) -> None:
    """The reference as two files: a readable JSON of its entries and an npz of their floats.

    With `base`, only the files that differ from it are kept (a variant stored as its changes)."""
    entries = snap.entries
    if base is not None:
        entries = {f: e for f, e in entries.items() if f not in base.entries or _file_differs(snap, base, f)}
    floats = {k: snap.floats[k] for e in entries.values() for k in _float_keys(e)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(folder / f"{name}.npz", **{k.replace("/", "|"): v for k, v in floats.items()})


def load(folder: Path, name: str, base: Snapshot | None = None) -> Snapshot:
    snap = Snapshot()
    if base is not None:
        snap.entries, snap.floats = dict(base.entries), dict(base.floats)
    snap.entries.update(json.loads((folder / f"{name}.json").read_text()))
    with np.load(folder / f"{name}.npz") as npz:
        snap.floats.update({k.replace("|", "/"): npz[k] for k in npz.files})
    return snap


def _file_differs(a: Snapshot, b: Snapshot, file: str) -> bool:
    one_a, one_b = Snapshot(), Snapshot()
    one_a.entries, one_a.floats = {file: a.entries[file]}, a.floats
    one_b.entries, one_b.floats = {file: b.entries[file]}, b.floats
    return bool(compare(one_a, one_b))


# --- Byte digests, for comparing two runs made on the same machine ---------------------------------
# Within one process, or between processes on one machine, the same computation gives the same bits:
# a derived store must equal a direct harvest byte for byte there. Never compare these digests with
# ones recorded on another machine.

_VOLATILE_JSON = re.compile(rb'("(?:created|seconds|written_at)": )-?[0-9][0-9.e+-]*')
_VOLATILE_COLUMNS = ("tokens_per_s",)


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
