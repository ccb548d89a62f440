"""The ways of extending ghsae, each one declaration: a storage dtype, an executor, an SAE architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghsae.cache import dtypes
from ghsae.config import STORAGE_DTYPES


def test_every_configurable_storage_dtype_has_a_dtype_object():
    assert set(STORAGE_DTYPES) == set(dtypes.DTYPES)


@pytest.mark.parametrize("name", sorted(dtypes.DTYPES))
def test_a_storage_dtype_round_trips_what_it_can_hold_and_counts_what_it_cannot(name):
    d = dtypes.storage_dtype(name)
    x = torch.tensor([[0.0, 1.5, -2.25, 1000.0], [d.max_finite, -d.max_finite, 3.0, 0.125]])
    stored = d.encode(x)
    assert stored.dtype == d.physical
    np.testing.assert_array_equal(d.decode(stored), x.to(d.logical).float().numpy())
    assert torch.equal(d.widen(d.as_physical_torch(stored)), x.to(d.logical).float())
    assert d.count_nonfinite(stored) == 0
    assert d.count_nonfinite(d.encode(torch.tensor([[float("inf"), float("nan"), 1.0]]))) == 2


def test_the_harvest_guard_refuses_values_past_the_storage_dtypes_range():
    from ghsae.harvest.finite import _problem

    fp16 = dtypes.storage_dtype("float16").max_finite
    assert "does not fit float16" in _problem(0, 1e5, 2 * fp16, "float16", torch.float32)
    assert _problem(0, 1e5, 2 * fp16, "bfloat16", torch.float32) is None


def test_both_executors_satisfy_the_executor_protocol():
    from ghsae.executors import DaskCluster, Executor, InProcess

    assert isinstance(InProcess(), Executor)
    assert all(hasattr(DaskCluster, m) for m in ("workers", "call", "map", "split", "task_progress", "in_process"))
