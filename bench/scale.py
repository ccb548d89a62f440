"""Harvest throughput on dask: one process, then LocalClusters of 1 and 2 worker processes, on the
same small random Llama and generated text, in the same run.

    python bench/scale.py [--tokens 131072] [--layers 8] [--d-model 256]

Prints one JSON line of tokens/s per setting and the stores' equality. The plan is made once and
copied into every run folder, so each timing is the shard phase plus, on dask, the engine's own
costs: "cold" runs include the workers' first imports and model load, "warm" ones reuse them.
On a 2-core machine the speed-up from a second worker is bounded by the cores; the 1-worker
figure against one process shows the engine's own overhead (task dispatch, per-task set-up).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny-model builders, store comparison

from test_resume import store_files  # noqa: E402

from conftest import generate_documents, save_tiny_model  # noqa: E402
from ghsae.config import config_from_dict  # noqa: E402
from ghsae.executors import open_executor  # noqa: E402
from ghsae.lm import load_model  # noqa: E402
from ghsae.pipeline import harvest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ghsae-bench-scale-"))
    model = save_tiny_model(tmp / "model", "llama", n_layers=args.layers, d_model=args.d_model)
    data = tmp / "docs.txt"
    random.seed(0)
    data.write_text("\n\n".join(generate_documents(args.tokens // 40, seed=1, min_words=60, max_words=200)))
    cfg = config_from_dict(
        {
            "model": {"path": str(model), "device": "cpu"},
            "data": {"dataset": str(data), "context_length": 128},
            "harvest": {"tokens": args.tokens, "eval_tokens": 0, "probe_tokens": 2048, "shard_tokens": 8192},
            "grouping": {"groups": 2},
            "storage": {"chunk_rows": 1024},
        }
    )
    results = {}
    # the plan once, copied to every setting, so each timing covers the shards only
    lm = load_model(str(model), "cpu", "float32")
    harvest(cfg, tmp / "planned", plan_only=True, progress=False, lm=lm)

    def fresh(name: str) -> Path:
        shutil.copytree(tmp / "planned", tmp / name)
        return tmp / name

    run = fresh("one_process")
    t0 = time.perf_counter()
    harvest(cfg, run, progress=False, lm=lm)
    results["one_process_tok_s"] = args.tokens / (time.perf_counter() - t0)
    for workers in (1, 2):
        with open_executor(workers, progress=False) as cluster:
            # cold: the workers import torch/transformers and load the model inside the timing;
            # warm: a second run on the same cluster, each worker's model already loaded
            for state in ("cold", "warm"):
                run = fresh(f"dask_{workers}_{state}")
                t0 = time.perf_counter()
                harvest(cfg, run, cluster, progress=False)
                results[f"dask_{workers}_workers_{state}_tok_s"] = args.tokens / (time.perf_counter() - t0)
    reference = store_files(tmp / "one_process")
    results["stores_identical"] = all(
        store_files(tmp / f"dask_{w}_{state}") == reference for w in (1, 2) for state in ("cold", "warm")
    )
    print(
        json.dumps(
            {
                "model": f"random llama, {args.layers} layers, d={args.d_model}",
                "tokens": args.tokens,
                **{k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
