"""Verification on use: a shard's bytes are checked against its completion record before anything trusts them.

Each reader of the store (the training loader, a derivation, a `ghsae harvest` re-run) calls
`verify_once` the first time a process opens a (group, shard); the result is kept per process,
keyed by the record's checksums, so a rewritten shard is checked again and `ghsae run` hashes each
shard once. `ghsae verify` always checks (verify_shard). The report reads no activation: it checks
the records and SAEs it reads instead. The checks,
cheapest first:

  - the Zarr shard file of every array exists and has the size the record wrote down;
  - the file decodes and holds the record's row count (row metadata past it is fill, -1);
  - every layer id belongs to the group, with the record's per-layer counts;
  - the record's per-layer sums and the stored activations are finite (a harvest refuses
    inf/NaN and overflowing rows; a store written before that check may hold them);
  - the blake2b-128 checksum of each array's valid rows equals the record's.

blake2b runs at about a GB/s on one core (docs/benchmarks.md: measured against the loader), so one pass
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


def nonfinite_sums(record: ShardRecord, layers) -> str | None:
    """What is wrong with a record's per-layer norm sums for `layers` (None: all finite). A harvest
    refuses overflowing rows; a store written before that check may record inf."""
    for layer in layers:
        sums = record.layer_stats.get(layer)
        if sums is not None and not np.isfinite([sums.sum_norm, sums.sum_sq_norm]).all():
            return f"its record's norm sums for layer {layer} are not finite ({sums.sum_norm}): the rows' norms overflowed"
    return None


def verify_shard(store: ActivationStore, plan: Plan, group: str, shard: int, record: ShardRecord) -> None:
    """Raise StoreError unless (group, shard) on disk is exactly what its record describes."""
    entry = record.groups.get(group)
    where = f"shard {shard} of {group} in {store.path}"
    repair = f"re-run `ghsae harvest --run-dir {Path(store.path).parent}` (same config) to rewrite it"
    if entry is None:
        raise StoreError(f"{where}: its record lists no such group; {repair}")
    rewrite = f"{repair} (the harvest then stops with the cause and its fix)"
    problem = nonfinite_sums(record, plan.group_layers(group))
    if problem:
        raise StoreError(f"{where}: {problem}; {rewrite}")
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


def verify_once(store: ActivationStore, plan: Plan, group: str, shard: int, record: ShardRecord) -> None:
    """verify_shard, unless this process has verified the same (store, group, shard, checksums): every
    reader of one process (a harvest's re-check, the loader, a derivation) hashes a shard's bytes once."""
    entry = record.groups.get(group)
    sums = "".join(entry.checksums.values()) if entry is not None else ""
    key = (str(Path(store.path).resolve()), group, shard, sums)
    if key in _VERIFIED:
        return
    with _LOCK:
        if key not in _VERIFIED:
            verify_shard(store, plan, group, shard, record)
            _VERIFIED.add(key)


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
        verify_once(self.store, self.plan, group, shard, self.record_of(shard))
        self._seen.add((group, shard))
