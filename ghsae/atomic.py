"""Atomic writes: every file ghsae writes appears whole or not at all.

Each writer serialises in memory, writes a temporary sibling (`.NAME.<random>.tmp`), fsyncs it and
renames it over the target: a reader sees the old file or the new one, never half of one, and a
run killed mid-write (or a full disk) leaves the old file and no temporary behind. Folders (a
SAELens export, the plan, the store) are built under a temporary name and renamed the same way.
The one JSON format of every record ghsae stores is `json_bytes` (indent 1, sorted keys).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ghsae import faults
from ghsae.errors import DamagedFileError


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(path: Path, data: bytes | memoryview, fault: str | None = None) -> None:
    """Temp file + fsync + rename; on any failure (a full disk) the temp file is removed, the old file kept.

    `fault` names a fault point (ghsae.faults) hit once the temp file is open, for the disk-full tests.
    """
    tmp = _temporary_sibling(path)
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


def json_bytes(obj: Any) -> bytes:
    """The stored form of every JSON record (indent 1, keys sorted, so equal records are equal bytes)."""
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buffer.getbuffer())


def write_parquet_atomic(path: Path, rows: list[dict]) -> None:
    """One parquet table of `rows` (a list of records with the same keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def save_torch_atomic(path: Path, obj: Any, fault: str | None = None) -> None:
    """torch.save into memory, then one atomic write: a full disk is an OSError naming the file
    (torch.save straight to disk reports it as "unexpected pos"), and no temp file is left."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer(), fault=fault)


def save_safetensors_atomic(path: Path, tensors: dict) -> None:
    from safetensors.torch import save

    write_bytes_atomic(path, save(tensors))


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; on success it replaces `target` whole."""
    tmp = _temporary_sibling(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(staging: Path, target: Path) -> bool:
    """Rename a finished staging folder to `target`. If another process put one there first (a race
    between batch jobs), keep theirs and drop ours. True when ours went in."""
    try:
        os.rename(staging, target)
        return True
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
        return False


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link to `src` at `dst` (no bytes copied), or a copy where links are not possible
    (another filesystem, a filesystem without them). Stored files are never rewritten in place,
    so a link is as safe as a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_json(path: Path, fix: str = "re-run `ghsae harvest` with the same config to rewrite it") -> Any:
    """Parse a JSON file of the run; a damaged one (empty, truncated, not JSON) is a DamagedFileError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        size = path.stat().st_size
        what = "empty" if size == 0 else f"not valid JSON ({e.__class__.__name__} at {getattr(e, 'pos', '?')})"
        raise DamagedFileError(f"{path} is damaged: {what}; {fix}") from None
