"""Benchmark the report's spliced passes: blocks L+1.. only (reusing the clean prefix) against a full
forward pass with block L's output overwritten by a hook, on the same batch, in the same process.

    python bench/report.py [--model builtin:smollm2-135m] [--contexts 4] [--context-length 256]

Prints one JSON line: seconds per spliced pass averaged over every layer, both ways, and their
ratio (the saving the report gets on its CE/KL evals, which are dominated by these passes).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ghsae.analysis.splice import Splicer
from ghsae.lm import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    lm = load_model(args.model, args.device, "auto")
    gen = torch.Generator().manual_seed(0)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(10, vocab, (args.contexts, args.context_length), generator=gen).to(lm.device)
    splicer = Splicer(lm)
    resid, _ = splicer.clean(ids)

    def sync():
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    spliced_s, full_s = [], []
    for layer in range(lm.n_layers):
        new = resid[layer] * 0.9
        sync()
        t0 = time.perf_counter()
        splicer.spliced(ids, layer, new)
        sync()
        spliced_s.append(time.perf_counter() - t0)

        def overwrite(module, a, output, new=new):
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = lm.blocks[layer].register_forward_hook(overwrite)
        try:
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                lm.model(input_ids=ids, use_cache=False)
            sync()
            full_s.append(time.perf_counter() - t0)
        finally:
            handle.remove()
    mean_spliced, mean_full = sum(spliced_s) / len(spliced_s), sum(full_s) / len(full_s)
    print(
        json.dumps(
            {
                "model": args.model,
                "device": str(lm.device),
                "tokens_per_pass": ids.numel(),
                "layers": lm.n_layers,
                "spliced_pass_s": round(mean_spliced, 4),
                "full_pass_s": round(mean_full, 4),
                "ratio_spliced_over_full": round(mean_spliced / mean_full, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
