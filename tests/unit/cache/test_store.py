"""The activation store on its own: small real Zarr stores in tmp_path, written and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghsae.cache.store import ActivationStore, ShardRows, StoreGeometry, to_float32, to_storage
from ghsae.errors import StoreError

D = 8


def geometry(dtype: str = "float16", compression: str = "none") -> StoreGeometry:
    return StoreGeometry(n_shards=3, shard_rows=64, d_model=D, chunk_rows=16, dtype=dtype, compression=compression)


def make_rows(n: int, dtype: str = "float16", seed: int = 0) -> ShardRows:
    g = torch.Generator().manual_seed(seed)
    return ShardRows(
        acts=to_storage(torch.randn(n, D, generator=g), dtype),
        layer=np.arange(n, dtype=np.int16) % 3,
        token=np.arange(n, dtype=np.int32) + 100,
        seq=np.arange(n, dtype=np.int32) // 8,
        pos=np.arange(n, dtype=np.int32) % 8,
    )


def new_store(tmp_path, **kwargs) -> ActivationStore:
    return ActivationStore.create(tmp_path / "acts.zarr", ["group_00", "group_01"], geometry(**kwargs), {"model": "m"})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_shard_reads_back_exactly_as_written_after_reopening(tmp_path, dtype, compression):
    store = new_store(tmp_path, dtype=dtype, compression=compression)
    rows = make_rows(50, dtype)
    store.write_shard("group_01", 1, rows)
    reopened = ActivationStore.open(tmp_path / "acts.zarr")
    assert reopened.geometry == store.geometry and reopened.groups == ["group_00", "group_01"]
    back = reopened.read_shard("group_01", 1, 50, checksums=rows.checksums())
    for name, arr in rows.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], arr)
        assert back.arrays()[name].dtype == arr.dtype


def test_stored_activations_decode_to_the_rounded_floats():
    acts = torch.tensor([[1.0, -2.5, 3.14159, 1e-3]])
    for dtype, rounded in (("float16", acts.half()), ("bfloat16", acts.bfloat16())):
        np.testing.assert_array_equal(to_float32(to_storage(acts, dtype), dtype), rounded.float().numpy())


def test_a_rewrite_with_fewer_rows_leaves_fill_and_no_stale_rows(tmp_path):
    store = new_store(tmp_path)
    store.write_shard("group_00", 0, make_rows(50, seed=1))
    fewer = make_rows(20, seed=2)
    store.write_shard("group_00", 0, fewer)
    whole = store.read_shard("group_00", 0, 64)
    np.testing.assert_array_equal(whole.acts[:20], fewer.acts)
    assert not whole.acts[20:].any()
    assert (whole.token[20:] == -1).all() and (whole.layer[20:] == -1).all()


def test_rows_of_another_width_or_dtype_or_too_many_are_refused_naming_what_the_store_expects(tmp_path):
    store = new_store(tmp_path)
    wide = make_rows(10)
    wide.acts = np.zeros((10, D + 1), dtype=np.float16)
    with pytest.raises(StoreError, match=rf"float16\[10, {D + 1}\], store expects float16\[n, {D}\]"):
        store.write_shard("group_00", 0, wide)
    wrong_dtype = make_rows(10)
    wrong_dtype.acts = wrong_dtype.acts.astype(np.float32)
    with pytest.raises(StoreError, match="store expects float16"):
        store.write_shard("group_00", 0, wrong_dtype)
    with pytest.raises(StoreError, match="has 65 rows but capacity 64"):
        store.write_shard("group_00", 0, make_rows(65))
    with pytest.raises(StoreError, match=r"shard 3 is out of range; .* has shards 0..2"):
        store.write_shard("group_00", 3, make_rows(10))


def test_a_read_whose_checksum_differs_from_its_record_is_refused_as_corrupt(tmp_path):
    store = new_store(tmp_path)
    rows = make_rows(30)
    store.write_shard("group_00", 2, rows)
    recorded = {**rows.checksums(), "acts": "0" * 32}
    with pytest.raises(StoreError, match=r"shard 2 of group_00 .* is corrupt: checksum mismatch in acts"):
        store.read_shard("group_00", 2, 30, checksums=recorded)
    with pytest.raises(StoreError, match="has no group 'group_07'"):
        store.read_shard("group_07", 2, 30)


def test_opening_a_missing_store_says_to_harvest_first(tmp_path):
    with pytest.raises(StoreError, match="no activation store .* run `ghsae harvest`"):
        ActivationStore.open(tmp_path / "acts.zarr")
