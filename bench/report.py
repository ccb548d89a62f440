"""Benchmark the report's spliced CE against a bare forward pass, on the same tokens, in the same process.

    python bench/report.py [--model builtin:smollm2-135m] [--contexts 4] [--context-length 256] [--rounds 2]

The SAEs are those of `ghsae run`'s default comparison at one group: a group SAE over --group layers
and per-layer SAEs at the group's spot layers (first, middle, last), random TopK SAEs of the default
width; the group SAE is spliced at the spot layers only (report.ce_layers = "spot"). Outlier thresholds
make some rows outliers, so every (SAE, layer) has both views (all tokens and typical), as on real runs.

Spliced-CE time is evaluate() with CE on minus evaluate() with CE off (the FVU pass alone), on the same
contexts and SAEs; it counts the stacked spliced passes, both views, the zero ablation and the CE / KL
reductions. The bare forward pass is model(ids) over the same contexts. Rounds alternate the three
measurements and keep each one's fastest (the machine may be shared).

Prints one JSON line; `ratio` = (spliced (SAE, layer) pairs x bare forward seconds) / spliced-CE
seconds: the spliced-CE rate, in (SAE, layer) pairs per second over these tokens, as a share of the
bare forward pass's rate. Above 1, measuring one (SAE, layer)'s CE costs less than one forward pass.
`ratio_one_at_a_time` is the same with one edit per spliced pass (no stacking). Every (SAE, layer)
here needs both views, and the zero ablation is shared by a layer's two SAEs: 2.5 spliced passes a
pair, each running the blocks after the layer and the whole unembedding, so about 0.5 is what the
pass count allows here; a real run, where few contexts hold an outlier, needs fewer passes a pair.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import ghsae.analysis.evals as evals
from ghsae.analysis.evals import EvalTarget, evaluate
from ghsae.lm import load_model
from ghsae.sae import SAEConfig, build_sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--group", default="10,14", help="first,last layer of the group SAE")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    lm = load_model(args.model, args.device, "auto")
    torch.manual_seed(0)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    contexts = np.random.default_rng(0).integers(10, vocab, (args.contexts, args.context_length))
    contexts[:, 0] = 0  # a special token, never replaced
    ids = torch.from_numpy(contexts).long().to(lm.device)
    first, last = map(int, args.group.split(","))
    spot = sorted({first, (first + last) // 2, last})
    d = lm.d_model

    def sae(layers: list[int]):
        cfg = SAEConfig(architecture="topk", d_model=d, n_latents=args.expansion * d, layers=layers, k=args.k)
        return build_sae(cfg)

    targets = [EvalTarget("group", "group", sae(list(range(first, last + 1))), ce_layers=frozenset(spot))]
    targets += [EvalTarget(f"per-layer {x}", "baseline", sae([x])) for x in spot]
    pairs = 2 * len(spot)  # the group SAE and one per-layer SAE at each spot layer
    with torch.inference_mode():
        hidden = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # the 90th percentile of each layer's norms: some outliers in every batch, as massive activations are
    thresholds = {x: float(hidden[x + 1][:, 1:].norm(dim=-1).float().quantile(0.9)) for x in range(lm.n_layers)}

    def sync() -> None:
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def run_eval(ce: bool):
        return evaluate(
            lm, contexts, targets, [0], ce_contexts=args.contexts if ce else 0, batch_contexts=args.contexts,
            progress=False, outlier_threshold=thresholds,
        )

    def bare():
        with torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False)

    def one_at_a_time():
        saved = evals.SPLICE_PREDICTIONS
        evals.SPLICE_PREDICTIONS = 1
        try:
            run_eval(True)
        finally:
            evals.SPLICE_PREDICTIONS = saved

    bare()  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("eval_ce", lambda: run_eval(True)), ("eval_no_ce", lambda: run_eval(False)),
                         ("eval_one_at_a_time", one_at_a_time)):
            best[name] = min(best.get(name, float("inf")), timed(fn))
    spliced_s = max(best["eval_ce"] - best["eval_no_ce"], 1e-9)
    single_s = max(best["eval_one_at_a_time"] - best["eval_no_ce"], 1e-9)
    print(
        json.dumps(
            {
                "model": args.model,
                "device": str(lm.device),
                "threads": torch.get_num_threads(),
                "tokens": int(ids.numel()),
                "spliced_layers": spot,
                "spliced_pairs": pairs,
                "bare_forward_s": round(best["bare"], 3),
                "eval_with_ce_s": round(best["eval_ce"], 3),
                "eval_without_ce_s": round(best["eval_no_ce"], 3),
                "spliced_ce_s": round(spliced_s, 3),
                "ratio": round(pairs * best["bare"] / spliced_s, 3),
                "ratio_one_at_a_time": round(pairs * best["bare"] / single_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
