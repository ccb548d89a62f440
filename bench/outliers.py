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

from ghsae.analysis.evals import EvalTarget
from ghsae.compare import link_run
from ghsae.pipeline import fit, settings_for
from ghsae.run import Run

try:
    from paired import evaluate_arms, print_table  # bench/paired.py, beside this script
except ImportError:  # run as a module from elsewhere
    from bench.paired import evaluate_arms, print_table


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
    result = evaluate_arms(source, cfg, targets, args.ce_contexts)
    layers = source.plan.layers
    keys = {
        n: [(t.name, layer) for t in targets if t.name.startswith(n + "/") for layer in t.sae.cfg.layers] for n in names
    }
    print_table(result, "fit.outliers", keys, {})
    outliers = {r["layer"]: r["outliers"] for r in result.rows}
    print("held-out outliers per layer:", {x: outliers.get(x) for x in layers})


if __name__ == "__main__":
    main()
