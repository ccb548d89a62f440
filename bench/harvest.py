"""Harvest throughput against its limit: a bare forward pass over the same batches.

    python bench/harvest.py [--tokens 32768] [--model builtin:smollm2-135m] [--device auto]

Prints one JSON line. `harvest_tok_s` times the shard phase of `ghsae harvest` (forward, gather,
cast, checksum, Zarr write, records); `forward_tok_s` times the model alone on the same contexts
and batch size, stopped after the same last layer, in the same process. Their ratio is the
harvest's efficiency (aim: >= 0.9). The bare pass runs before and after the harvest and the two are
averaged, so a machine that speeds up or slows down during the run does not flatter either side.
Model loading and the plan step (tokenising, probe) are outside both timings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ghsae.config import load_config
from ghsae.harvest.plan import context_batches
from ghsae.hooks import capture_layers
from ghsae.lm import load_model
from ghsae.pipeline import harvest
from ghsae.run import Run


def bare_forward_tok_s(lm, tokens: np.ndarray, batch_size: int, last_layer: int) -> float:
    n = 0
    t0 = time.perf_counter()
    for ids in context_batches(tokens, batch_size, lm.device):
        capture_layers(lm.model, lm.blocks, ids, [last_layer], lambda layer, x: None)
        n += ids.numel()
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="pipeline.toml (default: the embedded one)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--groups", default=None, help="auto | per-layer | G")
    args = ap.parse_args()
    groups = int(args.groups) if args.groups and args.groups.isdigit() else args.groups
    cfg = load_config(
        args.config,
        {
            "model.path": args.model,
            "model.device": args.device,
            "data.dataset": args.dataset,
            "harvest.tokens": args.tokens,
            "harvest.shard_tokens": args.shard_tokens,
            "harvest.probe_tokens": min(4096, args.tokens),
            "harvest.eval_tokens": 0,
            "harvest.batch_size": args.batch_size,
            "grouping.groups": groups,
            "storage.chunk_rows": min(4096, args.shard_tokens),
        },
    )
    lm = load_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
    with tempfile.TemporaryDirectory(prefix="ghsae-bench-") as tmp:
        run = Path(tmp) / "run"
        harvest(cfg, run, plan_only=True, progress=False, lm=lm)
        planned = Run.open(run)
        plan = planned.plan
        contexts = np.asarray(planned.tokens()[: plan.n_contexts_harvest])
        last = max(plan.layers)
        bare_forward_tok_s(lm, contexts[: cfg.harvest.batch_size], cfg.harvest.batch_size, last)  # warm-up
        before = bare_forward_tok_s(lm, contexts, cfg.harvest.batch_size, last)
        summary = harvest(cfg, run, progress=False, lm=lm)
        after = bare_forward_tok_s(lm, contexts, cfg.harvest.batch_size, last)
    forward = (before + after) / 2
    info = summary.info
    print(
        json.dumps(
            {
                "model": cfg.model.path,
                "device": str(lm.device),
                "dtype": str(lm.dtype).removeprefix("torch."),
                "tokens": summary.tokens_written,
                "layers": len(plan.layers),
                "groups": len(plan.groups),
                "harvest_tok_s": round(summary.tokens_per_second, 1),
                "forward_tok_s": round(forward, 1),
                "forward_tok_s_before_after": [round(before, 1), round(after, 1)],
                "ratio": round(summary.tokens_per_second / forward, 3),
                "bytes_per_token": round(info.bytes_per_token or 0.0, 1),
                "per_layer_bytes_per_token": info.per_layer_bytes_per_token,
                "storage_ratio": round(info.storage_ratio or 0.0, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
