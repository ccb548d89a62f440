"""Benchmark the report's spliced CE against a bare forward pass, on the same tokens, in the same process.

    python bench/report.py [--model builtin:smollm2-135m] [--contexts 4] [--context-length 256] [--rounds 2]

The SAEs are those of `ghsae run`'s default comparison at one group: a group SAE over --group layers
and per-layer SAEs at the group's spot layers (first, middle, last), random TopK SAEs of the default
width; the group SAE is spliced at the spot layers only (report.ce_layers = "spot"). Outlier thresholds
at each layer's 90th percentile norm put outliers in every context, so every (SAE, layer) needs both
views (all tokens and typical) everywhere: the worst case (on a real run few contexts hold one).

Spliced-CE time is evaluate() with CE on minus evaluate() with CE off (the FVU pass alone), on the same
contexts and SAEs; it counts the stacked spliced passes, both views, the zero ablation and the CE / KL
reductions. The bare forward pass is model(ids) over the same contexts. Rounds alternate the
measurements and keep each one's fastest (the machine may be shared).

Prints one JSON line. `ratio` (the issue's figure): the spliced-CE rate as a share of a bare forward
pass over the same tokens and layers, that is sum over the spliced passes of a bare pass of the
same blocks (the blocks after the pass's layer and the unembedding, on the same contexts, without an
edit, a CE reduction or stacking), divided by the spliced-CE time. It is what the splicing costs
beyond the model's own work: building the edits, the CE and KL reductions over the vocabulary,
stacking. `ratio_pairs` is the older figure: (SAE, layer) pairs x a bare forward pass of the whole
model / spliced-CE time. Every pair here has outliers in every context, so it needs both views,
and each layer adds a zero-ablation pass: 2.5 spliced passes a pair, so it stays near 0.5 however
cheap the splicing; a real run needs the second view only in the few contexts holding an outlier.
`ratio_one_at_a_time` is `ratio` with one edit per spliced pass (no stacking).
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

    # contexts spliced at each layer (edits x contexts), counted on one evaluation
    spliced_at: dict[int, int] = {}
    original = evals.Splicer.spliced

    def counting(self, input_ids, layer, new_resid, logits_to_keep=0, repeats=1):
        spliced_at[layer] = spliced_at.get(layer, 0) + input_ids.shape[0] * repeats
        return original(self, input_ids, layer, new_resid, logits_to_keep, repeats)

    evals.Splicer.spliced = counting  # type: ignore[method-assign]
    run_eval(True)
    evals.Splicer.spliced = original  # type: ignore[method-assign]
    splicer = evals.Splicer(lm)
    with torch.inference_mode():
        clean_resid, _ = splicer.clean(ids)

    def bare_later(layer: int):
        """The model's own pass of the blocks after `layer` and the unembedding, on the clean activation."""
        return lambda: splicer.spliced(ids, layer, clean_resid[layer])

    def one_at_a_time():
        saved = evals.SPLICE_PREDICTIONS
        evals.SPLICE_PREDICTIONS = {"cuda": 1, "cpu": 1}
        try:
            run_eval(True)
        finally:
            evals.SPLICE_PREDICTIONS = saved

    bare()  # warm-up
    best: dict[str, float] = {}
    measured = [("bare", bare), ("eval_ce", lambda: run_eval(True)), ("eval_no_ce", lambda: run_eval(False)),
                ("eval_one_at_a_time", one_at_a_time)]  # fmt: skip
    measured += [(f"bare_after_{layer}", bare_later(layer)) for layer in spliced_at]
    for _ in range(args.rounds):
        for name, fn in measured:
            best[name] = min(best.get(name, float("inf")), timed(fn))
    spliced_s = max(best["eval_ce"] - best["eval_no_ce"], 1e-9)
    single_s = max(best["eval_one_at_a_time"] - best["eval_no_ce"], 1e-9)
    # bare passes of the same blocks on the same contexts: a layer's spliced contexts / contexts a pass
    bare_same_s = sum(n / args.contexts * best[f"bare_after_{layer}"] for layer, n in spliced_at.items())
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
                "spliced_passes": {layer: n / args.contexts for layer, n in sorted(spliced_at.items())},
                "bare_pass_after_layer_s": {layer: round(best[f"bare_after_{layer}"], 3) for layer in sorted(spliced_at)},
                "bare_same_blocks_s": round(bare_same_s, 3),
                "ratio": round(bare_same_s / spliced_s, 3),
                "ratio_one_at_a_time": round(bare_same_s / single_s, 3),
                "ratio_pairs": round(pairs * best["bare"] / spliced_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
