"""The run's records: the plan, one completion record per shard, and what they add up to.

A shard is done when, and only when, its record exists. The record is written after the shard's
rows are in the store, to a temporary name and then renamed, so a run killed at any moment leaves
either no record (the shard is redone from scratch) or a complete one.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ghsae import faults
from ghsae.cache.store import ROW_METADATA_BYTES, ActivationStore
from ghsae.errors import DamagedFileError, StoreError
from ghsae.layout import RunLayout


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def write_bytes_atomic(path: Path, data: bytes | memoryview, fault: str | None = None) -> None:
    """Temp file + fsync + rename; on any failure (a full disk) the temp file is removed, the old file kept."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if fault:
                faults.point(fault, path)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buffer.getbuffer())


def read_json(path: Path, fix: str = "re-run `ghsae harvest` with the same config to rewrite it") -> Any:
    """Parse a JSON file of the run; a damaged one (empty, truncated, not JSON) is a DamagedFileError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        size = path.stat().st_size
        what = "empty" if size == 0 else f"not valid JSON ({e.__class__.__name__} at {getattr(e, 'pos', '?')})"
        raise DamagedFileError(f"{path} is damaged: {what}; {fix}") from None


@dataclass
class Plan:
    """What plan.json holds, with the accessors the later stages need."""

    data: dict

    @property
    def layers(self) -> list[int]:
        return list(self.data["layers"])

    @property
    def groups(self) -> list[list[int]]:
        return [list(g) for g in self.data["groups"]]

    @property
    def group_names(self) -> list[str]:
        return list(self.data["group_names"])

    @property
    def n_shards(self) -> int:
        return int(self.data["n_shards"])

    @property
    def contexts_per_shard(self) -> int:
        return int(self.data["contexts_per_shard"])

    @property
    def n_contexts_harvest(self) -> int:
        return int(self.data["n_contexts_harvest"])

    @property
    def context_length(self) -> int:
        return int(self.data["context_length"])

    def shard_contexts(self, shard: int) -> tuple[int, int]:
        start = shard * self.contexts_per_shard
        return start, min(start + self.contexts_per_shard, self.n_contexts_harvest)


def load_plan(layout: RunLayout) -> Plan:
    if not layout.plan.is_file():
        raise StoreError(
            f"{layout.root} has no plan ({layout.plan}); run `ghsae harvest --run-dir {layout.root}` "
            "(with the run's config) to make it"
        )
    return Plan(read_json(layout.plan))


def plan_complete(layout: RunLayout) -> bool:
    """Every file of the plan step is there (a deleted tokens.npy or plan.json makes harvest rebuild it)."""
    return all(p.is_file() for p in (layout.plan, layout.tokens, layout.similarity))


def require_tokens(layout: RunLayout) -> Path:
    if not layout.tokens.is_file():
        raise StoreError(
            f"{layout.tokens} is missing; re-run `ghsae harvest --run-dir {layout.root}` with the run's config "
            "to rebuild the plan (it is a pure function of the config and dataset)"
        )
    return layout.tokens


def shard_done(layout: RunLayout, shard: int) -> bool:
    return layout.shard_record(shard).is_file()


def forget_shard(layout: RunLayout, shard: int) -> None:
    """Drop a shard's record (and sums) so the next harvest writes the shard again."""
    layout.shard_record(shard).unlink(missing_ok=True)
    layout.shard_sums(shard).unlink(missing_ok=True)


def done_shards(layout: RunLayout, plan: Plan) -> list[int]:
    return [s for s in range(plan.n_shards) if shard_done(layout, s)]


def load_shard_record(layout: RunLayout, shard: int, config_hash: str) -> dict:
    path = layout.shard_record(shard)
    if not path.is_file():
        raise StoreError(
            f"shard {shard} of {layout.root} is not done (no {path.name}); re-run `ghsae harvest` to finish it"
        )
    record = read_json(path, fix=f"re-run `ghsae harvest --run-dir {layout.root}` to rewrite shard {shard}")
    if not isinstance(record, dict) or record.get("config_hash") != config_hash:
        raise StoreError(
            f"{path} was written by config {record.get('config_hash') if isinstance(record, dict) else '?'} "
            f"but this run is {config_hash}; "
            "the record does not belong to this run: delete it and re-run `ghsae harvest`"
        )
    return record


@dataclass
class NormStats:
    """Per-layer statistics over every stored row of the run (aggregated over shard records)."""

    layers: list[int]
    count: np.ndarray  # [L] rows per layer
    mean_norm: np.ndarray  # [L] E||x||
    mean_sq_norm: np.ndarray  # [L] E||x||^2
    mean: np.ndarray  # [L, d]

    def scale(self, d_model: int) -> np.ndarray:
        """Per-layer factor that makes E||x|| = sqrt(d) (the Group-SAE per-layer normalisation)."""
        return np.sqrt(d_model) / np.maximum(self.mean_norm, 1e-12)

    def for_layers(self, layers: list[int], d_model: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale [len(layers)], mean [len(layers), d]) for a group's layers, in that order."""
        pos = [self.layers.index(layer) for layer in layers]
        return self.scale(d_model)[pos], self.mean[pos]

    def to_json(self) -> dict:
        return {
            str(layer): {
                "count": int(self.count[i]),
                "mean_norm": float(self.mean_norm[i]),
                "mean_sq_norm": float(self.mean_sq_norm[i]),
            }
            for i, layer in enumerate(self.layers)
        }


