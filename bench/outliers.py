"""Which fit.outliers gives the better SAEs: keep, drop or clip massive-activation tokens in training.

Trains the group SAEs of one harvested run three times (on hard-linked copies of its store, so no
bytes are copied), once per fit.outliers setting, with everything else equal, and evaluates all of
them in one pass over the same held-out contexts. Prints, per setting, FVU over typical tokens and
over all tokens, delta CE % and KL both ways, each a mean over the run's layers with its standard
error over eval contexts, and the paired difference against keep.

    python bench/outliers.py RUN [--ce-contexts 16] [--settings keep,drop,clip]

RUN is a harvested run (`ghsae harvest`); the study folders go beside it (RUN-outliers-<setting>).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ghsae.analysis.evals import EvalTarget, evaluate, outlier_thresholds
from ghsae.compare import link_run
from ghsae.lm import load_model
from ghsae.pipeline import fit, settings_for
from ghsae.run import Run

METRICS = (("fvu", "{:.4f}"), ("delta_ce_pct", "{:.2f}"), ("kl", "{:.4f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--settings", default="keep,drop,clip")
    ap.add_argument("--ce-contexts", type=int, default=16)
    args = ap.parse_args()
    source = Run.open(args.run)
    cfg = settings_for(args.run, None, {}, ("fit",))
    targets, names = [], []
    for setting in args.settings.split(","):
        folder = args.run.parent / f"{args.run.name}-outliers-{setting}"
        link_run(args.run, folder)
        scfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, outliers=setting))
        t0 = time.perf_counter()
        fit(scfg, folder, progress=False)
        print(f"fit.outliers = {setting}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        run = Run.open(folder)
        for group in run.plan.group_names:
            targets.append(EvalTarget(f"{setting}/{group}", "group", run.sae(group)))
        names.append(setting)
    lm = load_model(cfg.model.path, "cpu", "float32")
    contexts = source.eval_contexts()
    t0 = time.perf_counter()
    result = evaluate(
        lm,
        contexts,
        targets,
        list(source.plan.tokenizer.special_ids),
        ce_contexts=args.ce_contexts,
        latents_sampled=1,
        examples_per_latent=1,
        progress=False,
        zero_ablation=False,
        outlier_threshold=outlier_thresholds(source, cfg.report.outlier_factor),
    )
    print(
        f"evaluated in {time.perf_counter() - t0:.0f} s: FVU over {result.eval_contexts} contexts "
        f"({result.eval_tokens:,} tokens), CE/KL over {result.ce_tokens:,} predictions ({result.ce_contexts} contexts); "
        f"mean over layers {source.plan.layers[0]}..{source.plan.layers[-1]}, ± one SE over eval contexts"
    )
    layers = source.plan.layers
    keys = {
        n: [(t.name, layer) for t in targets if t.name.startswith(n + "/") for layer in t.sae.cfg.layers] for n in names
    }
    head = ["fit.outliers"] + [f"{m}{v}" for m, _ in METRICS for v in ("_typical", "")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n in names:
        cells = [n]
        for m, spec in METRICS:
            for key in (f"{m}_typical", m):
                mean, se = result.mean_with_se(keys[n], key)
                cell = f"{spec.format(mean)} ± {spec.format(se)}"
                if n != names[0]:
                    d, d_se = result.difference_with_se(keys[n], keys[names[0]], key)
                    cell += f" (vs {names[0]}: {d:+.4f} ± {d_se:.4f})"
                cells.append(cell)
        print("| " + " | ".join(cells) + " |")
    outliers = {r["layer"]: r["outliers"] for r in result.rows}
    print("held-out outliers per layer:", {x: outliers.get(x) for x in layers})


if __name__ == "__main__":
    main()
