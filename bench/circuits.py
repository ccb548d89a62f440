"""Measure the circuit evals on a fitted run without the rest of the report: the clean task metrics,
faithfulness and completeness curves of its SAEs (and of a baseline's), and what they cost.

    python bench/circuits.py RUN [--baseline BASE] [--tasks ioi,greater-than,sva] [--prompts 16]
        [--layers 5,15] [--kept 0,4,32,256,2048] [--out DIR]

Writes DIR/circuits.parquet, DIR/circuits.html (the report's section, figures inlined) and
DIR/circuits.json (clean checks, seconds, and the curves' per-layer values), and prints a summary.
The run folder is only read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghsae.analysis.circuit_report import make_tasks, mean_curve, measure, render_section
from ghsae.analysis.circuits import MEASURES, CircuitTarget
from ghsae.analysis.report import SAEKind, load_side
from ghsae.config import load_config
from ghsae.run import Run


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--baseline")
    ap.add_argument("--tasks", default="ioi,greater-than,sva")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--layers", help="comma-separated; default every layer")
    ap.add_argument("--kept", help="comma-separated N; default 0, 1, 4, ... every latent")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="circuits-bench")
    ap.add_argument("--allow-partial", action="store_true", help="use the SAEs trained so far")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(
        None,
        {
            "report.tasks": args.tasks.split(","),
            "report.task_prompts": args.prompts,
            "report.task_layers": _ints(args.layers),
            "report.task_kept": _ints(args.kept),
            "report.device": args.device,
        },
    )
    t0 = time.perf_counter()
    run = load_side(Run.open(args.run), SAEKind.GROUP, args.allow_partial)
    targets = [CircuitTarget(t.name, t.kind, t.sae) for t in run.targets]
    if args.baseline:
        base = load_side(Run.open(args.baseline), SAEKind.BASELINE, True)
        targets += [CircuitTarget(t.name, t.kind, t.sae) for t in base.targets]
    lm = run.run.model(args.device)
    load_s = time.perf_counter() - t0
    tasks = make_tasks(cfg.report.tasks, lm.tokenizer, cfg.report.task_prompts, cfg.fit.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = measure(lm, tasks, targets, [list(g) for g in run.run.plan.groups], cfg.report, cfg.fit.seed, out)
    (out / "circuits.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>circuits</title>{render_section(report)}", encoding="utf-8"
    )
    summary = {
        "run": args.run,
        "device": str(lm.device),
        "load_seconds": load_s,
        "prompts": args.prompts,
        "tasks": [],
    }
    for r in report.results:
        entry = {
            "task": r.check.task,
            "clean_metric": r.check.mean_metric,
            "accuracy": r.check.accuracy,
            "solved": r.check.solved,
            "seconds": r.seconds,
            "gap_per_layer": dict(r.gaps),
            "means": {},
        }
        for kind in ("group", "baseline", "random", "zero"):
            for measure_name in MEASURES:
                n, v = mean_curve([c for c in r.curves if c.kind == kind and c.measure == measure_name])
                if n:
                    entry["means"][f"{kind}/{measure_name}"] = dict(zip(n, v))
        entry["per_layer"] = [
            {"sae": c.sae, "kind": c.kind, "layer": c.layer, "measure": c.measure, "n": c.n, "value": c.value}
            for c in r.curves
        ]
        summary["tasks"].append(entry)
        print(
            f"{r.check.task}: clean {r.check.mean_metric:.3f}, right on {100 * r.check.accuracy:.0f}% "
            f"({'solved' if r.check.solved else 'NOT solved'}), {r.seconds:.0f} s"
        )
        for key, curve in entry["means"].items():
            print(f"  {key:<36} " + "  ".join(f"N={n}: {v:.3f}" for n, v in curve.items()))
    (out / "circuits.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/circuits.html, circuits.parquet, circuits.json ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