def aggregate_stats(layout: RunLayout, plan: Plan, shards: list[int]) -> NormStats:
    layers = plan.layers
    count = np.zeros(len(layers))
    sum_norm = np.zeros(len(layers))
    sum_sq = np.zeros(len(layers))
    sum_x = None
    for s in shards:
        record = load_shard_record(layout, s, plan.data["config_hash"])
        for i, layer in enumerate(layers):
            st = record["layer_stats"][str(layer)]
            count[i] += st["count"]
            sum_norm[i] += st["sum_norm"]
            sum_sq[i] += st["sum_sq_norm"]
        if not layout.shard_sums(s).is_file():
            raise StoreError(
                f"{layout.shard_sums(s)} is missing (shard {s}'s activation sums); re-run `ghsae harvest "
                f"--run-dir {layout.root}` to rewrite shard {s}"
            )
        with np.load(layout.shard_sums(s)) as z:
            sum_x = z["sum_x"] if sum_x is None else sum_x + z["sum_x"]
    denom = np.maximum(count, 1)
    mean = sum_x / denom[:, None] if sum_x is not None else np.zeros((len(layers), 0))
    return NormStats(layers, count, sum_norm / denom, sum_sq / denom, mean)


def group_shard_rows(layout: RunLayout, plan: Plan, group: str, shards: list[int]) -> dict[int, int]:
    """Valid rows of `group` in each of `shards`, from their completion records."""
    config_hash = plan.data["config_hash"]
    return {s: load_shard_record(layout, s, config_hash)["groups"][group]["rows"] for s in shards}


def write_run_stats(layout: RunLayout, plan: Plan) -> NormStats:
    """Aggregate every shard's statistics into manifest/stats.json (+ .npz for the means)."""
    stats = aggregate_stats(layout, plan, list(range(plan.n_shards)))
    d = int(plan.data["d_model"])
    scale = stats.scale(d)
    per_layer = stats.to_json()
    for i, layer in enumerate(stats.layers):
        per_layer[str(layer)]["scale"] = float(scale[i])
    save_npz_atomic(layout.stats_arrays, layers=np.array(stats.layers), mean=stats.mean, scale=scale)
    write_json_atomic(
        layout.stats,
        {"config_hash": plan.data["config_hash"], "d_model": d, "target_norm": float(np.sqrt(d)), "layers": per_layer},
    )
    return stats


def run_info(layout: RunLayout) -> dict:
    """Everything `ghsae info` reports: progress, sizes, and what a per-layer cache would take."""
    plan = load_plan(layout)
    done = done_shards(layout, plan)
    config_hash = plan.data["config_hash"]
    rows_per_group: dict[str, int] = {name: 0 for name in plan.group_names}
    layer_rows: dict[str, int] = {str(layer): 0 for layer in plan.layers}
    tokens = 0
    for s in done:
        record = load_shard_record(layout, s, config_hash)
        tokens += record["stored_tokens"]
        for name, g in record["groups"].items():
            rows_per_group[name] += g["rows"]
            for layer, c in g["layer_counts"].items():
                layer_rows[layer] += c
    store_bytes = ActivationStore.open(layout.acts).bytes_on_disk() if layout.acts.is_dir() else 0
    d, itemsize = plan.data["d_model"], 2
    per_layer = len(plan.layers) * (d * itemsize + ROW_METADATA_BYTES)
    return {
        "run_dir": str(layout.root),
        "model": plan.data["model"]["source"],
        "layers": plan.layers,
        "groups": plan.groups,
        "group_names": plan.group_names,
        "shards_done": len(done),
        "shards_total": plan.n_shards,
        "shards_missing": [s for s in range(plan.n_shards) if s not in set(done)],
        "complete": len(done) == plan.n_shards,
        "rows": sum(rows_per_group.values()),
        "rows_per_group": rows_per_group,
        "rows_per_layer": layer_rows,
        "tokens": tokens,
        "bytes_on_disk": store_bytes,
        "bytes_per_token": store_bytes / tokens if tokens else None,
        "per_layer_bytes_per_token": per_layer,
        "storage_ratio": (per_layer / (store_bytes / tokens)) if tokens and store_bytes else None,
        "saes_trained": [g for g in plan.group_names if layout.sae_trained(g)],
        "saes_missing": [g for g in plan.group_names if not layout.sae_trained(g)],
        "layer_norm_stats": read_json(layout.stats)["layers"] if layout.stats.is_file() else None,
    }
