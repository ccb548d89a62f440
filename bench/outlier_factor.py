"""How much the typical-token figures depend on report.outlier_factor: the same SAEs, evaluated with
each factor's outlier thresholds (factor x each layer's median token norm, from the all-layers run).

For each factor: how many held-out tokens are outliers per layer (mean and most), and each arm's
typical-token FVU with the paired gap against the last arm (± one standard error over contexts).
Only the evaluation changes here; a factor also decides what fit.outliers = clip clips in training,
which this script does not retrain.

    python bench/outlier_factor.py SWEEP --budget 262144 --arms G2,per-layer [--factors 4,5,10,20]
                                   [--contexts 64]

SWEEP is a `ghsae sweep` folder (its per-layer run gives the thresholds; each arm's seed-0 SAEs at
--budget are evaluated; without --budget, the arms' own folders).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ghsae.analysis.evals import EvalTarget, evaluate, outlier_thresholds
from ghsae.layout import PER_LAYER_DIR
from ghsae.run import Run
from ghsae.sweep import budget_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--arms", default="G2,per-layer", help="the last arm is the reference of the gaps")
    ap.add_argument("--budget", type=int)
    ap.add_argument("--factors", default="4,5,10,20")
    ap.add_argument("--contexts", type=int, default=64)
    args = ap.parse_args()
    source = Run.open(args.sweep / PER_LAYER_DIR)
    arms = args.arms.split(",")
    targets, keys = [], {}
    for arm in arms:
        run = Run.open(args.sweep / budget_name(arm, args.budget))
        keys[arm] = []
        for group in run.plan.group_names:
            t = EvalTarget(f"{arm}/{group}", arm, run.sae(group), spliced=False)
            targets.append(t)
            keys[arm] += [(t.name, layer) for layer in t.sae.cfg.layers if layer != source.plan.layers[-1]]
    contexts = np.array(source.eval_contexts()[: args.contexts])
    lm = source.model("cpu", "float32")
    base = arms[-1]
    print(
        f"{len(contexts)} held-out contexts ({contexts.size:,} tokens); means over layers "
        f"{source.plan.layers[0]}..{source.plan.layers[-2]}; gaps against {base}, paired by context"
    )
    print("| outlier_factor | outliers / layer (mean, most) | share of tokens | " + " | ".join(f"{a} FVU typical" for a in arms) + " | " + " | ".join(f"{a} − {base}" for a in arms[:-1]) + " |")
    print("|" + "---|" * (3 + 2 * len(arms) - 1))
    for factor in (float(f) for f in args.factors.split(",")):
        result = evaluate(
            lm, contexts, targets, list(source.plan.tokenizer.special_ids), ce_contexts=0, latents_sampled=1,
            examples_per_latent=1, progress=False, zero_ablation=False,
            outlier_threshold=outlier_thresholds(source, factor), hookpoint=source.plan.hookpoint,
        )  # fmt: skip
        per_layer = {r["layer"]: r["outliers"] for r in result.rows if r["kind"] == base}
        counts = [per_layer[x] for x in source.plan.layers[:-1] if x in per_layer]
        rows = result.eval_tokens
        cells = [f"{factor:g}", f"{np.mean(counts):.1f}, {max(counts)}", f"{100 * np.mean(counts) / rows:.3f} %"]
        for arm in arms:
            mean, se = result.mean_with_se(keys[arm], "fvu_typical")
            cells.append(f"{mean:.4f} ± {se:.4f}")
        ref, _ = result.mean_with_se(keys[base], "fvu_typical")
        for arm in arms[:-1]:
            d, d_se = result.difference_with_se(keys[arm], keys[base], "fvu_typical")
            cells.append(f"{d:+.4f} ± {d_se:.4f} ({100 * d / ref:+.1f} %)")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
