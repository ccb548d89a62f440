"""Verification on use: a shard's bytes are checked against its completion record before anything trusts them.

Each reader of the store (the training loader, `ghsae report`, `ghsae verify`, a `ghsae harvest`
re-run) calls `verify_shard` the first time a process opens a (group, shard); the result is kept
per process, keyed by the record's checksums, so a rewritten shard is checked again. The checks,
cheapest first:

  - the Zarr shard file of every array exists and has the size the record wrote down;
  - the file decodes and holds the record's row count (row metadata past it is fill, -1);
  - every layer id belongs to the group, with the record's per-layer counts;
  - the record's per-layer sums and the stored activations are finite (a harvest refuses
    inf/NaN and overflowing rows; a store written before that check may hold them);
  - the blake2b-128 checksum of each array's valid rows equals the record's.

blake2b runs at about a GB/s on one core (README: measured cost against the loader), so one pass
over a shard costs far less than training on it. A mismatch names group, shard and array, and the
command that repairs it (a harvest re-run rewrites any shard that fails these checks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ghsae.cache.store import ARRAYS, ActivationStore, count_nonfinite
from ghsae.errors import StoreError
from ghsae.layers import span
from ghsae.records import Plan, ShardRecord

_VERIFIED: set[tuple[str, str, int, str]] = set()
_LOCK = threading.Lock()  # the loader reads (and so verifies) in a background thread


def verify_shard(store: ActivationStore, plan: Plan, group: str, shard: int, record: ShardRecord) -> None:
    """Raise StoreError unless (group, shard) on disk is exactly what its record describes."""
    entry = record.groups.get(group)
    where = f"shard {shard} of {group} in {store.path}"
    repair = f"re-run `ghsae harvest --run-dir {Path(store.path).parent}` (same config) to rewrite it"
    if entry is None:
        raise StoreError(f"{where}: its record lists no such group; {repair}")
    rewrite = f"{repair} (the harvest then stops with the cause and its fix)"
    for layer in plan.group_layers(group):
        sums = record.layer_stats.get(layer)
        if sums is not None and not np.isfinite([sums.sum_norm, sums.sum_sq_norm]).all():
            raise StoreError(
                f"{where}: its record's norm sums for layer {layer} are not finite ({sums.sum_norm}): the rows' "
                f"norms overflowed; {rewrite}"
            )
    sizes = entry.files  # empty in records written before sizes were recorded
    for name in ARRAYS:
        path = store.shard_file(group, name, shard)
        size = path.stat().st_size if path.is_file() else None
        if size is None and entry.rows > 0:
            raise StoreError(f"{where}: array {name} has no data file ({path}); {repair}")
        if name in sizes and size != sizes[name]:
            raise StoreError(
                f"{where}: array {name} file {path} is {size} bytes, the record says {sizes[name]}; {repair}"
            )
    try:
        rows = store.read_shard(group, shard, entry.rows)
    except StoreError:
        raise
    except Exception as e:  # zarr/numcodecs raise many types for a truncated or garbled file
        raise StoreError(f"{where} cannot be decoded ({type(e).__name__}: {e}); {repair}") from None
    if (rows.layer < 0).any():
        raise StoreError(f"{where}: array layer has fill (-1) among the record's {entry.rows} rows; {repair}")
    bad_values = count_nonfinite(rows.acts, store.geometry.dtype)
    if bad_values:
        raise StoreError(f"{where}: array acts holds {bad_values} inf/NaN values; {rewrite}")
    allowed = plan.group_layers(group)
    ids, counts = np.unique(rows.layer, return_counts=True)
    stray = [int(i) for i in ids if int(i) not in allowed]
    if stray:
        raise StoreError(
            f"{where}: array layer holds layer ids {stray[:5]} outside the group's layers {span(allowed)}; {repair}"
        )
    if {int(i): int(c) for i, c in zip(ids, counts)} != dict(entry.layer_counts):
        raise StoreError(f"{where}: array layer's per-layer counts differ from the record's; {repair}")
    got = rows.checksums()
    bad = [name for name, want in entry.checksums.items() if got.get(name) != want]
    if bad:
        raise StoreError(f"{where} is corrupt: checksum mismatch in array {', '.join(bad)}; {repair}")


class ShardVerifier:
    """Checks each (group, shard) of one store the first time this process reads it.

    `record_of(shard)` gives a shard's record (ghsae.run.Run.shard_record).
    """

    def __init__(self, store: ActivationStore, plan: Plan, record_of: Callable[[int], ShardRecord]):
        self.store = store
        self.plan = plan
        self.record_of = record_of
        self._seen: set[tuple[str, int]] = set()  # the loader calls once per chunk: skip the record read

    def __call__(self, group: str, shard: int) -> None:
        if (group, shard) in self._seen:
            return
        record = self.record_of(shard)
        entry = record.groups.get(group)
        sums = "".join(entry.checksums.values()) if entry is not None else ""
        key = (str(Path(self.store.path).resolve()), group, shard, sums)
        if key in _VERIFIED:  # checked by another reader of this process
            self._seen.add((group, shard))
            return
        with _LOCK:
            if key not in _VERIFIED:
                verify_shard(self.store, self.plan, group, shard, record)
                _VERIFIED.add(key)
        self._seen.add((group, shard))
