"""The activation store: one Zarr v3 array set per group, preallocated and sharded by work shard.

    acts.zarr/group_00/acts   [n_shards * shard_rows, d]  float16, or uint16 holding bfloat16 bits
    acts.zarr/group_00/layer  [n_shards * shard_rows]     int16  model layer the row was drawn from
    acts.zarr/group_00/token  [n_shards * shard_rows]     int32  token id
    acts.zarr/group_00/seq    [n_shards * shard_rows]     int32  context index in plan/tokens.npy
    acts.zarr/group_00/pos    [n_shards * shard_rows]     int32  position inside the context

Work shard s owns rows [s * shard_rows, (s + 1) * shard_rows), which is exactly one Zarr shard
of every array, so each Zarr shard file has one writer (concurrent writers into one Zarr shard
lose data: zarr-python #3514, #3682). A shard holds fewer valid rows than its capacity (special
tokens are not stored); its record in the manifest says how many. Chunks are full width and
uncompressed by default, so a shard file is its chunks end to end plus an index: readable by
memory map.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ghsae.atomic import write_bytes_atomic
from ghsae.cache.dtypes import storage_dtype
from ghsae.errors import StoreError

ROW_FIELDS = {"layer": np.int16, "token": np.int32, "seq": np.int32, "pos": np.int32}
ROW_METADATA_BYTES = sum(np.dtype(t).itemsize for t in ROW_FIELDS.values())
ARRAYS = ("acts", *ROW_FIELDS)  # every array of a group, activations first
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreGeometry:
    n_shards: int
    shard_rows: int
    d_model: int
    chunk_rows: int
    dtype: str  # logical dtype: float16 or bfloat16
    compression: str

    @property
    def physical_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype).physical

    @property
    def act_bytes_per_row(self) -> int:
        return self.d_model * self.physical_dtype.itemsize


@dataclass
class ShardRows:
    """Rows of one group in one shard, as stored (acts in the physical dtype)."""

    acts: np.ndarray  # [n, d]
    layer: np.ndarray  # [n]
    token: np.ndarray  # [n]
    seq: np.ndarray  # [n]
    pos: np.ndarray  # [n]

    def __len__(self) -> int:
        return self.acts.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"acts": self.acts, "layer": self.layer, "token": self.token, "seq": self.seq, "pos": self.pos}

    def checksums(self) -> dict[str, str]:
        return {name: checksum(arr) for name, arr in self.arrays().items()}


def checksum(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).data, digest_size=16).hexdigest()


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """float activations -> the stored physical array (bfloat16 bits as uint16)."""
    return storage_dtype(dtype).encode(acts)


def to_float32(acts: np.ndarray, dtype: str) -> np.ndarray:
    """Stored physical array -> float32, whatever the logical dtype."""
    return storage_dtype(dtype).decode(acts)


def count_nonfinite(acts: np.ndarray, dtype: str) -> int:
    """inf/NaN values among stored activations (physical dtype), read from their bits: an all-ones
    exponent (float16: 0x7C00, bfloat16: 0x7F80). Integer work only, no widening."""
    return storage_dtype(dtype).count_nonfinite(acts)


def _compressors(name: str):
    if name == "none":
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    return ZstdCodec(level=3) if name == "zstd" else BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


METADATA_FILE = "zarr.json"  # Zarr v3's metadata document of the root, of each group and of each array


def metadata_files(path: Path, groups: list[str]) -> list[Path]:
    """Every metadata document of a store of `groups`: the root's, then each group's and its arrays'."""
    out = [Path(path) / METADATA_FILE]
    for g in groups:
        out += [Path(path) / g / METADATA_FILE, *(Path(path) / g / name / METADATA_FILE for name in ARRAYS)]
    return out


