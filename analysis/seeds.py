"""Training noise: a metric of an arm trained with several seeds, and a gap between two arms paired by seed.

A standard error over eval contexts says how much the figure would move on other held-out text with
the same SAEs; it says nothing of how much it moves when the same recipe is trained again (another
initialisation, loader order and layer draw), which can be as large as a gap between groupings. With
N >= 2 seeds per arm (compare.seeds), each figure also gets the standard error across seeds: the
sample standard deviation of the per-seed figures over sqrt(N); a gap pairs seed s of one arm with
seed s of the other. Every seed is evaluated on the same contexts, so the context error of the mean
over seeds (and of the paired difference) comes from the averaged per-context influences as before.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ghsae.analysis.evals import EvalResult
from ghsae.analysis.html import fmt, pm

ONE_SEED = "one seed: no training-noise error"
Keys = list[tuple[str, int]]  # (SAE name, layer) rows of one seed


@dataclass(frozen=True)
class Estimate:
    """A figure averaged over seeds, with its standard error over eval contexts and across seeds."""

    mean: float
    context_se: float
    seed_se: float  # nan with one seed
    n_seeds: int


def seed_se(values: Iterable[float]) -> float:
    """Standard error of the mean of per-seed figures: std (n - 1 in the denominator) / sqrt(n)."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size >= 2 else float("nan")


def arm(result: EvalResult, keys_by_seed: list[Keys], metric: str) -> Estimate:
    """`metric` averaged over the rows of every seed (each seed's rows: the same layers)."""
    keys_by_seed = [k for k in keys_by_seed if k]
    per_seed = [result.mean_with_se(keys, metric)[0] for keys in keys_by_seed]
    mean, context = result.mean_with_se([k for keys in keys_by_seed for k in keys], metric)
    return Estimate(mean, context, seed_se(per_seed), len(per_seed))


def gap(result: EvalResult, a_by_seed: list[Keys], b_by_seed: list[Keys], metric: str) -> Estimate:
    """Arm a minus arm b, seed s paired with seed s (over the seeds both have)."""
    n = min(len(a_by_seed), len(b_by_seed))
    diffs = [result.difference_with_se(a_by_seed[s], b_by_seed[s], metric)[0] for s in range(n)]
    a = [k for keys in a_by_seed[:n] for k in keys]
    b = [k for keys in b_by_seed[:n] for k in keys]
    mean, context = result.difference_with_se(a, b, metric)
    return Estimate(mean, context, seed_se(diffs), n)


def show(e: Estimate, spec: str) -> str:
    """`mean ± context SE`, then the error across seeds when there is one."""
    out = pm(e.mean, e.context_se, spec)
    return out + (f" (± {fmt(e.seed_se, spec)} across {e.n_seeds} seeds)" if e.n_seeds >= 2 else "")


def errors_note(n_seeds: int, counts_differ: bool = False) -> str:
    """What the two errors are, or that there is only one. counts_differ: the arms have unequal
    numbers of seeds (n_seeds the fewest), so the note names none."""
    if n_seeds >= 2:
        counted = "seeds" if counts_differ else f"{n_seeds} seeds"
        return (
            f"the second ± is across the {counted} (each with another initialisation and loader order, and for "
            "group SAEs another layer draw; std over seeds / √N, gaps paired by seed)"
        )
    return f"{ONE_SEED} (compare.seeds = N, or ghsae sweep --seeds N, trains N seeds per arm)"


def add_seed_columns(rows: list[dict], arm_of: Callable[[dict], str], metrics: Iterable[str]) -> None:
    """Give each row `<metric>_seed_se` (across the seeds of its arm at its layer; None with one seed)
    and `n_seeds`."""
    by: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        by[(arm_of(r), r["layer"])].append(r)
    metrics = list(metrics)
    for same in by.values():
        for m in metrics:
            values = [r[m] for r in same if m in r]
            if not values:
                continue
            # null, not nan, where there is no error across seeds: one seed has none to give
            se = seed_se(values) if len(values) == len(same) >= 2 else None
            for r in same:
                r[f"{m}_seed_se"] = se
        for r in same:
            r["n_seeds"] = len(same)
