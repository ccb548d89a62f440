"""The ways of extending ghsae, each one declaration: a storage dtype, an executor, an SAE architecture."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ghsae.cache import dtypes
from ghsae.config import ARCHITECTURES, STORAGE_DTYPES, FitConfig, PipelineConfig, config_from_dict, to_toml
from ghsae.errors import ConfigError, GhsaeError
from ghsae.sae import REGISTRY, RawLayer, SAEConfig, SAELensLayer, SparseAutoencoder, register


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


# --- a new SAE architecture: one registered class, nothing else edited ---------------------------------


@dataclass(frozen=True)
class ToyOptions:
    l1: float = 0.01
    """Weight of the L1 penalty."""


class ToyReLU(SparseAutoencoder):
    """ReLU latents with its own options table, [fit.toyrelu]."""

    Options = ToyOptions

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def loss_terms(self, x, pre, z, recon):
        l1 = self.cfg.typed_options().l1
        return {"mse": (x - recon).pow(2).sum(-1).mean(), "l1": l1 * z.abs().sum(-1).mean()}

    def saelens(self, raw: RawLayer) -> SAELensLayer:
        return SAELensLayer("standard")


@pytest.fixture
def toy_architecture():
    register("toyrelu")(ToyReLU)
    yield "toyrelu"
    del REGISTRY["toyrelu"]  # the built-in set is what other tests see


def toy_config(small_cfg: PipelineConfig, l1: float) -> PipelineConfig:
    raw = small_cfg.to_dict()
    raw["fit"] = {**raw["fit"], "architecture": "toyrelu", "toyrelu": {"l1": l1}}
    return config_from_dict(raw)


def test_a_registered_architecture_trains_saves_loads_and_exports(toy_architecture, small_cfg, harvested_run, tmp_path):
    from ghsae.pipeline import fit
    from ghsae.run import Run
    from ghsae.train.export import export_run

    cfg = toy_config(small_cfg, 0.02)
    fit(cfg, harvested_run, progress=False)
    run = Run.open(harvested_run)
    sae = run.sae("group_00")
    assert isinstance(sae, ToyReLU) and sae.cfg.typed_options() == ToyOptions(l1=0.02)
    assert run.sae_record("group_00").fit["toyrelu"] == {"l1": 0.02}  # stored as its own table
    assert "toyrelu" in to_toml(cfg) and config_from_dict(cfg.to_dict()).fit.options == {"toyrelu": {"l1": 0.02}}
    folders = export_run(run, tmp_path / "out", "saelens")
    layer = sae.cfg.layers[0]
    exported = json.loads((folders[0] / "cfg.json").read_text())
    assert exported["architecture"] == "standard" and exported["metadata"]["ghsae_layer"] == layer
    try:
        from sae_lens import SAE
    except ImportError:
        return
    loaded = SAE.load_from_disk(str(folders[0]))
    x = torch.randn(16, sae.cfg.d_model) / sae.norm_scale[0] + sae.norm_mean[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x, layer), rtol=1e-4, atol=1e-4)


def test_a_second_fit_with_other_architecture_options_is_refused_naming_them(
    toy_architecture, small_cfg, harvested_run
):
    from ghsae.pipeline import fit

    fit(toy_config(small_cfg, 0.02), harvested_run, progress=False)
    with pytest.raises(GhsaeError, match="toyrelu"):
        fit(toy_config(small_cfg, 0.5), harvested_run, progress=False)


def test_an_architecture_table_is_checked_against_its_options(toy_architecture):
    with pytest.raises(ConfigError, match="unknown key fit.toyrelu.l2; expected one of l1"):
        config_from_dict({"fit": {"architecture": "toyrelu", "toyrelu": {"l2": 1.0}}})
    with pytest.raises(ConfigError, match="fit.toyrelu.l1 is 'x'"):
        config_from_dict({"fit": {"architecture": "toyrelu", "toyrelu": {"l1": "x"}}})
    with pytest.raises(ConfigError, match=r"unknown table \[fit.nosuch\]"):
        config_from_dict({"fit": {"nosuch": {"l1": 1.0}}})


def test_an_unregistered_architecture_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match="fit.architecture is 'nosuch'; expected one of topk, batchtopk"):
        config_from_dict({"fit": {"architecture": "nosuch"}})


def test_a_built_in_architectures_table_is_read_as_its_flat_keys_and_stored_as_before():
    tabled = config_from_dict(
        {"fit": {"architecture": "jumprelu", "topk": {"k": 64}, "jumprelu": {"sparsity_coef": 0.5}}}
    )
    flat = config_from_dict({"fit": {"architecture": "jumprelu", "k": 64, "sparsity_coef": 0.5}})
    assert tabled.to_dict() == flat.to_dict() and tabled.identity_hash() == flat.identity_hash()
    assert tabled.identity(("fit",)) == flat.identity(("fit",))
    with pytest.raises(ConfigError, match=r"fit.k is 32 and fit.topk.k is 64; set it in \[fit.topk\] only"):
        config_from_dict({"fit": {"k": 32, "topk": {"k": 64}}})


def test_the_built_in_options_defaults_are_the_flat_fit_defaults():
    fit = FitConfig()
    for cls in (REGISTRY[name] for name in ARCHITECTURES):
        assert cls.flat_options
        for f in dataclasses.fields(cls.Options):
            assert getattr(fit, f.name) == f.default, (cls.architecture, f.name)
    sae_cfg = SAEConfig("topk", 8, 32, [1], k=5, aux_coef=0.5)
    assert sae_cfg.typed_options() == REGISTRY["topk"].Options(k=5, aux_coef=0.5)


def test_the_embedded_config_sets_options_in_tables_and_a_flat_override_replaces_them():
    from ghsae.config import load_config, read_toml

    raw, _ = read_toml(None)
    assert raw["fit"]["topk"]["k"] == FitConfig().k and "k" not in raw["fit"]
    assert load_config(None, {"fit.k": 4}).fit.k == 4
    assert load_config(None, {"fit.topk.k": 5}).fit.k == 5
