from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from ghsae.cache.loader import ActivationLoader, GroupReader
from ghsae.cache.store import ActivationStore, to_float32
from ghsae.config import to_toml
from ghsae.errors import GhsaeError, StoreError
from ghsae.harvest.steps import ShardSlice
from ghsae.layout import RunLayout
from ghsae.pipeline import fit, harvest
from ghsae.run import Run
from ghsae.sae import load_sae


def harvested(tmp_path, tiny_llama, text_dataset, lm, **overrides):
    cfg = tiny_config(tiny_llama, text_dataset, **{"grouping.groups": [[0, 2], [3, 5]], **overrides})
    harvest(cfg, tmp_path / "run", progress=False, lm=lm)
    return cfg, RunLayout(tmp_path / "run")


def reader_for(layout: RunLayout, group: str) -> GroupReader:
    run = Run.open(layout.root)
    rows = run.group_rows(group, list(range(run.plan.n_shards)))
    return GroupReader(ActivationStore.open(layout.acts), group, rows)


@pytest.mark.parametrize("storage", [("float16", "none"), ("float16", "zstd"), ("bfloat16", "none")])
def test_the_loader_delivers_every_row_exactly_once_per_epoch_normalised(
    tmp_path, tiny_llama, text_dataset, tiny_lm, storage
):
    dtype, compression = storage
    _, layout = harvested(
        tmp_path,
        tiny_llama,
        text_dataset,
        tiny_lm,
        **{"storage.dtype": dtype, "storage.compression": compression, "storage.chunk_rows": 128},
    )
    reader = reader_for(layout, "group_01")
    assert reader.mmap == (compression == "none")
    scale = torch.tensor([2.0, 3.0, 5.0])
    loader = ActivationLoader(
        reader, batch_size=100, seed=0, device=torch.device("cpu"), layers=[3, 4, 5], scale=scale, buffer_chunks=3
    )
    expected = []
    for s in sorted(reader.shard_rows):
        acts, layer = zip(*(reader.read(p) for p in reader.pieces(s)))
        expected.append(to_float32(np.concatenate(acts), dtype) * scale.numpy()[np.concatenate(layer) - 3][:, None])
    expected_rows = np.concatenate(expected)
    for epoch in (0, 1):
        got = torch.cat([b.x for b in loader.batches(epoch)]).numpy()
        assert got.shape == expected_rows.shape
        # same multiset of rows: sort both by their bytes
        key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
        np.testing.assert_array_equal(key(got), key(expected_rows))
    first = [b.x for b in loader.batches(0)]
    assert not torch.equal(first[0], next(loader.batches(1)).x), "epochs must be shuffled differently"
    resumed = list(loader.batches(0, skip=2))
    assert all(torch.equal(a, b.x) for a, b in zip(first[2:], resumed)) and len(resumed) == len(first) - 2


