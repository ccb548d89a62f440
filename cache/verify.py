"""Verification on use: a shard's bytes are checked against its completion record before anything trusts them.

Each reader of the store (the training loader, `ghsae report`, `ghsae verify`, a `ghsae harvest`
re-run) calls `verify_shard` the first time a process opens a (group, shard); the result is kept
per process, keyed by the record's checksums, so a rewritten shard is checked again. The checks,
cheapest first:

  - the Zarr shard file of every array exists and has the size the record wrote down;
  - the file decodes and holds the record's row count (row metadata past it is fill, -1);
  - every layer id belongs to the group, with the record's per-layer counts;
  - the blake2b-128 checksum of each array's valid rows equals the record's.

blake2b runs at about a GB/s on one core (README: measured cost against the loader), so one pass
over a shard costs far less than training on it. A mismatch names group, shard and array, and the
command that repairs it (a harvest re-run rewrites any shard that fails these checks).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ghsae.cache.manifest import Plan, load_shard_record
from ghsae.cache.store import ROW_FIELDS, ActivationStore
from ghsae.errors import DamagedFileError, StoreError
from ghsae.layout import RunLayout

_VERIFIED: set[tuple[str, str, int, str]] = set()
_LOCK = threading.Lock()  # the loader reads (and so verifies) in a background thread


def shard_file(store: ActivationStore, group: str, name: str, shard: int) -> Path:
    """The Zarr shard file holding work shard `shard` of one array."""
    return store.shard_file(group, name, shard)


def file_sizes(store: ActivationStore, group: str, shard: int) -> dict[str, int]:
    """Bytes on disk of each array's shard file (0 when absent); written into the shard record."""
    out = {}
    for name in ("acts", *ROW_FIELDS):
        path = shard_file(store, group, name, shard)
        out[name] = path.stat().st_size if path.is_file() else 0
    return out


def verify_shard(store: ActivationStore, plan: Plan, group: str, shard: int, record: dict) -> None:
    """Raise StoreError unless (group, shard) on disk is exactly what its record describes."""
    entry = record.get("groups", {}).get(group)
    where = f"shard {shard} of {group} in {store.path}"
    repair = f"re-run `ghsae harvest --run-dir {Path(store.path).parent}` (same config) to rewrite it"
    if entry is None:
        raise StoreError(f"{where}: its record lists no such group; {repair}")
    sizes = entry.get("files", {})  # absent in records written before sizes were recorded
    for name in ("acts", *ROW_FIELDS):
        path = shard_file(store, group, name, shard)
        size = path.stat().st_size if path.is_file() else None
        if size is None and entry["rows"] > 0:
            raise StoreError(f"{where}: array {name} has no data file ({path}); {repair}")
        if name in sizes and size != sizes[name]:
            raise StoreError(
                f"{where}: array {name} file {path} is {size} bytes, the record says {sizes[name]}; {repair}"
            )
    try:
        rows = store.read_shard(group, shard, entry["rows"])
    except StoreError:
        raise
    except Exception as e:  # zarr/numcodecs raise many types for a truncated or garbled file
        raise StoreError(f"{where} cannot be decoded ({type(e).__name__}: {e}); {repair}") from None
    if (rows.layer < 0).any():
        raise StoreError(f"{where}: array layer has fill (-1) among the record's {entry['rows']} rows; {repair}")
    allowed = plan.groups[plan.group_names.index(group)]
    ids, counts = np.unique(rows.layer, return_counts=True)
    stray = [int(i) for i in ids if int(i) not in allowed]
    if stray:
        raise StoreError(
            f"{where}: array layer holds layer ids {stray[:5]} outside the group's layers {allowed[0]}-{allowed[-1]}; "
            f"{repair}"
        )
    if {str(int(i)): int(c) for i, c in zip(ids, counts)} != entry["layer_counts"]:
        raise StoreError(f"{where}: array layer's per-layer counts differ from the record's; {repair}")
    got = rows.checksums()
    bad = [name for name, want in entry["checksums"].items() if got.get(name) != want]
    if bad:
        raise StoreError(f"{where} is corrupt: checksum mismatch in array {', '.join(bad)}; {repair}")


class ShardVerifier:
    """Checks each (group, shard) of one run the first time this process reads it."""

    def __init__(self, layout: RunLayout, plan: Plan, store: ActivationStore):
        self.layout = layout
        self.plan = plan
        self.store = store
        self._seen: set[tuple[str, int]] = set()  # the loader calls once per chunk: skip the record read

    def __call__(self, group: str, shard: int) -> None:
        if (group, shard) in self._seen:
            return
        record = load_shard_record(self.layout, shard, self.plan.data["config_hash"])
        sums = "".join(record.get("groups", {}).get(group, {}).get("checksums", {}).values())
        key = (str(Path(self.store.path).resolve()), group, shard, sums)
        if key in _VERIFIED:  # checked by another reader of this process
            self._seen.add((group, shard))
            return
        with _LOCK:
            if key not in _VERIFIED:
                verify_shard(self.store, self.plan, group, shard, record)
                _VERIFIED.add(key)
        self._seen.add((group, shard))


def failing_shards(layout: RunLayout, plan: Plan, store: ActivationStore, shards: list[int]) -> dict[int, str]:
    """shard -> the first problem found, for those of `shards` (all recorded done) that fail verification."""
    bad: dict[int, str] = {}
    for s in shards:
        try:
            record = load_shard_record(layout, s, plan.data["config_hash"])
            if not layout.shard_sums(s).is_file():
                raise StoreError(f"{layout.shard_sums(s)} is missing")
            for group in plan.group_names:
                verify_shard(store, plan, group, s, record)
        except (StoreError, DamagedFileError) as e:
            bad[s] = str(e)
    return bad


def verify_run(layout: RunLayout) -> tuple[list[str], int]:
    """Check every file the store's readers rely on; returns (problems, shards checked). Writes nothing."""
    from ghsae.cache.manifest import done_shards, load_plan, read_json

    problems: list[str] = []
    try:
        plan = load_plan(layout)
    except StoreError as e:
        return [str(e)], 0
    for path in (layout.config, layout.tokens, layout.similarity):
        if not path.is_file():
            problems.append(f"{path} is missing; re-run `ghsae harvest --run-dir {layout.root}` to rebuild it")
    if layout.config.is_file():
        try:
            read_json(layout.config)
        except DamagedFileError as e:
            problems.append(str(e))
    try:
        store = ActivationStore.open(layout.acts)
        for group in plan.group_names:
            for name in ("acts", *ROW_FIELDS):
                store.array(group, name)
    except StoreError as e:
        return [*problems, str(e)], 0
    done = done_shards(layout, plan)
    problems += [f"shard {s}: {msg}" for s, msg in failing_shards(layout, plan, store, done).items()]
    return problems, len(done)