def damaged_metadata(path: Path, groups: list[str]) -> list[Path]:
    """The metadata documents of the store that are missing or not JSON (the data cannot be read without them)."""
    return [f for f in metadata_files(path, groups) if not _readable_json(f)]


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def restore_metadata(path: Path, reference: Path, groups: list[str]) -> list[Path]:
    """Copy each missing or unreadable metadata document of the store at `path` from `reference`, a
    store created empty from the same plan (its metadata is a pure function of the plan and the
    storage settings, so the copy is the file that was lost). Shard files are not touched: the
    shard records' checksums say whether they are intact. Returns the documents restored."""
    lost = damaged_metadata(path, groups)
    for f in lost:
        f.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(f, (Path(reference) / f.relative_to(path)).read_bytes())
    return lost


def repair_hint(path: Path) -> str:
    """The one command that repairs a store's lost metadata (the run folder holds the store at `path`)."""
    return (
        f"re-run `ghsae harvest --run-dir {Path(path).parent}` (the run's own settings): it restores the store's "
        "metadata from the plan and keeps every intact shard"
    )


def bytes_on_disk(path: Path) -> int:
    """Bytes of every file under a store folder (readable without its metadata)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class ActivationStore:
    def __init__(self, path: Path, root: zarr.Group, geometry: StoreGeometry, groups: list[str]):
        self.path = path
        self.root = root
        self.geometry = geometry
        self.groups = groups

    @classmethod
    def create(cls, path: Path, groups: list[str], geometry: StoreGeometry, attributes: dict) -> ActivationStore:
        root = zarr.open_group(str(path), mode="w-")
        root.attrs.update(
            {**attributes, "format_version": FORMAT_VERSION, "groups": groups, "geometry": geometry.__dict__}
        )
        rows = geometry.n_shards * geometry.shard_rows
        config: dict[str, Any] = {"write_empty_chunks": False}  # unused capacity at a shard's end costs no disk
        for name in groups:
            g = root.create_group(name)
            g.create_array(
                "acts",
                shape=(rows, geometry.d_model),
                dtype=geometry.physical_dtype,
                chunks=(geometry.chunk_rows, geometry.d_model),
                shards=(geometry.shard_rows, geometry.d_model),
                compressors=_compressors(geometry.compression),
                fill_value=0,
                attributes={"logical_dtype": geometry.dtype},
                config=config,  # type: ignore[arg-type]
            )
            for field, dtype in ROW_FIELDS.items():
                g.create_array(
                    field,
                    shape=(rows,),
                    dtype=dtype,
                    chunks=(geometry.chunk_rows,),
                    shards=(geometry.shard_rows,),
                    compressors=_compressors(geometry.compression),
                    fill_value=-1,
                    config=config,  # type: ignore[arg-type]
                )
        return cls(path, root, geometry, groups)

    @classmethod
    def open(cls, path: Path) -> ActivationStore:
        if not path.is_dir():
            raise StoreError(f"no activation store at {path}; run `ghsae harvest` for this run folder first")
        if not (path / METADATA_FILE).is_file():
            raise StoreError(f"{path / METADATA_FILE} is missing: the store's metadata is gone; {repair_hint(path)}")
        try:
            root = zarr.open_group(str(path), mode="r+")
            attrs: dict[str, Any] = dict(root.attrs.asdict())
        except Exception as e:  # zarr raises several types for a damaged zarr.json
            raise StoreError(
                f"{path / METADATA_FILE} cannot be read ({type(e).__name__}: {e}); {repair_hint(path)}"
            ) from None
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{path} has store format {version}; this ghsae reads format {FORMAT_VERSION}")
        return cls(path, root, StoreGeometry(**attrs["geometry"]), list(attrs["groups"]))

    def array(self, group: str, name: str) -> zarr.Array:
        try:
            arr = self.root[f"{group}/{name}"]
        except Exception as e:  # KeyError when a zarr.json is missing; zarr raises several types for a damaged one
            docs = [Path(self.path) / group / METADATA_FILE, Path(self.path) / group / name / METADATA_FILE]
            meta = next((f for f in docs if not _readable_json(f)), docs[-1])
            what = "is missing" if not meta.is_file() else f"cannot be read ({type(e).__name__})"
            raise StoreError(f"{meta} {what}: array {name} of {group} cannot be opened; {repair_hint(self.path)}") from None
        assert isinstance(arr, zarr.Array), f"{self.path}/{group}/{name} is not an array"
        return arr

    def _rows(self, shard: int) -> slice:
        if not 0 <= shard < self.geometry.n_shards:
            raise StoreError(f"shard {shard} is out of range; {self.path} has shards 0..{self.geometry.n_shards - 1}")
        start = shard * self.geometry.shard_rows
        return slice(start, start + self.geometry.shard_rows)

    def write_shard(self, group: str, shard: int, rows: ShardRows) -> None:
        """Write a whole shard region (valid rows, then fill), so a rewrite replaces every byte."""
        region = self._rows(shard)
        n, cap = len(rows), self.geometry.shard_rows
        if n > cap:
            raise StoreError(f"shard {shard} of {group} has {n} rows but capacity {cap}")
        if rows.acts.shape[1:] != (self.geometry.d_model,) or rows.acts.dtype != self.geometry.physical_dtype:
            raise StoreError(
                f"shard {shard} of {group}: rows are {rows.acts.dtype}{list(rows.acts.shape)}, store expects "
                f"{self.geometry.physical_dtype}[n, {self.geometry.d_model}]"
            )
        for name, arr in rows.arrays().items():
            full = np.full((cap, *arr.shape[1:]), 0 if name == "acts" else -1, dtype=arr.dtype)
            full[:n] = arr
            target = self.array(group, name)
            self._drop_shard_file(group, name, shard)
            target[region] = full

    def shard_file(self, group: str, name: str, shard: int) -> Path:
        """The Zarr shard file holding work shard `shard` of one array (the one place this path is built)."""
        arr = self.array(group, name)
        key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
        return Path(self.path) / group / name / key

    def file_sizes(self, group: str, shard: int) -> dict[str, int]:
        """Bytes on disk of each array's shard file (0 when absent); written into the shard record."""
        out = {}
        for name in ARRAYS:
            path = self.shard_file(group, name, shard)
            out[name] = path.stat().st_size if path.is_file() else 0
        return out

    def _drop_shard_file(self, group: str, name: str, shard: int) -> None:
        """Delete what a killed writer left of this shard: zarr merges a write into the existing shard file
        (reading its index), so a half-written file would make the rewrite fail or keep stale bytes."""
        self.shard_file(group, name, shard).unlink(missing_ok=True)

    def read_shard(self, group: str, shard: int, n_rows: int, checksums: dict[str, str] | None = None) -> ShardRows:
        """Read the valid rows of a shard; with checksums, refuse data that does not match its record."""
        if group not in self.groups:
            raise StoreError(f"{self.path} has no group {group!r}; it holds {', '.join(self.groups)}")
        region = self._rows(shard)
        rows_slice = slice(region.start, region.start + n_rows)
        rows = ShardRows(**{name: np.asarray(self.array(group, name)[rows_slice]) for name in ARRAYS})
        if rows.acts.shape != (n_rows, self.geometry.d_model):
            raise StoreError(
                f"shard {shard} of {group}: read {rows.acts.shape}, expected ({n_rows}, {self.geometry.d_model})"
            )
        if checksums is not None:
            got = rows.checksums()
            bad = [name for name in checksums if got.get(name) != checksums[name]]
            if bad:
                raise StoreError(
                    f"shard {shard} of {group} in {self.path} is corrupt: checksum mismatch in {', '.join(bad)}. "
                    f"Delete its record (manifest/shard-{shard:05d}.json) and re-run `ghsae harvest` to rewrite it"
                )
        return rows

    def bytes_on_disk(self) -> int:
        return bytes_on_disk(self.path)