def test_fit_trains_one_sae_per_group_that_loads_and_reconstructs(tmp_path, tiny_llama, text_dataset, tiny_lm):
    cfg, layout = harvested(
        tmp_path,
        tiny_llama,
        text_dataset,
        tiny_lm,
        **{"fit.expansion": 4, "fit.k": 8, "fit.batch_size": 128, "fit.tokens": 8192, "fit.lr": 3e-3},
    )
    results = fit(cfg, layout.root, progress=False)
    assert [r.group for r in results] == ["group_00", "group_01"]
    for r in results:
        sae = load_sae(r.folder)
        assert sae.cfg.layers == r.layers and sae.cfg.n_latents == 4 * 32
        curve = __import__("pyarrow.parquet", fromlist=["x"]).read_table(Path(r.folder) / "metrics.parquet").to_pylist()
        assert curve[-1]["fvu"] < 0.5 * curve[0]["fvu"], "the SAE should learn"
        # the SAE reconstructs raw activations of each of its layers in raw units
        reader = reader_for(layout, r.group)
        acts, layer = reader.read(reader.pieces(0)[0])
        x = torch.from_numpy(to_float32(acts, "float16"))
        recon = sae.reconstruct(x, torch.from_numpy(layer.astype(np.int64)))
        assert ((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.6


def test_fit_refuses_an_incomplete_store_unless_allowed(tmp_path, tiny_llama, text_dataset, tiny_lm):
    cfg = tiny_config(
        tiny_llama, text_dataset, **{"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 256}
    )
    harvest(cfg, tmp_path / "run", shards=ShardSlice(0, 2), progress=False, lm=tiny_lm)
    with pytest.raises(StoreError, match=r"shards \[1, 3\] .* not harvested.*--allow-partial"):
        fit(cfg, tmp_path / "run", progress=False)
    assert fit(cfg, tmp_path / "run", groups=["group_00"], allow_partial=True, progress=False)[0].tokens >= 256
    with pytest.raises(GhsaeError, match="--group group_99 is not in .*; it has group_00, group_01"):
        fit(cfg, tmp_path / "run", groups=["group_99"], allow_partial=True, progress=False)


def test_a_checkpoint_of_another_sae_shape_is_refused(tmp_path, tiny_llama, text_dataset, tiny_lm):
    cfg, layout = harvested(
        tmp_path,
        tiny_llama,
        text_dataset,
        tiny_lm,
        **{"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 256},
    )
    fit(cfg, layout.root, groups=["group_00"], progress=False)
    (layout.sae_dir("group_00") / "sae.safetensors").unlink()
    bigger = tiny_config(
        tiny_llama,
        text_dataset,
        **{
            "grouping.groups": [[0, 2], [3, 5]],
            "fit.expansion": 4,
            "fit.k": 4,
            "fit.batch_size": 64,
            "fit.tokens": 512,
        },
    )
    # the run records the settings its SAEs are trained with, so other settings are refused first
    with pytest.raises(GhsaeError, match=r"saes/fit.json: .*fit.expansion: 2 in the run, 4 now"):
        fit(bigger, layout.root, groups=["group_00"], progress=False)
    # and the checkpoint itself is checked too (a run from before saes/fit.json existed)
    layout.fit_settings.unlink()
    with pytest.raises(GhsaeError, match="n_latents: 64 in the checkpoint, 128 now"):
        fit(bigger, layout.root, groups=["group_00"], progress=False)


def test_a_nan_loss_stops_training_and_names_the_step(tmp_path, tiny_llama, text_dataset, tiny_lm):
    cfg, layout = harvested(
        tmp_path,
        tiny_llama,
        text_dataset,
        tiny_lm,
        **{
            "fit.expansion": 2,
            "fit.k": 4,
            "fit.batch_size": 64,
            "fit.tokens": 1024,
            "fit.lr": 1e30,
            "fit.grad_clip": 0.0,
        },
    )
    with pytest.raises(GhsaeError, match=r"loss became .* at step \d+"):
        fit(cfg, layout.root, groups=["group_00"], progress=False)


def test_fit_killed_and_resumed_ends_with_the_same_weights(tmp_path, tiny_llama, text_dataset, tiny_lm):
    overrides = {
        "fit.expansion": 8,
        "fit.k": 8,
        "fit.batch_size": 32,
        "fit.tokens": 12288,
        "fit.checkpoint_tokens": 512,
        "fit.device": "cpu",
    }
    cfg, layout = harvested(tmp_path, tiny_llama, text_dataset, tiny_lm, **overrides)
    config = tmp_path / "pipeline.toml"
    config.write_text(to_toml(cfg))
    cmd = [
        sys.executable,
        "-m",
        "ghsae",
        "fit",
        "--config",
        str(config),
        "--run-dir",
        str(layout.root),
        "--group",
        "group_00",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    whole = {k: v.clone() for k, v in load_sae(layout.sae_dir("group_00")).state_dict().items()}
    import shutil

    shutil.rmtree(layout.saes)
    checkpoint = layout.sae_dir("group_00") / "checkpoint.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.perf_counter() + 120
    while not checkpoint.exists() and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (layout.sae_dir("group_00") / "sae.safetensors").exists(), (
        "killed too late to test resuming"
    )
    subprocess.run(cmd, check=True, capture_output=True)
    resumed = load_sae(layout.sae_dir("group_00")).state_dict()
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_transfer_init_from_copies_a_neighbours_weights_and_keeps_its_own_normalisation(
    tmp_path, tiny_llama, text_dataset, tiny_lm
):
    small = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 64, "fit.tokens": 512}
    cfg, layout = harvested(tmp_path, tiny_llama, text_dataset, tiny_lm, **small)
    source = fit(cfg, layout.root, groups=["group_00"], progress=False)[0]
    donor = load_sae(source.folder)
    transfer = tiny_config(
        tiny_llama,
        text_dataset,
        **{
            "grouping.groups": [[0, 2], [3, 5]],
            **small,
            "fit.tokens": 64,
            "fit.lr": 1e-12,
            "fit.init_from": source.folder,
        },
    )
    # other settings than the run's (a vanishing lr), so --overwrite: group_01 is trained with them
    result = fit(transfer, layout.root, groups=["group_01"], overwrite=True, progress=False)[0]
    sae = load_sae(result.folder)
    assert sae.cfg.layers == [3, 4, 5]
    # with a vanishing learning rate one step leaves the copied decoder in place
    torch.testing.assert_close(sae.W_dec, donor.W_dec, rtol=0, atol=1e-6)
    assert not torch.equal(sae.norm_scale, torch.ones(3)) and sae.norm_scale.shape == (3,)
    wrong = tiny_config(
        tiny_llama,
        text_dataset,
        **{"grouping.groups": [[0, 2], [3, 5]], **small, "fit.expansion": 4, "fit.init_from": source.folder},
    )
    import shutil

    shutil.rmtree(layout.sae_dir("group_01"))
    with pytest.raises(GhsaeError, match=r"init_from .* m=64; this group needs topk with d=32, m=128"):
        fit(wrong, layout.root, groups=["group_01"], overwrite=True, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the pinned-buffer, side-stream path)")
def test_the_cuda_loader_delivers_the_same_batches_as_the_cpu_loader(tmp_path, tiny_llama, text_dataset, tiny_lm):
    _, layout = harvested(tmp_path, tiny_llama, text_dataset, tiny_lm, **{"storage.chunk_rows": 128})
    reader = reader_for(layout, "group_01")
    args = dict(batch_size=100, seed=0, layers=[3, 4, 5], scale=torch.tensor([2.0, 3.0, 5.0]), buffer_chunks=3)
    on_cpu = [b.x for b in ActivationLoader(reader, device=torch.device("cpu"), **args).batches(0)]
    on_gpu = [b.x.cpu() for b in ActivationLoader(reader, device=torch.device("cuda"), **args).batches(0)]
    assert len(on_cpu) == len(on_gpu) > 1
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, on_gpu)), "widening and scaling must match exactly"


def test_fit_centre_scales_after_centring_so_the_mean_centred_norm_is_sqrt_d(
    tmp_path, tiny_llama, text_dataset, tiny_lm
):
    small = {"fit.expansion": 2, "fit.k": 4, "fit.batch_size": 128, "fit.tokens": 256}
    cfg, layout = harvested(tmp_path, tiny_llama, text_dataset, tiny_lm, **small, **{"fit.centre": True})
    fit(cfg, layout.root, progress=False)
    d = 32
    for group, layers in (("group_00", [0, 1, 2]), ("group_01", [3, 4, 5])):
        sae = load_sae(layout.sae_dir(group))
        reader = reader_for(layout, group)
        acts, layer = map(np.concatenate, zip(*(reader.read(p) for s in reader.shard_rows for p in reader.pieces(s))))
        x = to_float32(acts, "float16").astype(np.float64)
        for i, lay in enumerate(layers):
            rows = x[layer == lay]
            mean, scale = sae.norm_mean[i].double().numpy(), float(sae.norm_scale[i])
            centred_norm = np.linalg.norm((rows - mean) * scale, axis=1).mean()
            assert centred_norm == pytest.approx(np.sqrt(d), rel=0.01)
            # the uncentred factor would miss: it makes E||x|| = sqrt(d), and these layers' means are not small
            uncentred = np.sqrt(d) / np.linalg.norm(rows, axis=1).mean()
            assert np.linalg.norm((rows - mean) * uncentred, axis=1).mean() != pytest.approx(np.sqrt(d), rel=0.01)
