"""Which grouping.method gives the better SAEs at equal G: dp, agglomerative or reference.

Solves the partition of every method at the same G on an all-layers run's probe distances (its
grouping.distance), derives one grouped run per distinct partition from that run's store (no model
pass), trains its group SAEs with the run's [fit] settings, and evaluates them all in one pass over
the same held-out contexts. Prints, per method, its partition, FVU over typical tokens and over all
tokens (and delta CE % / KL when --ce-contexts > 0), each a mean over every harvested layer with its
standard error over eval contexts, and the paired difference against the first method.

    python bench/methods.py ALL_LAYERS_RUN --groups 7 [--methods dp,agglomerative,reference]
                            [--seeds 1] [--ce-contexts 0] [--out DIR]

ALL_LAYERS_RUN is a run harvested with --groups per-layer (`ghsae run` keeps one at RUN/per-layer).
The grouped runs go to DIR (default: beside the source, <source>-methods/) as <method>-seed<s>;
a second call resumes: derived shards and trained SAEs are reused. A sweep's G<n> of the same
source (`cp -al SWEEP/G<n> DIR/<default method>-seed0`) is the default method's run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ghsae.analysis.evals import EvalTarget
from ghsae.compare import seed_config
from ghsae.harvest.derive import derive_run
from ghsae.harvest.partition import choose_groups, solve_grouping
from ghsae.pipeline import fit, settings_for
from ghsae.run import Run

try:
    from paired import evaluate_arms, print_table  # bench/paired.py, beside this script
except ImportError:  # run as a module from elsewhere
    from bench.paired import evaluate_arms, print_table


def partition_of(source: Run, cfg, method: str, g: int) -> list[list[int]]:
    """Method's groups (model layer indices) at G = g on the source's probe distances."""
    import numpy as np

    sim = np.load(source.layout.similarity)
    dist = sim["centred" if cfg.grouping.distance == "layer-centred" else "raw"]
    layers = [int(x) for x in sim["layers"]]
    solution = solve_grouping(dist, method, cfg.grouping.objective, cfg.grouping.last_layer, g)
    return choose_groups(solution, g, cfg.grouping.amad_threshold, layers)


def label(groups: list[list[int]]) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("--groups", type=int, required=True, help="G, counted as grouping.last_layer counts it")
    ap.add_argument("--methods", default="dp,agglomerative,reference")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ce-contexts", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    source = Run.open(args.source)
    if not source.plan.per_layer:
        raise SystemExit(f"{args.source} is not an all-layers run; harvest one with --groups per-layer")
    out = args.out or args.source.parent / f"{args.source.name}-methods"
    cfg = settings_for(args.source, None, {}, ("fit",))
    methods = args.methods.split(",")
    partitions = {m: partition_of(source, cfg, m, args.groups) for m in methods}
    first_with = {}
    for m in methods:
        first_with.setdefault(label(partitions[m]), m)
        print(f"{m:>13} G={args.groups}: {label(partitions[m])}", flush=True)
    targets, keys = [], {}
    for m in methods:
        twin = first_with[label(partitions[m])]
        if twin != m:
            print(f"{m} gives the same partition as {twin}: its figures are {twin}'s", flush=True)
            keys[m] = keys[twin]
            continue
        keys[m] = []
        # G and the method, not the groups themselves: the run records how its partition was chosen (and
        # the default method's run is then the same run as a sweep's G<n>, which can be linked in)
        mcfg = dataclasses.replace(cfg, grouping=dataclasses.replace(cfg.grouping, groups=args.groups, method=m))
        for s in range(args.seeds):
            scfg = seed_config(mcfg, s)
            folder = out / f"{m}-seed{s}"
            t0 = time.perf_counter()
            derive_run(args.source, scfg, folder, progress=False)
            fit(scfg, folder, progress=False)
            print(f"{m} seed {s}: derived and trained in {time.perf_counter() - t0:.0f} s", flush=True)
            run = Run.open(folder)
            for group in run.plan.group_names:
                t = EvalTarget(f"{m}-seed{s}/{group}", "group", run.sae(group))
                targets.append(t)
                keys[m] += [(t.name, layer) for layer in t.sae.cfg.layers]
    print(
        f"grouping.distance = {cfg.grouping.distance}, last_layer = {cfg.grouping.last_layer}, "
        f"fit.outliers = {cfg.fit.outliers}; {args.seeds} seed(s) per method"
    )
    result = evaluate_arms(source, cfg, targets, args.ce_contexts)
    print_table(result, "grouping.method", {m: keys[m] for m in methods}, {m: [label(partitions[m])] for m in methods})


if __name__ == "__main__":
    main()
