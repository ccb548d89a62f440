"""Does the gap between group and per-layer SAEs depend on the learning rate, at a run's own budget?

The sweep picks each arm's rate at its smallest budget (`compare.lr_grid`), where few steps favour
the largest rate of the grid. This script asks the question at the budget of a finished `ghsae run`
instead: some of its group SAEs and the per-layer SAEs at their spot layers are trained again at each
rate of --lrs (on hard links to the run's stores: no harvest, no copy), and every SAE (the run's own,
at its [fit] lr, and each rate's) is evaluated in one pass over the run's held-out contexts.

    python bench/learning_rate.py RUN --groups group_01,group_03 --lrs 1e-2,3e-2
                                  [--ce-contexts 8] [--out DIR]

RUN is a `ghsae run` folder: a grouped run with its all-layers run at RUN/per-layer and its spot
checks trained there. The new runs go to DIR (default RUN-lr/) as group-lr<rate> and
per-layer-lr<rate>; a second call resumes (trained SAEs are found trained). Prints one Markdown row per
rate: typical-token and all-token FVU of the group SAEs and of the per-layer SAEs at the spot layers
of the chosen groups (± one standard error over eval contexts), the paired gap, and delta CE % over
typical tokens at those layers when --ce-contexts > 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ghsae.analysis.evals import EvalTarget
from ghsae.compare import link_run, spot_layers
from ghsae.layout import PER_LAYER_DIR
from ghsae.pipeline import fit, settings_for
from ghsae.run import Run

try:
    from paired import evaluate_arms  # bench/paired.py, beside this script
except ImportError:  # run as a module from elsewhere
    from bench.paired import evaluate_arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--groups", required=True, help="group SAEs to train again, e.g. group_01,group_03")
    ap.add_argument("--lrs", required=True, help="rates besides the run's own, e.g. 1e-2,3e-2")
    ap.add_argument("--ce-contexts", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    run, source = Run.open(args.run), Run.open(args.run / PER_LAYER_DIR)
    cfg = settings_for(args.run, None, {}, ("fit",))
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - set(run.plan.group_names))
    if unknown:
        raise SystemExit(f"{args.run} has no group {', '.join(unknown)}; its groups: {', '.join(run.plan.group_names)}")
    layers_of = dict(zip(run.plan.group_names, run.plan.groups))
    served = {layer for g in groups for layer in layers_of[g]}
    spots = [layer for layer in spot_layers(run.plan, cfg) if layer in served]
    if not spots:
        raise SystemExit(f"no spot layer of {args.run} falls in {', '.join(groups)}: pick multi-layer groups")
    out = args.out or args.run.parent / f"{args.run.name}-lr"
    own_lr = cfg.fit.lr
    rates = [own_lr, *sorted({float(x) for x in args.lrs.split(",")} - {own_lr})]
    print(f"groups {', '.join(f'{g} ({layers_of[g][0]}-{layers_of[g][-1]})' for g in groups)}; spot layers {spots}; "
          f"the run's own lr {own_lr:g}; rates {', '.join(f'{r:g}' for r in rates)}", flush=True)

    targets: list[EvalTarget] = []
    group_keys: dict[float, list[tuple[str, int]]] = {}
    per_layer_keys: dict[float, list[tuple[str, int]]] = {}
    for lr in rates:
        if lr == own_lr:  # the run's own SAEs
            grouped, per_layer = args.run, args.run / PER_LAYER_DIR
        else:
            grouped, per_layer = out / f"group-lr{lr:g}", out / f"per-layer-lr{lr:g}"
            lr_cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, lr=lr))
            t0 = time.perf_counter()
            link_run(args.run, grouped)
            fit(lr_cfg, grouped, groups=groups, progress=False)
            link_run(args.run / PER_LAYER_DIR, per_layer)
            fit(lr_cfg, per_layer, groups=[source.plan.group_of_layer(s) for s in spots], progress=False)
            print(f"lr {lr:g}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        g_run, p_run = Run.open(grouped), Run.open(per_layer)
        group_keys[lr], per_layer_keys[lr] = [], []
        for g in groups:
            t = EvalTarget(f"lr{lr:g}/{g}", "group", g_run.sae(g), ce_layers=frozenset(spots))
            targets.append(t)
            group_keys[lr] += [(t.name, s) for s in spots if s in layers_of[g]]
        for s in spots:
            t = EvalTarget(f"lr{lr:g}/per-layer {s}", "baseline", p_run.sae(source.plan.group_of_layer(s)))
            targets.append(t)
            per_layer_keys[lr].append((t.name, s))

    result = evaluate_arms(source, cfg, targets, args.ce_contexts)
    metrics = ["fvu_typical", "fvu"] + (["delta_ce_pct_typical"] if result.ce_tokens else [])
    head = ["lr"] + [f"{m} {side}" for m in metrics for side in ("group", "per-layer", "gap")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for lr in rates:
        cells = [f"{lr:g}" + (" (run's)" if lr == own_lr else "")]
        for m in metrics:
            g, g_se = result.mean_with_se(group_keys[lr], m)
            p, p_se = result.mean_with_se(per_layer_keys[lr], m)
            d, d_se = result.difference_with_se(group_keys[lr], per_layer_keys[lr], m)
            cells += [f"{g:.4f} ± {g_se:.4f}", f"{p:.4f} ± {p_se:.4f}", f"{d:+.4f} ± {d_se:.4f} ({100 * d / p:+.0f} %)"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
