from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import save_tiny_model, tiny_config
from ghsae.cache.store import ActivationStore, to_float32
from ghsae.config import config_from_dict, load_config, to_toml
from ghsae.errors import HarvestError, StoreError
from ghsae.layout import RunLayout
from ghsae.lm import load_model
from ghsae.pipeline import harvest
from ghsae.run import Run


def all_rows(layout: RunLayout):
    """Every stored row of every group, concatenated over shards in order."""
    run = Run.open(layout.root)
    plan = run.plan
    store = ActivationStore.open(layout.acts)
    out = {}
    for name in plan.group_names:
        parts = []
        for s in range(plan.n_shards):
            g = run.shard_record(s).groups[name]
            parts.append(store.read_shard(name, s, g.rows, dict(g.checksums)))
        out[name] = {
            k: np.concatenate([getattr(p, k) for p in parts]) for k in ("acts", "layer", "token", "seq", "pos")
        }
    return plan, store, out


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_harvest_stores_one_row_per_token_per_group_with_the_drawn_layers_activation(
    arch, tiny_models, text_dataset, tmp_path
):
    # Harvest layers 0..4 of a 6-layer model, so every stored layer can be checked against
    # output_hidden_states (whose last entry would have the final norm applied).
    cfg = tiny_config(tiny_models[arch], text_dataset, **{"grouping.layers": [0, 4], "grouping.groups": 2})
    summary = harvest(cfg, tmp_path / "run", progress=False)
    layout = RunLayout(tmp_path / "run")
    plan, store, rows = all_rows(layout)
    tokens = np.load(layout.tokens)
    special = plan.tokenizer.special_ids
    n_kept = int((~np.isin(tokens[: plan.n_contexts_harvest], special)).sum())
    assert summary.info.complete and summary.info.tokens == n_kept

    lm = load_model(str(tiny_models[arch]), "cpu", "float32")
    with torch.no_grad():
        hidden = lm.model(
            torch.from_numpy(tokens[: plan.n_contexts_harvest]).long(), output_hidden_states=True
        ).hidden_states
    for name, group in zip(plan.group_names, plan.groups):
        r = rows[name]
        assert len(r["acts"]) == n_kept
        assert set(np.unique(r["layer"])) <= set(group)
        assert not np.isin(r["token"], special).any(), "special tokens must never be stored"
        np.testing.assert_array_equal(r["token"], tokens[r["seq"], r["pos"]])
        expected = torch.stack([hidden[layer + 1][seq, pos] for layer, seq, pos in zip(r["layer"], r["seq"], r["pos"])])
        got = to_float32(r["acts"], "float16")
        np.testing.assert_allclose(got, expected.half().float().numpy(), rtol=0, atol=0)
    # the same tokens, in the same shuffled order, in every group
    first = rows[plan.group_names[0]]
    for name in plan.group_names[1:]:
        np.testing.assert_array_equal(rows[name]["seq"], first["seq"])
        np.testing.assert_array_equal(rows[name]["pos"], first["pos"])


def test_layers_of_a_group_are_drawn_uniformly(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], "harvest.tokens": 4096})
    harvest(cfg, tmp_path / "run", progress=False)
    info = Run.open(tmp_path / "run").info()
    counts = np.array([info.rows_per_layer[str(layer)] for layer in range(6)])
    per_group = info.tokens / 3
    # each count is Binomial(n, 1/3): 5 standard deviations is a bound a correct draw never crosses
    sd = np.sqrt(info.tokens * (1 / 3) * (2 / 3))
    assert np.all(np.abs(counts - per_group) < 5 * sd), counts


def test_info_reports_sizes_and_the_saving_against_a_per_layer_cache(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": 2, "grouping.last_layer": "grouped"})
    harvest(cfg, tmp_path / "run", progress=False)
    info = Run.open(tmp_path / "run").info()
    for key in (
        "groups",
        "shards_done",
        "shards_total",
        "rows",
        "bytes_on_disk",
        "bytes_per_token",
        "per_layer_bytes_per_token",
    ):
        assert key in info.to_json()  # what `ghsae info --json` prints
    assert info.shards_done == info.shards_total == 4
    assert info.rows == 2 * info.tokens
    # 6 layers in 2 groups: about 3x less than caching every layer (metadata columns aside)
    assert 2.0 < info.per_layer_bytes_per_token / info.bytes_per_token < 3.5


def test_a_corrupt_shard_is_an_error_naming_it(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset)
    harvest(cfg, tmp_path / "run", progress=False)
    layout = RunLayout(tmp_path / "run")
    store = ActivationStore.open(layout.acts)
    g = Run.open(layout.root).shard_record(2).groups["group_00"]
    arr = store.root["group_00"]["acts"]
    start = 2 * store.geometry.shard_rows
    block = arr[start : start + 4]
    arr[start : start + 4] = block + np.float16(1)
    with pytest.raises(StoreError, match=r"shard 2 of group_00 .* corrupt: checksum mismatch in acts"):
        store.read_shard("group_00", 2, g.rows, dict(g.checksums))


def test_bfloat16_storage_keeps_the_bits_and_says_so(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{"storage.dtype": "bfloat16", "storage.compression": "zstd"})
    harvest(cfg, tmp_path / "run", progress=False)
    layout = RunLayout(tmp_path / "run")
    plan, store, rows = all_rows(layout)
    assert store.root["group_00"]["acts"].dtype == np.uint16
    assert store.root["group_00"]["acts"].attrs["logical_dtype"] == "bfloat16"
    acts = to_float32(rows["group_00"]["acts"], "bfloat16")
    assert np.isfinite(acts).all() and np.abs(acts).max() > 0
    # bfloat16 keeps 8 mantissa bits: re-rounding the decoded values changes nothing
    again = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(acts, again)


def test_float16_overflow_is_an_error_that_suggests_bfloat16(tmp_path, text_dataset):
    folder = save_tiny_model(tmp_path / "loud", "llama", n_layers=3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e6)  # residuals far beyond float16's 65504
    model.save_pretrained(folder)
    cfg = tiny_config(folder, text_dataset)
    with pytest.raises(HarvestError, match=r"does not fit float16.*storage.dtype = \"bfloat16\""):
        harvest(cfg, tmp_path / "run", progress=False)
    assert not RunLayout(tmp_path / "run").shard_record(0).exists()


def test_resolved_config_round_trips_through_toml(tmp_path, tiny_llama, text_dataset):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 1], [2, 5]]})
    path = tmp_path / "p.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_normalisation_statistics_match_the_stored_rows(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]]})
    harvest(cfg, tmp_path / "run", progress=False)
    layout = RunLayout(tmp_path / "run")
    plan, _, rows = all_rows(layout)
    info = Run.open(layout.root).info()
    with np.load(layout.stats_arrays) as z:
        means, scales = z["mean"], z["scale"]
    d = plan.d_model
    for name in plan.group_names:
        acts = to_float32(rows[name]["acts"], "float16")
        for layer in np.unique(rows[name]["layer"]):
            x = acts[rows[name]["layer"] == layer]
            st = info.layer_norm_stats[str(layer)]
            assert st["count"] == len(x)
            # statistics are of the rows as stored (plan stats_from = stored-rows): equal up to summation order
            assert st["mean_norm"] == pytest.approx(np.linalg.norm(x.astype(np.float64), axis=1).mean(), rel=1e-6)
            np.testing.assert_allclose(means[layer], x.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-9)
            assert scales[layer] == pytest.approx(np.sqrt(d) / st["mean_norm"])
