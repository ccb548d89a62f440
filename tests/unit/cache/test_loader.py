"""The training loader on its own: small real Zarr stores in tmp_path, read in a seeded order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghsae.cache.loader import ActivationLoader, GroupReader
from ghsae.cache.store import ActivationStore, ShardRows, StoreGeometry, to_float32, to_storage

D = 4
VALID = {0: 50, 1: 64, 2: 37}  # valid rows per shard: short shards and a full one
LAYERS = [3, 5]


def build_store(tmp_path, dtype: str = "float16", compression: str = "none") -> ActivationStore:
    """A store whose rows carry their global id in column 0 (exact in float16 and bfloat16 below 256)."""
    geo = StoreGeometry(n_shards=3, shard_rows=64, d_model=D, chunk_rows=16, dtype=dtype, compression=compression)
    store = ActivationStore.create(tmp_path / "acts.zarr", ["group_00"], geo, {})
    first = 0
    for shard, n in VALID.items():
        ids = torch.arange(first, first + n, dtype=torch.float32)
        acts = torch.cat([ids[:, None], torch.randn(n, D - 1, generator=torch.Generator().manual_seed(shard))], 1)
        layer = np.array(LAYERS, dtype=np.int16)[np.arange(n) % 2]
        zeros = np.zeros(n, dtype=np.int32)
        store.write_shard("group_00", shard, ShardRows(to_storage(acts, dtype), layer, zeros, zeros, zeros))
        first += n
    return store


def loader(store, seed: int = 0, batch_size: int = 24, **kwargs) -> ActivationLoader:
    reader = GroupReader(store, "group_00", VALID)
    scale = kwargs.pop("scale", torch.ones(len(LAYERS)))
    return ActivationLoader(reader, batch_size, seed, torch.device("cpu"), LAYERS, scale, buffer_chunks=3, **kwargs)


def epoch_ids(data: ActivationLoader, epoch: int) -> list[list[int]]:
    """Row ids of each host batch of one epoch (copied: the batches are views of reused buffers)."""
    return [to_float32(x[:, 0].copy(), data.logical_dtype).astype(int).tolist() for x, _ in data.host_batches(epoch)]


@pytest.mark.parametrize("compression", ["none", "zstd"])  # memory-mapped shard files, and zarr's reads
def test_every_stored_row_is_delivered_once_per_epoch_in_full_batches_but_the_last(tmp_path, compression):
    data = loader(build_store(tmp_path, compression=compression))
    for epoch in (0, 1):
        batches = epoch_ids(data, epoch)
        assert sorted(i for b in batches for i in b) == list(range(sum(VALID.values())))
        assert [len(b) for b in batches[:-1]] == [24] * (len(batches) - 1) and 0 < len(batches[-1]) <= 24
    assert data.rows_per_epoch == sum(VALID.values())


def test_the_order_is_a_function_of_seed_and_epoch(tmp_path):
    store = build_store(tmp_path)
    first = epoch_ids(loader(store, seed=1), 0)
    assert epoch_ids(loader(store, seed=1), 0) == first
    assert epoch_ids(loader(store, seed=1), 1) != first
    assert epoch_ids(loader(store, seed=2), 0) != first
    flat = [i for b in first for i in b]
    assert flat != sorted(flat)  # shuffled across shards, not read in stored order


def test_skipping_batches_resumes_the_same_epoch_where_it_stopped(tmp_path):
    data = loader(build_store(tmp_path), seed=3)
    whole = [b.x.clone() for b in data.batches(0)]
    resumed = [b.x.clone() for b in data.batches(0, skip=2)]
    assert len(resumed) == len(whole) - 2
    for a, b in zip(whole[2:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_batches_are_float32_widened_and_normalised_by_each_rows_layer(tmp_path, dtype):
    scale, mean = torch.tensor([2.0, 0.5]), torch.tensor([[1.0] * D, [-3.0] * D])
    data = loader(build_store(tmp_path, dtype=dtype), seed=4, scale=scale, mean=mean)
    host = [(to_float32(x.copy(), dtype), layer.copy()) for x, layer in data.host_batches(0)]
    device = list(data.batches(0))
    assert len(host) == len(device)
    for (raw, layer), batch in zip(host, device):
        assert batch.x.dtype == torch.float32
        assert batch.layer.tolist() == layer.tolist()
        pos = torch.tensor([LAYERS.index(int(v)) for v in layer])
        expected = (torch.from_numpy(raw) - mean[pos]) * scale[pos, None]
        torch.testing.assert_close(batch.x, expected, rtol=1e-6, atol=1e-6)


def test_clipping_scales_an_outlier_row_down_to_its_layers_outlier_norm(tmp_path):
    norm = torch.tensor([5.0, 1e9])  # layer 3's rows are clipped to norm 5, layer 5's are untouched
    data = loader(build_store(tmp_path), seed=5, outliers="clip", outlier_norm=norm)
    batches = list(data.batches(0))
    layer, norms = torch.cat([b.layer for b in batches]), torch.cat([b.x.norm(dim=1) for b in batches])
    assert len(layer) == sum(VALID.values())  # clipping keeps every row
    assert (norms[layer == 3] <= 5.0 + 1e-4).all() and (norms[layer == 3] >= 5.0 - 1e-4).any()
    assert norms[layer == 5].max() > 100  # untouched: the row ids in column 0 reach 150
